"""Jobs in the worker process (--no-fork-per-job): no fork per job, for cheap, trusted jobs.

The worker's loop cannot turn while a job runs here, so:

- TERM, INT and USR1 stop the job where it is: their handlers raise ``JobInterrupted`` into it
  (a BaseException, which qless-py does not turn into a failure); SIGALRM does the same for the
  job's timeout and for the deadline of a graceful stop (--graceful-timeout). QUIT lets the job
  finish: its handler only sets that deadline's alarm (the loop reads QUIT after the job).
- A thread of the worker, its *keeper*, does what the loop cannot while a job runs: it
  heartbeats the running job and the held ones, and sends the completes owed when due.
- The worker pops several jobs at once (prefetch, reservation.py) and completes the ones whose
  functions returned with its next pop (settling.py).

A job that crashes the process (``os._exit``, a segfault) takes the worker with it: the
manager's settler hands it back from the worker's will (will.py), and starts a new worker.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Optional

from .. import proctitle
from ..client import connect, redis_is_down
from ..logs import logger
from .base import Worker
from .outcome import JobRun, Report
from .reservation import HeldJob
from .running import JobClient, run_job, settled_report

__all__ = ["InProcess", "InProcessWorker", "JobInterrupted", "Keeper"]

log = logger.getChild("worker")


class InProcessWorker(Worker):
    """A worker that runs its jobs in its own process (see the module's docstring)."""

    fork_per_job = False
    in_process: InProcess
    keeper: Keeper

    def _start_mode(self) -> None:
        job_client = connect(self.redis_url, self.name, client_class=JobClient, announce=True,
                             **self.job_redis_options)  # fmt: skip
        self.running_here: Optional[HeldJob] = None
        self.in_process = InProcess(job_client, self.job_timeout, self.kill_grace,
                                    self.allow_modules)  # fmt: skip
        self.keeper = Keeper(self._keeper_due, self._tend)
        self.in_process.install()
        signal.signal(signal.SIGQUIT, self._quit_during_job)

    def _quit_during_job(self, signum: int, frame: Any) -> None:
        # Python's C handler has written QUIT to the wakeup pipe, but the loop reads it only
        # once the job returns: the graceful timeout starts now, for the job running and for
        # one the loop starts before it reads QUIT (popped a moment before, or held).
        self._start_graceful_timeout()

    def _stop_by(self, deadline: float) -> None:
        if hasattr(self, "in_process"):
            self.in_process.stop_by(deadline)

    def _start_job(self, held: HeldJob) -> None:
        """Run the job here. TERM, INT and USR1 interrupt it; QUIT waits for it."""
        if self.in_process.stop_requested:  # TERM or INT, not yet seen by the loop
            self.holding.put_back(held)  # given back, unstarted, once the loop sees it
            return
        job = held.job
        started_at = time.time()
        self.presence.title(proctitle.processing(job["queue"], started_at))
        self._record("processing", job, started_at)
        self.running_here = held
        if self.will is not None:
            self.will.started(job)
        with self.keeper.job_running():
            report, reason = self.in_process.run(job)
        self.running_here = None
        self.prefetch.ran(report.seconds)
        if reason == "graceful":
            reason = self.limits.graceful_reason()
        self._finish_job(
            JobRun(job, report, None, reason, reason == "timeout", held.next_heartbeat)
        )

    def _next_at_once(self) -> bool:
        # A turn of the loop costs more than a quick job: while nothing else waits for it, the
        # held jobs run back to back.
        return not self.in_process.stop_requested and self._nothing_waits()

    def _keeper_due(self) -> Optional[float]:
        """While a job runs: when a heartbeat or a complete owed is due."""
        running = self.running_here
        times = [
            t for t in (self.settler.complete_due(), self.holding.next_heartbeat()) if t is not None
        ]
        if running is not None:
            times.append(running.next_heartbeat)
        return min(times, default=None)

    def _tend(self, now: float) -> None:
        """While a job runs (in the keeper's thread): heartbeats, completes owed."""
        assert self.client is not None
        self.holding.heartbeat(self.client, self.name, now, self.running_here)
        if self._completes_due(now):
            self.settler.send_with(self.client, [])


class JobInterrupted(BaseException):
    """Raised into a job running in the worker process by TERM, INT, USR1 or SIGALRM."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class InProcess:
    """Runs jobs in the worker process; its signal handlers interrupt the job that runs.

    ``reason`` of an interruption: ``"timeout"`` (the job's --job-timeout), ``"graceful"`` (the
    graceful stop's deadline passed), or ``"interrupted by SIGTERM"`` (and INT, USR1).

    A job that swallows the interruption (``except BaseException``) is interrupted again
    ``kill_grace`` seconds later; if it swallows that too, the worker process exits at once
    (status 70) after another ``kill_grace``: nothing else can stop it. The manager's settler
    hands its job back (will.py); the manager starts a new worker.
    """

    INTERRUPTING = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
    #: Interruptions a job may swallow before the worker gives up on it and exits.
    MAX_INTERRUPTIONS = 3

    def __init__(
        self,
        client: JobClient,
        job_timeout: Optional[float],
        kill_grace: float = 5.0,
        allowed: Sequence[str] = (),
    ):
        self.client = client
        self.allowed = allowed
        self.job_timeout = job_timeout
        self.kill_grace = kill_grace
        self.stop_deadline: Optional[float] = None  # monotonic
        self.job_deadline: Optional[float] = None  # monotonic
        self.running = False  # the job's own code runs: a signal interrupts it
        self.stop_requested: Optional[str] = None  # TERM or INT came: start no job
        self.interrupted: Optional[str] = None  # why the running job was first interrupted
        self.interruptions = 0

    def install(self) -> None:
        for signum in self.INTERRUPTING:
            signal.signal(signum, self._interrupt)
        signal.signal(signal.SIGALRM, self._interrupt)

    def _interrupt(self, signum: int, frame: Any) -> None:
        # Python's C handler has already written the signal to the worker's wakeup pipe; the
        # loop acts on it once the job is over. This only stops the job where it is.
        if signum in (signal.SIGTERM, signal.SIGINT):
            # Also between two jobs: the loop may be about to start one before it reads this.
            self.stop_requested = f"interrupted by {signal.Signals(signum).name}"
        if not self.running:
            return
        if signum != signal.SIGALRM:
            reason = f"interrupted by {signal.Signals(signum).name}"
        elif self.stop_deadline is not None and time.monotonic() >= self.stop_deadline - 0.01:
            reason = "graceful"
        elif self.job_deadline is not None and time.monotonic() >= self.job_deadline - 0.01:
            reason = "timeout"
        else:
            reason = self.interrupted or "timeout"  # the job swallowed an interruption
        self.interrupted = self.interrupted or reason
        self.interruptions += 1
        if self.interruptions >= self.MAX_INTERRUPTIONS:
            log.critical(
                "the job running in this worker swallowed %d interruptions (%s); exiting (the "
                "manager's settler hands the job back)",
                self.interruptions - 1,
                self.interrupted,
            )
            logging.shutdown()
            os._exit(70)  # EX_SOFTWARE
        if self.interruptions > 1:
            log.warning("the job swallowed its interruption (%s); again", self.interrupted)
        signal.setitimer(signal.ITIMER_REAL, self.kill_grace)  # again, if this one is swallowed
        raise JobInterrupted(self.interrupted)

    def stop_by(self, deadline: float) -> None:
        """A graceful stop must be over by ``deadline``: the job running now too."""
        self.stop_deadline = deadline
        if self.running:
            self._arm()

    def _arm(self) -> None:
        deadlines = [d for d in (self.job_deadline, self.stop_deadline) if d is not None]
        if deadlines:
            signal.setitimer(signal.ITIMER_REAL, max(0.001, min(deadlines) - time.monotonic()))

    def run(self, job: dict[str, Any]) -> tuple[Report, Optional[str]]:
        """Run ``job``: its report, and why it was interrupted (None if it was not)."""
        started = time.monotonic()
        self.job_deadline = started + self.job_timeout if self.job_timeout else None
        self.interrupted, self.interruptions = None, 0
        report: Optional[Report] = None
        reason = None
        try:
            try:
                self.running = True
                if self.stop_requested:  # came as the job was about to start
                    raise JobInterrupted(self.stop_requested)
                self._arm()
                report = run_job(self.client, job, self.allowed)
            finally:
                self.running = False  # from here on a signal waits for the loop
        except JobInterrupted as interrupted:  # (raised in the job, or as it unwound)
            if report is None:
                # What the job settled before it was cut short still counts: a complete() too.
                report = settled_report(self.client)
                report.seconds, report.cut_short = time.monotonic() - started, True
                reason = interrupted.reason
        finally:
            # Always: a job may have set an alarm of its own (signal.alarm) and left it.
            signal.setitimer(signal.ITIMER_REAL, 0)
            self.job_deadline = None
            self.client.track_job(None)
        return report, reason


class Keeper:
    """While a job runs in the worker process, the worker's loop cannot turn. This thread does
    the loop's work that cannot wait for the job to end: the heartbeats (of the running job and
    of the jobs held for later) and the completes owed (due within about a second), with the
    worker's own client. It acts only while a job runs (``job_running()``); the rest of the
    time the loop does that work itself. ``due()`` says when there is work, ``tend(now)``
    does it.
    """

    #: After a failed attempt (Redis away), the next one waits this long.
    RETRY_DELAY = 1.0

    def __init__(self, due: Callable[[], Optional[float]], tend: Callable[[float], None]):
        self._due, self._tend = due, tend
        self._condition = threading.Condition()
        self._active = False
        self._looks_at = math.inf  # monotonic: when the thread looks next
        self._retry_at = 0.0
        self._thread: Optional[threading.Thread] = None

    def job_running(self) -> Keeper:
        """``with keeper.job_running():`` around a job run in process (entered once a job)."""
        return self

    def __enter__(self) -> None:
        with self._condition:
            self._active = True
            due = self._due()
            if due is not None and due < self._looks_at:
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._run, name="qless-pool-keeper", daemon=True
                    )
                    self._thread.start()
                self._condition.notify()

    def __exit__(self, *exc: object) -> None:
        with self._condition:  # waits for a round of tending under way
            self._active = False

    def _run(self) -> None:
        with self._condition:
            while True:
                now = time.monotonic()
                due = self._due() if self._active else None
                if due is not None:
                    due = max(due, self._retry_at)
                if due is not None and due <= now:
                    try:
                        self._tend(now)
                    except Exception as error:
                        if not redis_is_down(error):
                            log.exception("could not heartbeat or settle while a job ran")
                        self._retry_at = time.monotonic() + self.RETRY_DELAY
                    continue
                self._looks_at = math.inf if due is None else due
                self._condition.wait(None if due is None else due - now)
