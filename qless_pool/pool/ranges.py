"""The manager's side of worker count ranges (``foo: 1..8``; the rule is scaling.py's): keep a
sampler process while a group has a range, read its samples, apply the scaler's decisions.

    up    the group's wanted count rises; reconcile spawns the workers
    down  one worker of the group is asked to retire if idle: its pid goes in the shared
          notes.RetireSlots, then WINCH; it exits IDLE_RETIRED only if no job runs, and only
          then does the wanted count go down (reap). A worker that was busy ignores it; after
          RETIRE_WAIT the ask is withdrawn and another worker is asked, each in turn.

While the pool is paused (USR2), or stays without workers after WINCH, counts hold.

How ranges compose with the rest: ``--drain`` runs every range at its MAX (a drain wants the
queues empty soonest) with no sampler; WINCH stops every worker as for fixed counts; a HUP keeps
each range group's wanted count, clamped into its new range; a reload passes the wanted counts
to the new manager, which starts its range groups there (clamped into its config's ranges).
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

from .. import lifeline
from ..config import Counts, Groups, Queues, Range
from ..logs import logger
from ..notes import PauseFlag, RetireSlots
from .scaling import Decision, Scaler, ScaleSettings, read_samples, run_sampler
from .table import WorkerRecord

__all__ = ["RETIRE_WAIT", "Ranges"]

log = logger.getChild("scaling")

#: How long a worker asked to retire if idle has to do so before another is asked (an idle
#: worker takes milliseconds; one running a job never does).
RETIRE_WAIT = 2.0
#: A sampler that exited is started again after this long.
SAMPLER_RESTART = 1.0


@dataclass(frozen=True)
class RetireAsked:
    pid: int
    until: float  # monotonic
    tried: frozenset[int] = frozenset()  # asked in this quiet period, busy each time


class Ranges:
    """Pool's part for range groups (a base of pool.manager.Pool)."""

    # The manager's, read and set here.
    pid: int
    groups: Optional[Groups]
    workers: dict[int, WorkerRecord]
    winched: bool
    stopping: Optional[str]
    drain: bool
    redis_url: str
    appname: str
    scaler: Scaler
    sampler_pid: Optional[int]
    sampler_fd: int
    sampler_queues: tuple[Queues, ...]
    sampler_restart_at: float
    sampler_buffer: bytearray
    retire_asked: dict[Queues, RetireAsked]
    retire: RetireSlots
    pause: PauseFlag
    scale_start: Optional[Counts]
    fixed_before: Counts

    if TYPE_CHECKING:  # forks.Forking's

        def _fork(self, body: Callable[[], int], keep: Any = ()) -> int: ...

    def _init_ranges(self, settings: ScaleSettings, start: Optional[Counts] = None) -> None:
        self.scaler = Scaler(settings)
        self.scale_start = start  # a reload's wanted counts, for the first configure
        self.fixed_before: Counts = {}  # the groups with a fixed count, as last configured
        self.sampler_pid = None
        self.sampler_fd = -1
        self.sampler_queues = ()
        self.sampler_restart_at = 0.0
        self.sampler_buffer = bytearray()
        self.retire_asked = {}

    def configure_ranges(self) -> None:
        """The config's groups changed (start, HUP): the scaler takes the ranges. A group that
        had a fixed count starts its range there (clamped into it)."""
        start = {**self.fixed_before, **(self.scale_start or {})}
        self.scaler.configure(self.groups or {}, start)
        self.scale_start = None
        self.fixed_before = {
            q: n for q, n in (self.groups or {}).items() if not isinstance(n, Range)
        }

    def range_counts(self, groups: Groups) -> Counts:
        """``groups`` with every range replaced by what the pool wants of it now."""
        wanted = self.scaler.wanted()
        counts = {}
        for queues, count in groups.items():
            if isinstance(count, Range):
                counts[queues] = count.high if self.drain else wanted.get(queues, count.low)
            else:
                counts[queues] = count
        return counts

    # --- the sampler ----------------------------------------------------------------------------

    def _keep_sampler(self) -> None:
        """A sampler runs while a group has a range (not in drain mode), for those groups."""
        wanted = () if self.drain or self.stopping else tuple(self.scaler.groups)
        if wanted != self.sampler_queues and self.sampler_pid is not None:
            lifeline.send(self.sampler_pid, signal.SIGTERM)  # reaped as a helper
            self.sampler_queues = ()
        if not wanted or self.sampler_pid is not None:
            return
        if time.monotonic() < self.sampler_restart_at:
            return
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        self._close_sampler_fd()
        self.sampler_fd = read_fd
        interval = self.scaler.settings.interval
        try:
            self.sampler_pid = self._fork(
                lambda: self._become_sampler(wanted, interval, write_fd), keep=[write_fd]
            )
        except OSError as error:
            log.error("cannot fork the scaler's sampler: %s", error)
            self.sampler_restart_at = time.monotonic() + SAMPLER_RESTART
            self._close_sampler_fd()
        else:
            self.sampler_queues = wanted
        finally:
            os.close(write_fd)

    def _become_sampler(self, groups: tuple[Queues, ...], interval: float, write_fd: int) -> int:
        lifeline.die_with_parent(self.pid)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGTERM])
        return run_sampler(self.redis_url, groups, interval, write_fd, self.appname)

    def _sampler_exited(self, pid: int, status: int) -> bool:
        if pid != self.sampler_pid:
            return False
        self.sampler_pid = None
        self._read_samples()  # what it said before it went
        self._close_sampler_fd()  # (an open pipe at its end would wake the loop for ever)
        if self.sampler_queues and not self.stopping:  # not one stopped on purpose
            log.error("the scaler's sampler exited (%s); starting it again",
                      lifeline.describe_status(status))  # fmt: skip
            self.sampler_restart_at = time.monotonic() + SAMPLER_RESTART
        self.sampler_queues = ()
        return True

    def _close_sampler_fd(self) -> None:
        if self.sampler_fd >= 0:
            os.close(self.sampler_fd)
            self.sampler_fd = -1
            self.sampler_buffer.clear()

    def _read_samples(self) -> None:
        if self.sampler_fd < 0:
            return
        data = b""
        ended = False
        try:
            while chunk := os.read(self.sampler_fd, 65536):
                data += chunk
            ended = True  # the sampler closed its end: it is exiting
        except BlockingIOError:
            pass
        samples = read_samples(self.sampler_buffer, data) if data else []
        if ended:
            self._close_sampler_fd()
        if samples and not self.stopping and not self.winched and not self.pause.get():
            self._apply(samples[-1])  # a backlog of samples: the newest says it all

    # --- decisions ------------------------------------------------------------------------------

    def _apply(self, sample: dict[str, Any]) -> None:
        if "down" in sample:
            if self.scaler.redis_down is None:
                log.warning("scaling holds: the sampler cannot reach Redis (%s)", sample["down"])
            self.scaler.unavailable(str(sample["down"]))
            return
        waits = {
            tuple(key.split(",")): (None if wait is None else float(wait))
            for key, wait in (sample.get("waits") or {}).items()
        }
        for queues, wait in waits.items():
            if wait is not None:  # a job waits: the quiet period, and its asks, are over
                self._withdraw_ask(queues)
        fixed = sum(n for q, n in (self.groups or {}).items() if not isinstance(n, Range))
        now = time.monotonic()
        for decision in self.scaler.observe(waits, fixed, now):
            self._act(decision, now)

    def _act(self, decision: Decision, now: float) -> None:
        what = ",".join(decision.queues)
        if decision.action == "up":
            log.info("scaling %s up to %d: %s", what, decision.wanted, decision.reason)
        elif decision.action == "hold":
            log.warning("scaling %s held at the cap: %s", what, decision.reason)
        else:
            asked = self.retire_asked.get(decision.queues)
            if asked is not None and now < asked.until and asked.pid in self.workers:
                return  # one at a time
            worker = self._worker_to_retire(decision.queues, asked)
            if worker is None:
                return
            tried = asked.tried if asked is not None else frozenset()
            if asked is not None:
                self.retire.withdraw(asked.pid)  # busy: if it reads WINCH late, it stays
            if not tried:  # said once a quiet period, not at every worker asked
                log.info("scaling %s down to %d: %s; asking worker %d to retire if idle", what,
                         decision.wanted, decision.reason, worker.pid)  # fmt: skip
            else:
                log.debug("asking worker %d (%s) to retire if idle", worker.pid, what)
            self.retire.ask(worker.pid)
            lifeline.send(worker.pid, signal.SIGWINCH)
            self.retire_asked[decision.queues] = RetireAsked(
                worker.pid, now + RETIRE_WAIT, tried | {worker.pid}
            )

    def _withdraw_ask(self, queues: Queues) -> None:
        asked = self.retire_asked.pop(queues, None)
        if asked is not None:
            self.retire.withdraw(asked.pid)

    def _worker_to_retire(
        self, queues: Queues, asked: Optional[RetireAsked]
    ) -> Optional[WorkerRecord]:
        """A worker of ``queues`` to ask: not retiring already, not one asked already in this
        quiet period (it was busy), the youngest first; once each was asked, each again."""
        tried = asked.tried if asked is not None else frozenset()
        group = [w for w in self.workers.values() if w.queues == queues and not w.retiring]
        candidates = [w for w in group if w.pid not in tried] or group
        return max(candidates, key=lambda w: w.started_at, default=None)

    def _worker_retired_idle(self, record: WorkerRecord) -> None:
        """Reap saw a worker exit IDLE_RETIRED: if it was asked to, one fewer wanted in its
        group; if not (it cannot have been asked by its pool), it is replaced."""
        asked = self.retire_asked.get(record.queues)
        self.retire.withdraw(record.pid)
        if asked is None or asked.pid != record.pid:
            log.warning("worker %d (%s) retired without being asked to; it is replaced",
                        record.pid, ",".join(record.queues))  # fmt: skip
            return
        self.retire_asked.pop(record.queues, None)
        self.scaler.retired(record.queues, time.monotonic())
        wanted = self.scaler.wanted().get(record.queues)
        if wanted is None:
            log.info("worker %d (%s) retired, idle; it is replaced (its group has no range)",
                     record.pid, ",".join(record.queues))  # fmt: skip
        else:
            log.info("worker %d (%s) retired, idle: the group now runs %d", record.pid,
                     ",".join(record.queues), wanted)  # fmt: skip
