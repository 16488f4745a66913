"""The worker parent's loop, shared by both run modes: reserve, hold, settle, events, limits.

A worker parent is one qless worker, named ``<hostname>-<pid>``, serving a list of queues. It is
single-threaded: one loop waits (``poll``) on its signal wakeup pipe, its pubsub socket and (a
child per job) its job child's report pipe, and each turn does the next due thing::

    signals -> parent gone? -> the running job (its child: reap, report, timeout) -> limits
            -> Redis: events, heartbeats, settle, reserve and start a job -> title -> wait

(In process, the jobs popped together run back to back while nothing else waits: see
``_nothing_waits``.)

The life of a job, one step per module::

    reservation.py  pop it (the first of the queues with a job; several at once in process)
    forking.py      run it in a child forked ahead (jobchild.py), the default, or
    inprocess.py    run it in this process
    running.py      either way, with qless-py's Job.process, reporting how it went (outcome.py)
    settling.py     send qless what the run calls for: nothing, complete (with the next pop),
                    a replayed outcome, fail (job timeout) or retry (<queue>-DirtyExit)

Beside them: signals.py (QUIT, TERM, INT, USR1, USR2, CONT), events.py (what qless publishes),
limits.py (--max-jobs, --max-memory, --graceful-timeout), will.py (what a helper settles if
the worker dies), presence.py (title, status record, metrics).

While idle the worker listens to ``ql:log`` for puts to its queues, so a new job starts at once
rather than at the next poll (the poll still finds delayed and recurring jobs); while a job runs,
to ``ql:w:<name>`` for the news that it was taken away (``lock_lost``, ``canceled``, moved).
Redis going away is an *outage*: logged once, retried with a capped backoff, and ridden out.
"""

from __future__ import annotations

import json
import logging
import os
import select
import socket
import time
from collections.abc import Sequence
from typing import Any, Optional

import qless
from qless.exceptions import QlessException

from .. import logs, options, proctitle
from ..client import (
    CONTROL_TIMEOUT,
    JOB_SOCKET_TIMEOUT,
    REDIS_DOWN,
    Outage,
    connect,
    default_redis_url,
    redis_is_down,
)
from ..logs import logger, set_role
from ..notes import UP, NoteTaker, PauseFlag, RetireSlots
from ..ops import pools
from .events import Subscriptions
from .limits import RECYCLED, Limits
from .outcome import JobRun
from .presence import Presence, effective_options
from .reservation import (
    Holding,
    Prefetch,
    check_allowed_modules,
    default_allowed_modules,
    make_reserver,
)
from .reserving import Reserving
from .running import describe_job
from .settling import Settler, settled_outcome, settlement_for
from .signals import HANDLED_SIGNALS, IDLE_RETIRED, SignalHandling
from .will import Will

__all__ = ["HANDLED_SIGNALS", "Worker", "worker_name"]

log = logger.getChild("worker")

#: How often the worker wakes at least, to notice that the process that forked it is gone.
PARENT_CHECK_INTERVAL = 1.0


def worker_name(pid: int) -> str:
    """A worker parent's name in qless: ``<hostname>-<pid>``."""
    return f"{socket.gethostname()}-{pid}"


class Worker(Reserving, SignalHandling):
    """A qless worker parent: ``Worker(["foo", "bar"]).work()`` runs until told to stop.

    ``Worker(...)`` makes the run mode ``fork_per_job`` asks for: a ForkingWorker (a child per
    job, the default) or an InProcessWorker. It takes the worker options of options.py, checked
    as every entry checks them, and:

    redis_url     default $QLESS_URL, $REDIS_URL, redis://localhost:6379/0
    watch_parent  pid of the process that forked this one; exit (after the job) when it is gone
    kill_grace    seconds between SIGTERM and SIGKILL when a job child must die
    appname       shown in log lines
    redis_options keyword arguments for redis-py (socket timeouts ...)
    state_path, will_path, notes_fd, pause, retire, metrics: the pool's (presence.py, will.py,
                  notes.py)

    The exit status is 0, or RECYCLED when the worker stopped for --max-jobs or --max-memory.
    """

    fork_per_job = True  # the run mode's

    def __new__(cls, *args: Any, fork_per_job: Optional[bool] = None, **kwargs: Any) -> Worker:
        if cls is Worker:
            from .forking import ForkingWorker
            from .inprocess import InProcessWorker

            cls = InProcessWorker if fork_per_job is False else ForkingWorker
        elif fork_per_job is not None and fork_per_job != cls.fork_per_job:
            raise ValueError(
                f"{cls.__name__} is the run mode fork_per_job={cls.fork_per_job}; "
                f"Worker(..., fork_per_job={fork_per_job}) makes the other"
            )
        return super().__new__(cls)

    def __init__(
        self,
        queues: Sequence[str],
        redis_url: Optional[str] = None,
        *,
        fork_per_job: Optional[bool] = None,  # chose the class (__new__)
        interval: float = 5.0,
        reserver: str = "ordered",
        prefetch: Optional[int] = None,
        job_timeout: Optional[float] = None,
        allow_modules: Optional[Sequence[str]] = None,
        max_jobs: Optional[int] = None,
        max_jobs_jitter: int = 0,
        max_memory: Optional[int] = None,
        graceful_timeout: Optional[float] = None,
        watch_parent: Optional[int] = None,
        kill_grace: float = 5.0,
        appname: Optional[str] = None,
        redis_options: Optional[dict[str, Any]] = None,
        state_path: Optional[str] = None,
        will_path: Optional[str] = None,
        notes_fd: Optional[int] = None,
        pause: Optional[PauseFlag] = None,
        retire: Optional[RetireSlots] = None,
        metrics: bool = False,
    ):
        if not queues:
            raise ValueError("a worker needs at least one queue")
        check = options.check  # the same ranges as every entry's
        self.queues = list(queues)
        self.redis_url = redis_url or default_redis_url()
        self.interval = check("interval", interval)
        self.reserver = make_reserver(reserver, self.queues)
        self.prefetch = Prefetch(check("prefetch", prefetch))
        self.job_timeout = check("job_timeout", job_timeout)
        self.limits = Limits(
            check("max_jobs", max_jobs), check("max_jobs_jitter", max_jobs_jitter),
            check("max_memory", max_memory), check("graceful_timeout", graceful_timeout),
        )  # fmt: skip
        # None: $QLESS_POOL_ALLOW_MODULES, if set; empty: any job class may run.
        self.allow_modules = check_allowed_modules(
            default_allowed_modules() if allow_modules is None else allow_modules
        )
        self.watch_parent = watch_parent
        self.kill_grace = check("kill_grace", kill_grace)
        self.appname = appname
        # The worker's own calls time out soon (a stalled Redis must not hide a signal for
        # long); the job's client waits longer. redis_options override both.
        self.redis_options = {
            "socket_connect_timeout": CONTROL_TIMEOUT,
            "socket_timeout": CONTROL_TIMEOUT,
            **(redis_options or {}),
        }
        self.job_redis_options = {
            "socket_connect_timeout": CONTROL_TIMEOUT,
            "socket_timeout": JOB_SOCKET_TIMEOUT,
            **(redis_options or {}),
        }
        self.state_path, self.will_path, self.metrics = state_path, will_path, metrics
        self.notes = NoteTaker(notes_fd)
        self.pause = pause
        self.retire = retire
        self.pid = os.getpid()
        self.name = worker_name(self.pid)
        self.client: Optional[qless.Client] = None
        # What the loop acts on. Signal handlers touch none of it: they only wake the loop.
        self.stopping = False
        self.terminating = False  # TERM/INT: held jobs go back, nothing more runs
        self.paused = pause.get() if pause is not None else False
        self.holding = Holding()  # popped and not started (several at once in process)
        self.will: Optional[Will] = None
        self.settler = Settler(self.name)
        self.outage = Outage(log)
        self.subscriptions = Subscriptions(f"ql:w:{self.name}")
        self.presence = Presence()
        self.next_poll = 0.0
        self.next_card = 0.0  # monotonic: when to write its card for the pools page again
        self.started = time.time()
        self.jobs_done = 0
        self.up = False  # Redis answered: said to the manager once (notes.py)
        self.began = False  # a job: said to the manager once
        self.recycling: Optional[str] = None  # why this worker stops to be replaced
        self.retired_idle = False  # WINCH while idle: the pool scaled down
        self.stop_deadline: Optional[float] = None  # monotonic: --graceful-timeout
        self._wakeup_r = self._wakeup_w = -1
        self._saved_handlers: dict[int, Any] = {}
        # _nothing_waits's poll of the wakeup pipe and the pubsub socket, made once for them.
        self._between_jobs: tuple[tuple[Optional[int], ...], Any] = ((), None)

    def effective_options(self) -> dict[str, Any]:
        """The worker options (options.py) as this worker holds them."""
        return effective_options(self)

    # --- the loop -------------------------------------------------------------------------------

    def work(self) -> int:
        """Run until QUIT (after the current job), TERM/INT, or the parent's death. Returns 0,
        or RECYCLED when it stopped for --max-jobs or --max-memory, or IDLE_RETIRED when its
        pool scaled down (WINCH while idle)."""
        self.pid = os.getpid()
        self.name = worker_name(self.pid)
        self.started = time.time()
        if not logger.handlers and not logging.getLogger().handlers:
            logs.configure("INFO")  # a bare Worker(...).work(): say what it does
        if self.will_path:
            try:
                self.will = Will(self.will_path, self.name)
            except OSError as error:  # best effort, as the state: jobs come first
                log.warning("no will (its jobs wait for their locks if it dies): %s", error)
        self.settler = Settler(self.name, self.presence.observe, self.will)
        self.subscriptions = Subscriptions(f"ql:w:{self.name}")
        set_role("worker", self.appname)
        self.presence.open(self.state_path, self.metrics)
        self.client = connect(self.redis_url, self.name, **self.redis_options)
        self._install_signal_handlers()
        self._start_mode()
        self._unblock_signals()
        log.info(
            "worker %s started on %s (%s, %s, polling every %gs)", self.name,
            ",".join(self.queues), "a child per job" if self.fork_per_job else "jobs in process",
            self.reserver.name, self.interval,
        )  # fmt: skip
        log.debug("worker options: %s", json.dumps(self.effective_options(), sort_keys=True))
        clean = False
        try:
            while not self._finished():
                self._turn()
            clean = True
        finally:
            self._shut_down(clean)
        if self.retired_idle:
            return IDLE_RETIRED
        return RECYCLED if self.recycling else 0

    def _finished(self) -> bool:
        if not self.stopping or self._lingering():
            return False
        if self.holding and not self.terminating and self.outage.since is None:
            return False  # QUIT: what it holds runs first (Redis willing)
        # Settle what is owed first; during an outage, give up (the jobs' locks will expire).
        return not self.settler or self.outage.since is not None

    def _turn(self) -> None:
        self._handle_signals()
        self._check_parent()
        now = time.monotonic()
        self._supervise(now)
        self._check_graceful_deadline(now)
        if self.outage.ready(now):
            try:
                self._talk_to_redis(now)
            except Exception as error:
                if not redis_is_down(error):
                    raise
                self.subscriptions.close()
                # Deaf to puts until it listens again, which it does on its next look at the
                # queues: that look comes first once Redis answers, not an interval later.
                self.next_poll = 0.0
                self.outage.failed(time.monotonic(), error)
            else:
                if not self.up:
                    # The title says "Waiting" before the manager hears UP and acts on it (a
                    # reload lets the old workers go once the new ones are up).
                    self._update_title()
                    self.up = True
                    self.notes.say(UP)
        self._update_title()
        self._wait()

    def _talk_to_redis(self, now: float) -> None:
        """Everything that needs Redis, in order: events, heartbeats, settling, reserving."""
        assert self.client is not None
        self._handle_events(self.subscriptions.ensure(self.client) + self.subscriptions.read())
        self.outage.recovered(time.monotonic())
        if now >= self.next_card:  # for the dashboard's pools page (ops/pools.py)
            pools.write_card(self.client.redis, pools.card_for(self))
            self.next_card = now + pools.REFRESH
        if not self._may_pop():
            self.subscriptions.listen_for_puts(False)
        self._heartbeat_running(now)
        self.holding.heartbeat(self.client, self.name, now)
        if self.terminating and self.holding:
            self.holding.give_back(self.client)  # TERM/INT: returned unstarted, no retry spent
        self.settler.send_now(self.client)
        if self.settler.batched and self._completes_due(now):
            self.settler.send_with(self.client, [])  # no pop to wait for: a lock is due
        if self._may_run_held():
            self._run_held()
        elif self._may_pop() and self.next_poll <= time.monotonic():
            self._reserve_and_run()
        elif self.settler.batched and not self._may_pop():
            self.settler.send_with(self.client, [])
        # Whatever arrived meanwhile (reading may have buffered it, which poll cannot see).
        self._handle_events(self.subscriptions.read())

    def _may_pop(self) -> bool:
        """Take a new job: nothing running, nothing held, not paused, not stopping."""
        return not self._busy() and not self.holding and not self.paused and not self.stopping

    def _may_run_held(self) -> bool:
        return bool(self.holding) and not self._busy() and not self.terminating

    def _nothing_waits(self) -> bool:
        """Whether the next held job is all the loop has to do: no signal and no event has come,
        no heartbeat or complete is due, nothing is owed at once, the worker's parent lives,
        and the worker is not stopping, paused or in an outage."""
        if self.stopping or self.paused or self.outage.since is not None or self.settler.now:
            return False
        if not self._may_run_held() or not self.subscriptions.drained:
            return False
        if self.watch_parent is not None and os.getppid() != self.watch_parent:
            return False
        now = time.monotonic()
        soonest = self.holding.next_heartbeat()
        if (soonest is not None and soonest <= now) or self._completes_due(now):
            return False
        if now >= self.next_card:
            return False
        fds = (self._wakeup_r, self.subscriptions.fileno())
        if fds != self._between_jobs[0]:  # (the pubsub connection is a new one)
            poller = select.poll()
            for fd in fds:
                if fd is not None:
                    poller.register(fd, select.POLLIN)
            self._between_jobs = (fds, poller)
        return not self._between_jobs[1].poll(0)

    def _completes_due(self, now: float) -> bool:
        due = self.settler.complete_due()
        return due is not None and now >= due

    def _wait(self) -> None:
        if self._finished():
            return
        now = time.monotonic()
        wake = [now + PARENT_CHECK_INTERVAL, *self._wake_times(now)]
        if self.outage.since is not None:
            wake.append(self.outage.retry_at)
        else:
            if self._may_pop():
                wake.append(self.next_poll)
            if self.settler.now or self._may_run_held() or (self.terminating and self.holding):
                wake.append(now)
            for due in (self.settler.complete_due(), self.holding.next_heartbeat()):
                if due is not None:
                    wake.append(due)
        deadline = self.stop_deadline
        if deadline is not None and deadline > now and not self.terminating:
            wake.append(deadline)  # once passed it is acted on, not waited for
        timeout = min(wake) - now
        if timeout <= 0:
            return  # something is due now: the next turn reads the pipes anyway, unblocked
        poller = select.poll()
        pubsub_fd = self.subscriptions.fileno()
        for fd in (self._wakeup_r, pubsub_fd, *self._wake_fds()):
            if fd is not None:
                poller.register(fd, select.POLLIN)
        poller.poll(timeout * 1000)

    # --- a run's end, limits --------------------------------------------------------------------

    def _finish_job(self, run: JobRun) -> None:
        """A job's run has ended: settle it as settling.py says; recycle if a limit says so.
        A run the worker cut short (TERM, USR1, a graceful stop's deadline, qless taking the
        job away) is not a job done: its job is handed back, for another run."""
        if run.kill_reason is None or run.timed_out:
            self.jobs_done += 1
        settlement = settlement_for(run, self.name, self.job_timeout)
        if settlement is not None:
            self.settler.add(settlement)
        else:
            self.presence.observe(run.job, settled_outcome(run.report), run.report.seconds)
        why = self.limits.worker_done(self.jobs_done)
        if why and not (self.recycling or self.stopping):
            # Said as it exits, after what it owes for its last job (a complete may wait for
            # the next turn): stop gracefully, to be replaced (a recycle, not a failure).
            self.recycling = why
            self._stop_gracefully()

    # --- titles and the end ---------------------------------------------------------------------

    def _update_title(self) -> None:
        if self._show_busy():
            return
        if self.paused:
            self.presence.title(proctitle.paused())
            self._record("paused")
        elif not self.holding:
            self.presence.title(proctitle.waiting(self.queues))
            self._record("stopping" if self.stopping else "waiting")

    def _record(self, state: str, job: Optional[dict[str, Any]] = None, started: float = 0.0,
                child: Optional[int] = None) -> None:  # fmt: skip
        down = (0.0, "")
        if self.outage.since is not None:  # monotonic -> epoch
            down = (time.time() - (time.monotonic() - self.outage.since), self.outage.error or "")
        self.presence.record(state, job, started, jobs_done=self.jobs_done, child=child,
                             standby=self._standby_pid(), held=len(self.holding),
                             redis_down=down)  # fmt: skip

    def _shut_down(self, clean: bool) -> None:
        """``clean``: the loop ended as it should (not by an exception): then nothing is left
        for a will to tell, and it is removed."""
        self._end_mode()
        self.presence.stopping()
        if clean:  # then only an outage can have left anything unsettled
            self.settler.abandon()
            for held in self.holding:
                log.warning(
                    "%s is left held: Redis is unreachable, so its lock will expire and qless "
                    "will give it to another worker", describe_job(held.job),
                )  # fmt: skip
        elif self.will is not None:
            log.error("the worker is exiting on an error: the manager's settler settles its "
                      "jobs, as its will says")  # fmt: skip
        self.subscriptions.close()
        if self.client is not None and self.outage.since is None:
            try:
                self.client("worker.deregister", self.name)
                pools.take_card_away(self.client.redis, self.name)
            except (*REDIS_DOWN, QlessException):
                pass
        self._restore_signal_handlers()
        if self.will is not None:
            self.will.close(remove=clean)
        if self.recycling:
            log.info("worker %s recycling: %s", self.name, self.recycling)
        log.info("worker %s exiting after %d job(s)", self.name, self.jobs_done)
