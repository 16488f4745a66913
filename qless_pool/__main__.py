"""The ``qless-pool`` command's entry point (also ``python -m qless_pool``).

Before anything heavy is imported (qless, redis and the application take a few hundred
milliseconds), a password in the command line (``-R redis://:secret@host``) is hidden from
``ps``: ``/proc/<pid>/cmdline`` is world-readable. Only the moment between exec and this
module's first lines remains; ``$QLESS_URL`` keeps a password out of the command line entirely.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    _hide_secrets(sys.argv)
    from .cli import main as run_command_line

    try:
        return run_command_line(argv)
    except BrokenPipeError:
        # Whoever read the output is gone (qless-pool failed | head): no traceback, and no
        # second complaint when Python flushes stdout at exit. 141: as if killed by SIGPIPE.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 128 + signal.SIGPIPE


def _hide_secrets(argv: Sequence[str]) -> None:
    """If the command line holds a password (in a URL), show it masked from now on."""
    from .urls import mask_argument

    masked = [mask_argument(arg) for arg in argv]
    if masked != list(argv):
        from setproctitle import setproctitle

        setproctitle(" ".join(masked))


if __name__ == "__main__":
    raise SystemExit(main())
