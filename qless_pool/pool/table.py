"""The worker table and the decisions the manager takes over it, as plain functions.

The manager keeps one record per worker parent it forked, from spawn to reap (a pid leaves the
table only when reaped, so a pid the kernel has reused is never signalled). Each turn it asks
:func:`plan` what to do, level-triggered, as resque-pool does: the desired counts (the config's
groups; none after WINCH) against the table. The same answer serves a crashed worker, a HUP
with new counts and a WINCH. :func:`note_exit` keeps the respawn backoff of a group whose
workers die right after they start.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Optional

from ..worker.limits import RECYCLED

__all__ = [
    "FIRST_BACKOFF",
    "HEALTHY_AFTER",
    "MAX_BACKOFF",
    "Backoff",
    "Plan",
    "WorkerRecord",
    "active_by_group",
    "clean_exit",
    "next_spawn_time",
    "note_exit",
    "plan",
]

Queues = tuple[str, ...]

#: A worker that dies sooner than this after its start, before its first job, counts as a failed
#: start (one that dies running a job does not: the job is to blame, and it is retried).
HEALTHY_AFTER = 5.0
#: Backoff after failed starts: 1 s, doubling, at most a minute.
FIRST_BACKOFF = 1.0
MAX_BACKOFF = 60.0


@dataclass(frozen=True)
class WorkerRecord:
    """One worker parent in the table, from spawn to reap."""

    pid: int
    queues: Queues
    started_at: float  # monotonic
    retiring: bool = False  # told to QUIT (or stop): no longer counts toward its group
    began: bool = False  # it started a job: dying is not a failed start
    up: bool = False  # it reserves (Redis answered it): a reload counts it as serving


@dataclass
class Backoff:
    """Failed starts of one group in a row, and when the group may start a worker again."""

    failures: int = 0
    until: float = 0.0


@dataclass
class Plan:
    """What the manager does now: QUIT these surplus workers (newest first), start a worker
    for each of these groups (in order), and forget the backoff of these groups (a worker of
    theirs started healthily)."""

    retire: list[WorkerRecord] = field(default_factory=list)
    spawn: list[Queues] = field(default_factory=list)
    healthy: list[Queues] = field(default_factory=list)


def active_by_group(workers: Iterable[WorkerRecord]) -> dict[Queues, list[WorkerRecord]]:
    """The workers that count toward each group: those not retiring."""
    active: dict[Queues, list[WorkerRecord]] = {}
    for record in workers:
        if not record.retiring:
            active.setdefault(record.queues, []).append(record)
    return active


def plan(
    desired: Mapping[Queues, int],
    workers: Iterable[WorkerRecord],
    backoffs: Mapping[Queues, Backoff],
    now: float,
    next_spawn_at: float = 0.0,
    spawn_delay: float = 0.0,
) -> Plan:
    """What to QUIT and what to start, ``now`` (monotonic): each group's surplus (newest
    first), then each group's missing workers, unless the group backs off or a spawn delay
    holds (with ``spawn_delay``, one spawn at a time)."""
    result = Plan()
    active = active_by_group(workers)
    for queues, group in active.items():
        backoff = backoffs.get(queues)
        if (
            backoff
            and backoff.failures
            and any(w.began or now - w.started_at >= HEALTHY_AFTER for w in group)
        ):
            result.healthy.append(queues)
        surplus = max(0, len(group) - desired.get(queues, 0))
        result.retire += sorted(group, key=lambda w: w.started_at, reverse=True)[:surplus]
    if now < next_spawn_at:
        return result
    for queues, count in desired.items():
        backoff = backoffs.get(queues)
        if backoff is not None and now < backoff.until:
            continue
        missing = count - len(active.get(queues, ()))
        if missing <= 0:
            continue
        if spawn_delay:
            result.spawn.append(queues)
            return result
        result.spawn += [queues] * missing
    return result


def next_spawn_time(
    desired: Mapping[Queues, int],
    workers: Iterable[WorkerRecord],
    backoffs: Mapping[Queues, Backoff],
    now: float,
    next_spawn_at: float,
    idle: float,
) -> float:
    """When a missing worker can next be started (``now + idle`` if none is missing)."""
    active = active_by_group(workers)
    times = [
        max(next_spawn_at, backoffs[q].until if q in backoffs else now)
        for q, n in desired.items()
        if len(active.get(q, ())) < n
    ]
    return min(times, default=now + idle)


def note_exit(backoff: Backoff, lived: float, began: bool, now: float) -> Optional[float]:
    """A worker of the group died (or could not be forked) ``lived`` seconds after its start.
    A failed start (soon, before its first job) doubles the group's backoff and returns the
    delay before its next start; anything else ends the backoff (None)."""
    if lived >= HEALTHY_AFTER or began:
        backoff.failures = 0
        return None
    backoff.failures += 1
    delay = min(FIRST_BACKOFF * 2 ** (backoff.failures - 1), MAX_BACKOFF)
    backoff.until = now + delay
    return float(delay)


def clean_exit(status: int) -> bool:
    """A worker's exit (its wait status) that leaves nothing to settle: it stopped as asked, or
    to be recycled (limits.RECYCLED)."""
    return os.WIFEXITED(status) and os.WEXITSTATUS(status) in (0, RECYCLED)
