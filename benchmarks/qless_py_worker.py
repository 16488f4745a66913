"""Run qless-py's own ``qless-py-worker`` (its ForkingWorker) on a modern Redis.

qless-py 0.11.4 fails on Redis 6.2.7 and later (its Lua script writes a global). This wrapper
calls ``qless_pool.patch_qless()`` and then runs the peer's installed script unchanged, with the
same command line::

    python benchmarks/qless_py_worker.py --host URL -w 2 -q bench -m benchjobs
"""

from __future__ import annotations

import os
import runpy
import sys
from importlib import metadata

import qless_pool


def installed_script(distribution: str = "qless-py", name: str = "qless-py-worker") -> str:
    """The path of a script a distribution installed (its bin/ entry, not a module)."""
    dist = metadata.distribution(distribution)
    for file in dist.files or []:
        if file.name == name:
            return os.path.normpath(str(dist.locate_file(file)))
    raise SystemExit(f"{distribution} does not ship {name}")


if __name__ == "__main__":
    qless_pool.patch_qless()
    script = installed_script()
    sys.argv[0] = script
    runpy.run_path(script, run_name="__main__")
