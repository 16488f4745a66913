"""Reserving jobs: the order a worker tries its queues in, which job classes it may run, and
how many jobs it pops at once.

- A *reserver* orders the queues for each attempt: ``ordered`` (the first queue with a job
  wins, the Ruby gem's default), ``round-robin``, ``shuffled-round-robin``.
- The *allowlist* (``--allow-module``) is checked on the job's class name before anything of
  the job is imported or forked.
- *Prefetch* (jobs run in the worker process): qless's ``pop`` hands out several jobs at once.
  The batch size adapts so that a job popped ahead never waits behind the others for more than
  about a second (``BATCH_SECONDS``) when the jobs run as fast as the last ones did: it doubles
  while jobs are fast and drops at once when one is slow. The jobs popped ahead are *held*:
  locked to this worker, heartbeated like the running job (by the worker's loop between jobs,
  by its keeper thread while one runs: inprocess.Keeper), and given back to their queue (no
  retry spent) if the worker must stop before it runs them.
"""

from __future__ import annotations

import json
import os
import random
import re
import time
import types
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

from qless.exceptions import QlessException

from ..client import pipelined, raise_if_down
from ..logs import logger

__all__ = [
    "ALLOW_MODULES_VARIABLE",
    "RESERVERS",
    "HeldJob",
    "Holding",
    "OrderedReserver",
    "Prefetch",
    "RoundRobinReserver",
    "ShuffledRoundRobinReserver",
    "check_allowed_modules",
    "class_allowed",
    "default_allowed_modules",
    "forbidden_target",
    "make_reserver",
]

log = logger.getChild("worker")

# --- reservers: the order in which a worker tries its queues ------------------------------------


class OrderedReserver:
    """The first queue in the list that has a job wins (the Ruby gem's default)."""

    name = "ordered"

    def __init__(self, queues: Sequence[str]):
        self.queues = list(queues)

    def order(self) -> list[str]:
        return list(self.queues)

    def tried(self, queue: str) -> None:
        """Called after each pop attempt on ``queue``."""


class RoundRobinReserver(OrderedReserver):
    """Each attempt starts at the queue after the one tried last, so no queue starves."""

    name = "round-robin"

    def __init__(self, queues: Sequence[str]):
        super().__init__(queues)
        self.cursor = 0

    def order(self) -> list[str]:
        return self.queues[self.cursor :] + self.queues[: self.cursor]

    def tried(self, queue: str) -> None:
        self.cursor = (self.queues.index(queue) + 1) % len(self.queues)


class ShuffledRoundRobinReserver(RoundRobinReserver):
    """Round robin over an order shuffled once per worker, so workers start on different queues."""

    name = "shuffled-round-robin"

    def __init__(self, queues: Sequence[str]):
        shuffled = list(queues)
        random.shuffle(shuffled)
        super().__init__(shuffled)


RESERVERS = {
    "ordered": OrderedReserver,
    "round-robin": RoundRobinReserver,
    "shuffled-round-robin": ShuffledRoundRobinReserver,
}


def make_reserver(name: str, queues: Sequence[str]) -> OrderedReserver:
    try:
        return RESERVERS[name](queues)
    except KeyError:
        raise ValueError(
            f"unknown reserver {name!r}; choose one of {', '.join(RESERVERS)}"
        ) from None


# --- which job classes may run ------------------------------------------------------------------

#: The job class allowlist from the environment (comma-separated module prefixes).
ALLOW_MODULES_VARIABLE = "QLESS_POOL_ALLOW_MODULES"
_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def default_allowed_modules(environ: Optional[Mapping[str, str]] = None) -> list[str]:
    """$QLESS_POOL_ALLOW_MODULES as a list (empty when unset)."""
    raw = (os.environ if environ is None else environ).get(ALLOW_MODULES_VARIABLE, "")
    return [part.strip() for part in raw.split(",") if part.strip()]


def check_allowed_modules(prefixes: Sequence[str]) -> tuple[str, ...]:
    """The prefixes, each a dotted module name (ValueError otherwise)."""
    for prefix in prefixes:
        if not _DOTTED.match(prefix):
            raise ValueError(f"not a module name: {prefix!r} (e.g. myapp or myapp.jobs)")
    return tuple(prefixes)


def class_allowed(klass: str, prefixes: Sequence[str]) -> bool:
    """Is ``klass`` inside one of the modules ``prefixes`` names, on dotted boundaries
    (``myapp`` allows ``myapp.jobs.Mail``, not ``myappevil.X``)? No prefixes: anything is."""
    return not prefixes or any(klass == p or klass.startswith(p + ".") for p in prefixes)


def forbidden_target(job: Any, prefixes: Sequence[str]) -> Optional[str]:
    """Why qless-py must not call what ``job`` (a ``qless.Job``) names, or None.

    The class name passed :func:`class_allowed`, but qless-py follows it attribute by attribute
    after importing its module: ``myapp.os`` on a queue named ``system`` is ``os.system``.
    Resolved as qless-py resolves it (its own ``Job.klass``), the class must be a class (or a
    module) defined in an allowed module, and the method qless-py will call (the one named like
    the queue, else ``process``) must be defined in one too. Called in the process that runs the
    job, once the job's own module is imported; a class that cannot be imported is left to
    qless-py, which fails the job saying so.
    """
    if not prefixes:
        return None
    try:
        klass = job.klass
    except Exception:
        return None
    if isinstance(klass, types.ModuleType):
        home, what = klass.__name__, "is the module"
    elif isinstance(klass, type):
        home, what = klass.__module__, "is defined in module"
    else:
        return f"job class {job.klass_name!r} names a {type(klass).__name__}, not a class"
    allowed = " ".join(prefixes)
    if not class_allowed(home, prefixes):
        return (
            f"job class {job.klass_name!r} {what} {home!r}, outside the modules this worker "
            f"may run (--allow-module {allowed})"
        )
    name = job.queue_name if hasattr(klass, job.queue_name) else "process"
    method = getattr(klass, name, None)
    if method is None:
        return None  # qless-py fails it: the method is missing
    source = getattr(method, "__module__", None)
    if not isinstance(source, str) or not class_allowed(source, prefixes):
        return (
            f"{job.klass_name}.{name} is defined in module {source!r}, outside the modules this "
            f"worker may run (--allow-module {allowed})"
        )
    return None


# --- prefetch: how many jobs to pop at once -----------------------------------------------------

#: A job popped ahead waits behind the others of its batch for about this long at most.
BATCH_SECONDS = 1.0
#: The largest adaptive batch (past a few dozen, a bigger pop saves nothing measurable).
MAX_PREFETCH = 32


class Prefetch:
    """How many jobs the next pop asks for.

    ``fixed`` (``--prefetch N``) pins the size. Adaptive (the default): start at 1; after each
    batch whose jobs all ran fast, double (up to MAX_PREFETCH, and so that the batch's slowest
    job times the batch size stays within BATCH_SECONDS); a job slower than that brings the
    size down at once, to 1 for a job of a second or more.
    """

    def __init__(self, fixed: Optional[int] = None):
        if fixed is not None and fixed < 1:
            raise ValueError("prefetch must be at least 1")
        self.fixed = fixed
        self.size = fixed or 1
        self._slowest = 0.0  # of the current batch
        self._left = 0  # jobs of the current batch not yet run

    def popped(self, count: int) -> None:
        self._left = count
        self._slowest = 0.0

    def ran(self, seconds: float) -> None:
        """One job of the batch ran for ``seconds``."""
        self._slowest = max(self._slowest, seconds)
        self._left -= 1
        if self.fixed:
            return
        if self._slowest * self.size > BATCH_SECONDS:
            self.size = max(1, int(BATCH_SECONDS / self._slowest))
        elif self._left <= 0 and self._slowest * self.size * 2 <= BATCH_SECONDS:
            self.size = min(MAX_PREFETCH, self.size * 2)


# --- held jobs: popped ahead, not yet started ----------------------------------------------------


@dataclass
class HeldJob:
    """A job popped by this worker, with the schedule of its lock."""

    job: dict[str, Any]  # as qless popped it
    every: float  # seconds between heartbeats: a third of the time its lock is given for
    next_heartbeat: float  # monotonic

    @classmethod
    def popped(cls, job: dict[str, Any]) -> HeldJob:
        every = heartbeat_every(job, time.time())
        return cls(job, every, time.monotonic() + every)

    @property
    def jid(self) -> str:
        return str(self.job["jid"])

    def heartbeaten(self, now: float) -> None:
        self.next_heartbeat = now + self.every


class Holding:
    """The jobs this worker popped ahead and has not started: its own, under qless's lock."""

    def __init__(self) -> None:
        self.jobs: deque[HeldJob] = deque()
        # The soonest heartbeat, kept rather than looked for: the loop asks after every job,
        # and in process up to 32 jobs are held (see next_heartbeat).
        self._soonest: Optional[float] = None

    def __len__(self) -> int:
        return len(self.jobs)

    def __iter__(self) -> Iterator[HeldJob]:
        return iter(self.jobs)

    def hold(self, jobs: Sequence[HeldJob]) -> None:
        self.jobs.extend(jobs)
        self._soonest = _UNKNOWN

    def put_back(self, held: HeldJob) -> None:
        """A job taken to run and not started after all: the next again."""
        self.jobs.appendleft(held)
        self._soonest = _UNKNOWN

    def next(self) -> Optional[HeldJob]:
        return self.jobs.popleft() if self.jobs else None  # (its heartbeat may stay soonest)

    def drop(self, jid: str) -> Optional[dict[str, Any]]:
        """Forget ``jid`` (qless took it away); returns it if it was held."""
        for held in self.jobs:
            if held.jid == jid:
                self.jobs.remove(held)
                self._soonest = _UNKNOWN
                return held.job
        return None

    def due_heartbeats(self, now: float) -> list[HeldJob]:
        return [held for held in self.jobs if held.next_heartbeat <= now]

    def next_heartbeat(self) -> Optional[float]:
        """When the soonest heartbeat of the held jobs is due, or earlier: a job taken to run
        leaves its time here until heartbeat() finds nothing due then (the jobs of a pop are
        taken in the order of their times, so looking again after each would cost a look at
        every job held, after every job)."""
        if self._soonest is _UNKNOWN:
            self._soonest = min((held.next_heartbeat for held in self.jobs), default=None)
        return self._soonest

    def heartbeat(
        self, client: Any, worker: str, now: float, running: Optional[HeldJob] = None
    ) -> None:
        """Heartbeat the held jobs that are due, in one round trip; a job qless refuses one is
        no longer ours: it is dropped, not run. ``running``: a job running in this process,
        heartbeated with them when it is due."""
        soonest = self.next_heartbeat()
        if (soonest is None or soonest > now) and (running is None or running.next_heartbeat > now):
            return
        due = self.due_heartbeats(now)
        if running is not None and running.next_heartbeat <= now:
            due.append(running)
        if not due:
            self._soonest = _UNKNOWN  # it was a job taken to run: looked for again
            return
        answers = pipelined(client, [["heartbeat", held.jid, worker] for held in due])
        raise_if_down(answers)
        self._soonest = _UNKNOWN  # their next times are later now
        for held, answer in zip(due, answers):
            held.heartbeaten(now)
            if not isinstance(answer, QlessException):
                continue
            if held is running:  # its outcome will be refused: it is no longer ours
                log.warning("job %s: qless refused its heartbeat (%s)", held.jid, answer)
            else:
                self.drop(held.jid)
                log.warning("job %s: qless refused its heartbeat (%s); not run", held.jid, answer)

    def give_back(self, client: Any) -> None:
        """Return every held job to its queue (one round trip), and forget them."""
        jobs = [held.job for held in self.jobs]
        answers = pipelined(client, [give_back_command(job) for job in jobs])
        raise_if_down(answers)  # still held: given back once Redis takes writes again
        self.jobs.clear()
        self._soonest = None
        for job, answer in zip(jobs, answers):
            what = f"job {job['jid']} ({job['klass']}) from {job['queue']}"
            if isinstance(answer, QlessException):
                log.info("%s: could not give it back: %s", what, answer)
            else:
                log.info("%s: given back to its queue, not started", what)


#: Holding's soonest heartbeat, not known until looked for again (NaN: equal to no time).
_UNKNOWN: Any = float("nan")


def heartbeat_every(job: dict[str, Any], popped_at: float) -> float:
    """A job is heartbeated every third of the time its lock was given for."""
    return max(0.05, (float(job["expires"]) - popped_at) / 3)


def give_back_command(job: dict[str, Any]) -> list[Any]:
    """The qless command that returns a held (never started) job to its queue.

    ``put`` of the existing jid to its own queue: qless moves it back to waiting, keeps its
    data, priority, tags and retry count, and resets its remaining retries to that count, so no
    retry is spent and nothing is counted as a failure (``retry`` would spend one). (A job that
    had spent retries gets them back: the price of giving it back within qless's semantics.) It goes
    behind the jobs of its priority already waiting, and qless publishes ``lock_lost`` for this
    worker, which the worker, stopping, ignores.
    """
    return [
        "put",
        job["queue"],
        job["jid"],
        job["klass"],
        job["data"] if isinstance(job["data"], str) else json.dumps(job["data"]),
        0,
        "priority",
        job.get("priority", 0),
        "tags",
        json.dumps(job.get("tags") or []),
        "retries",
        job.get("retries", 5),
    ]
