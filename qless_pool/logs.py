"""Logging: every line names the process's role, the app and the pid.

    2026-11-27 20:25:52,123 qless-pool-manager[app][101] INFO: spawned worker 102 for foo
    2026-11-27 20:25:52,301 qless-pool-worker[app][102] INFO: job 3f2a... (myapp.Job) completed

The role is a property of the process (set once, right after a fork), so the formatter reads it
from here rather than from every logging call.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

__all__ = ["MAX_MESSAGE", "cap", "configure", "logger", "printable", "set_role"]

logger = logging.getLogger("qless_pool")

_identity = {"role": "qless-pool", "appname": ""}

#: The longest failure message the pool stores in qless and the longest log line it writes
#: (a job raising an exception with a 20 MB message must not put 20 MB in Redis and the log).
MAX_MESSAGE = 64 * 1024


def printable(text: str, keep: str = "") -> str:
    """``text`` with control characters (a newline that would start a forged log line, a
    terminal's escape sequences) shown escaped; those in ``keep`` stay as they are."""
    return "".join(c if c.isprintable() or c in keep else repr(c)[1:-1] for c in text)


def cap(text: str, limit: int = MAX_MESSAGE) -> str:
    """``text`` if it is at most ``limit`` characters, else its end (where a traceback says
    what happened) after a line saying how much was cut."""
    if len(text) <= limit:
        return text
    note = f"[qless-pool: {{}} characters cut; the last {limit - 100} follow]\n"
    kept = text[-(limit - 100) :]
    return note.format(len(text) - len(kept)) + kept


def set_role(role: str, appname: str | None = None) -> None:
    """Name this process in log lines: ``manager``, ``worker`` or ``job``."""
    _identity["role"] = f"qless-pool-{role}"
    if appname is not None:
        _identity["appname"] = appname


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        app = _identity["appname"]
        record.who = f"{_identity['role']}{f'[{app}]' if app else ''}[{record.process}]"
        return cap(super().format(record))


def configure(level: int | str = "INFO", stream: Any = None, appname: str | None = None) -> None:
    """Send qless-pool's log lines (and qless-py's errors) to ``stream`` (default stderr).

    Replaces only the handler this function installed before, so it is safe to call again (the
    daemon calls it after reopening its log files).
    """
    if appname is not None:
        _identity["appname"] = appname
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(_Formatter("%(asctime)s %(who)s %(levelname)s: %(message)s"))
    handler._qless_pool = True  # type: ignore[attr-defined]
    for name in ("qless_pool", "qless"):
        target = logging.getLogger(name)
        for old in [h for h in target.handlers if getattr(h, "_qless_pool", False)]:
            target.removeHandler(old)
        target.addHandler(handler)
        target.propagate = False
    logger.setLevel(level.upper() if isinstance(level, str) else level)
    # qless-py logs every job at INFO on its own handler. Keep its errors only, on ours: a job
    # that raises is then logged once, with its traceback (qless-py also warns "Failing ...",
    # with the same traceback again).
    qless_logger = logging.getLogger("qless")
    for old in [h for h in qless_logger.handlers if not getattr(h, "_qless_pool", False)]:
        qless_logger.removeHandler(old)
    qless_logger.setLevel(logging.ERROR)
