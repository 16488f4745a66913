"""Process titles, as ``ps`` shows them (the public contract; docs/ARCHITECTURE.md, "The processes")::

qless-pool-manager[app]: managing [101, 102, 103]
qless-pool-manager[app]: managing [104, 105] retiring [101, 102]     (during a HUP)
qless-0.11.4: Waiting for foo,bar,baz
qless-0.11.4: Forked 230 at 1764270000
qless-0.11.4: Processing bar since 1764270000
qless-0.11.4: Ready for foo,bar,baz since 1764270000
qless-0.11.4: Paused
"""

from __future__ import annotations

from collections.abc import Iterable
from importlib import metadata
from typing import Any

from setproctitle import setproctitle

__all__ = [
    "PREFIX",
    "forked",
    "manager",
    "paused",
    "processing",
    "ready",
    "set_title",
    "waiting",
]

#: Worker titles start with the qless-py version, as the Ruby gem's start with the qless one.
PREFIX = f"qless-{metadata.version('qless-py')}"


def set_title(title: str) -> None:
    setproctitle(title)


def waiting(queues: Iterable[str]) -> str:
    return f"{PREFIX}: Waiting for {','.join(queues)}"


def forked(child_pid: int, since: float) -> str:
    return f"{PREFIX}: Forked {child_pid} at {int(since)}"


def processing(queue: str, since: float) -> str:
    return f"{PREFIX}: Processing {queue} since {int(since)}"


def ready(queues: Iterable[str], since: float) -> str:
    """A standby job child, forked ahead, waiting for its job."""
    return f"{PREFIX}: Ready for {','.join(queues)} since {int(since)}"


def paused() -> str:
    return f"{PREFIX}: Paused"


def manager(appname: str | None, workers: Iterable[Any]) -> str:
    """``workers``: pids, or records with ``pid`` and ``retiring`` (told to stop: during a HUP,
    the old workers finishing their jobs are listed apart from the new ones)."""
    app = f"[{appname}]" if appname else ""
    active: list[str] = []
    retiring: list[str] = []
    for worker in workers:
        pid = getattr(worker, "pid", worker)
        (retiring if getattr(worker, "retiring", False) else active).append(str(pid))
    title = f"qless-pool-manager{app}: managing [{', '.join(active)}]"
    return f"{title} retiring [{', '.join(retiring)}]" if retiring else title
