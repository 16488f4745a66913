"""The worker parent: the loop that reserves jobs, runs them, and settles them.

A worker parent is one qless worker, named ``<hostname>-<pid>``, serving a list of queues. It is
single-threaded: one loop waits (``poll``) on its signal wakeup pipe, its pubsub socket and its
job child's report pipe, and each turn does the next due thing::

    signals -> parent gone? -> children: reap, read the report, heartbeat, timeout, kill
            -> Redis: events, heartbeats, settle, reserve and start a job -> title -> standby
            -> wait

The life of a job, one step per module::

    reservation.py  pop it (the first of the queues with a job; several at once in-process)
    jobchild.py     hand it to the standby child forked ahead (or run it in this process),
    running.py      which runs qless-py's Job.process and reports how it went
    settling.py     send qless what the run calls for: nothing, complete (with the next pop),
                    a replayed outcome, fail (job timeout) or retry (<queue>-DirtyExit)

Beside them: events.py (what qless publishes), limits.py (--max-jobs, --max-memory,
--graceful-timeout), state.py (the record qless-pool status reads).

While a job runs the worker heartbeats it and kills its child when qless says the job was taken
away (``lock_lost``, ``canceled``, or ``put`` to another queue on ``ql:w:<name>``). While idle it
listens to ``ql:log`` for puts to its queues, so a new job starts at once rather than at the
next poll (the poll still finds delayed and recurring jobs). Redis going away is an *outage*:
logged once, retried with a capped backoff, and ridden out.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import socket
import time
from collections.abc import Sequence
from typing import Any, Optional

import qless
from qless.exceptions import QlessException

from .. import lifeline, logs, options, proctitle
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
from ..notes import BEGAN, NoteTaker, PauseFlag
from ..ops.metrics import JobMeter
from ..ops.state import WorkerSlot
from .events import Subscriptions
from .jobchild import Children, ChildSetup
from .limits import MEMORY_CHECK_INTERVAL, RECYCLED, Limits
from .reservation import (
    HeldJob,
    Holding,
    Prefetch,
    check_allowed_modules,
    class_allowed,
    default_allowed_modules,
    make_reserver,
)
from .running import InProcess, JobClient, Keeper, describe_job
from .settling import Settler, settled_outcome, settlement_for
from .will import Will

__all__ = ["HANDLED_SIGNALS", "Worker"]

log = logger.getChild("worker")

#: Signals the worker parent acts on (DESIGN.md "Worker parent signals"); SIGCHLD wakes it when
#: a job child exits.
HANDLED_SIGNALS = (
    signal.SIGQUIT,
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGCONT,
    signal.SIGCHLD,
)
#: How often the worker wakes at least, to notice that the process that forked it is gone.
PARENT_CHECK_INTERVAL = 1.0


def worker_name(pid: int) -> str:
    """A worker parent's name in qless: ``<hostname>-<pid>``."""
    return f"{socket.gethostname()}-{pid}"


# --- the worker parent --------------------------------------------------------------------------


class Worker:
    """A qless worker parent: ``Worker(["foo", "bar"]).work()`` runs until told to stop.

    queues        queue names in priority order
    redis_url     default $QLESS_URL, $REDIS_URL, redis://localhost:6379/0
    interval      seconds between polls while idle (a put to one of the queues wakes it at once)
    reserver      "ordered", "round-robin" or "shuffled-round-robin"
    fork_per_job  run each job in a child (default), forked ahead; False runs jobs in this
                  process
    prefetch      jobs popped at once when they run in this process (default: adaptive)
    job_timeout   seconds a job may run before its child is killed and the job failed
    watch_parent  pid of the process that forked this one; exit (after the job) when it is gone
    kill_grace    seconds between SIGTERM and SIGKILL when a job child must die
    allow_modules module prefixes a job's class must be in, else the job is failed as
                  <queue>-ForbiddenClass before anything is imported (default:
                  $QLESS_POOL_ALLOW_MODULES; empty: any class)
    max_jobs      exit (to be replaced) after this many jobs, plus a random number from 0 to
                  max_jobs_jitter, so that workers do not all restart at once
    max_memory    megabytes: exit (to be replaced) when this process's RSS is above it after a
                  job; a job child whose own memory goes above it is killed, its job handed back
    graceful_timeout  seconds a job may go on running once the worker is told to stop
                  gracefully (QUIT, parent gone, recycling); then it is killed and handed back
    state_path    the worker's record for qless-pool status (state.py)
    will_path     where it keeps its will: what a helper settles if it dies (will.py)
    notes_fd      the pipe its notes to the manager go to (notes.py)
    pause         the pool's pause, shared with the manager (notes.py): the worker starts
                  paused if it is in force, and follows it when USR2 and CONT come together
    appname       shown in log lines
    redis_options keyword arguments for redis-py (socket timeouts ...)

    The exit status is 0, or RECYCLED when the worker stopped for --max-jobs or --max-memory.
    """

    def __init__(
        self,
        queues: Sequence[str],
        redis_url: Optional[str] = None,
        *,
        interval: float = 5.0,
        reserver: str = "ordered",
        fork_per_job: bool = True,
        prefetch: Optional[int] = None,
        job_timeout: Optional[float] = None,
        watch_parent: Optional[int] = None,
        kill_grace: float = 5.0,
        appname: Optional[str] = None,
        redis_options: Optional[dict[str, Any]] = None,
        allow_modules: Optional[Sequence[str]] = None,
        max_jobs: Optional[int] = None,
        max_jobs_jitter: int = 0,
        max_memory: Optional[int] = None,
        graceful_timeout: Optional[float] = None,
        state_path: Optional[str] = None,
        will_path: Optional[str] = None,
        notes_fd: Optional[int] = None,
        pause: Optional[PauseFlag] = None,
        metrics: bool = False,
    ):
        if not queues:
            raise ValueError("a worker needs at least one queue")
        # The same ranges as every entry's (options.py): a Worker made by hand, or by
        # `invoke qless.work`, refuses what the command line refuses.
        interval = options.check("interval", interval)
        job_timeout = options.check("job_timeout", job_timeout)
        kill_grace = options.check("kill_grace", kill_grace)
        prefetch = options.check("prefetch", prefetch)
        max_jobs = options.check("max_jobs", max_jobs)
        max_jobs_jitter = options.check("max_jobs_jitter", max_jobs_jitter)
        max_memory = options.check("max_memory", max_memory)
        graceful_timeout = options.check("graceful_timeout", graceful_timeout)
        self.queues = list(queues)
        self.redis_url = redis_url or default_redis_url()
        self.interval = interval
        self.reserver = make_reserver(reserver, self.queues)
        self.fork_per_job = fork_per_job
        self.prefetch = Prefetch(prefetch)
        self.job_timeout = job_timeout
        self.limits = Limits(max_jobs, max_jobs_jitter, max_memory, graceful_timeout)
        self.state_path = state_path
        self.will_path = will_path
        self.will: Optional[Will] = None
        self.notes = NoteTaker(notes_fd)
        self.began = False  # a job: said to the manager once
        self.metrics = metrics
        self.watch_parent = watch_parent
        self.kill_grace = kill_grace
        self.appname = appname
        # None: $QLESS_POOL_ALLOW_MODULES, if set; empty: any job class may run.
        self.allow_modules = check_allowed_modules(
            default_allowed_modules() if allow_modules is None else allow_modules
        )
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
        self.pid = os.getpid()
        self.name = worker_name(self.pid)
        self.client: Optional[qless.Client] = None
        self.job_client: Optional[JobClient] = None
        # What the loop acts on. Signal handlers touch none of it: they only wake the loop.
        self.stopping = False
        self.terminating = False  # TERM/INT: held jobs go back, nothing more runs
        self.pause = pause
        self.paused = pause.get() if pause is not None else False
        self.children: Optional[Children] = None  # with a child per job
        self.in_process: Optional[InProcess] = None  # without
        self.keeper: Optional[Keeper] = None  # its Redis work while a job runs in process
        self.running_here: Optional[HeldJob] = None  # the job running in process
        self.holding = Holding()  # popped ahead (jobs in this process)
        self.settler = Settler(self.name)
        self.outage = Outage(log)
        self.subscriptions = Subscriptions(f"ql:w:{self.name}")
        self.next_poll = 0.0
        self.jobs_done = 0
        self.recycling: Optional[str] = None  # why this worker stops to be replaced
        self.stop_deadline: Optional[float] = None  # monotonic: --graceful-timeout
        self.slot: Optional[WorkerSlot] = None
        self.meter: Optional[JobMeter] = None
        self._wakeup_r = self._wakeup_w = -1
        self._saved_handlers: dict[int, Any] = {}
        self._title = ""

    def __repr__(self) -> str:
        return f"<Worker {self.name} {','.join(self.queues)}>"

    def effective_options(self) -> dict[str, Any]:
        """The worker options (options.py) as this worker holds them."""
        return {
            "interval": self.interval,
            "reserver": self.reserver.name,
            "fork_per_job": self.fork_per_job,
            "prefetch": self.prefetch.fixed,
            "job_timeout": self.job_timeout,
            "allow_modules": list(self.allow_modules),
            "max_jobs": self.limits.max_jobs,
            "max_jobs_jitter": self.limits.max_jobs_jitter,
            "max_memory": self.limits.max_memory_mb,
            "graceful_timeout": self.limits.graceful_timeout,
        }

    # --- the loop -------------------------------------------------------------------------------

    def work(self) -> int:
        """Run until QUIT (after the current job), TERM/INT, or the parent's death. Returns 0,
        or RECYCLED when it stopped for --max-jobs or --max-memory."""
        self.pid = os.getpid()
        self.name = worker_name(self.pid)
        if not logger.handlers and not logging.getLogger().handlers:
            logs.configure("INFO")  # a bare Worker(...).work(): say what it does
        if self.will_path:
            try:
                self.will = Will(self.will_path, self.name)
            except OSError as error:  # best effort, as the state: jobs come first
                log.warning("no will (its jobs wait for their locks if it dies): %s", error)
        self.settler = Settler(self.name, self._observe, self.will)
        self.subscriptions = Subscriptions(f"ql:w:{self.name}")
        set_role("worker", self.appname)
        if self.state_path:
            try:
                self.slot = WorkerSlot(self.state_path)
            except OSError as error:  # best effort, as the manager's state: jobs come first
                log.warning("no record for qless-pool status: %s", error)
            else:
                self.slot.update("starting")
        if self.metrics:
            self.meter = JobMeter()
        self.client = connect(self.redis_url, self.name, **self.redis_options)
        # The jobs' client, made once here. With a child per job it is never used here: each
        # child's first command opens a connection of its own (redis-py drops a pool it finds in
        # a forked process); building a client in every child cost about 1.5 ms of copy-on-write
        # faults. Jobs run in this process (--no-fork-per-job) use it here.
        self.job_client = connect(
            self.redis_url,
            self.name,
            client_class=JobClient,
            announce=not self.fork_per_job,
            **self.job_redis_options,
        )
        if not self.fork_per_job:
            self.in_process = InProcess(
                self.job_client, self.job_timeout, self.kill_grace, self.allow_modules
            )
            self.keeper = Keeper(self._keeper_due, self._tend)
        self._install_signal_handlers()
        if self.fork_per_job:
            own = (self._wakeup_r, self._wakeup_w, self.notes.fd, self.will and self.will.fd)
            setup = ChildSetup(
                parent_pid=self.pid,
                queues=tuple(self.queues),
                client=self.job_client,
                appname=self.appname,
                close_fds=tuple(fd for fd in own if fd is not None and fd >= 0),
                allow_modules=self.allow_modules,
                parent_signals=(*HANDLED_SIGNALS, signal.SIGALRM),
            )
            self.children = Children(setup, self.kill_grace)
        log.info(
            "worker %s started on %s (%s, %s, polling every %gs)",
            self.name,
            ",".join(self.queues),
            "a child per job" if self.fork_per_job else "jobs in process",
            self.reserver.name,
            self.interval,
        )
        log.debug("worker options: %s", json.dumps(self.effective_options(), sort_keys=True))
        clean = False
        try:
            while not self._finished():
                self._turn()
            clean = True
        finally:
            self._shut_down(clean)
        return RECYCLED if self.recycling else 0

    @property
    def child(self) -> Any:
        """The job child running a job, if any."""
        return self.children.running if self.children is not None else None

    def _finished(self) -> bool:
        if not self.stopping or self.children:
            return False
        if self.holding and not self.terminating and self.outage.since is None:
            return False  # QUIT: what it holds runs first (Redis willing)
        # Settle what is owed first; during an outage, give up (the jobs' locks will expire).
        return not self.settler or self.outage.since is not None

    def _turn(self) -> None:
        self._handle_signals()
        self._check_parent()
        now = time.monotonic()
        self._supervise_children(now)
        self._check_limits(now)
        if self.outage.ready(now):
            try:
                self._talk_to_redis(now)
            except Exception as error:
                if not redis_is_down(error):
                    raise
                self.subscriptions.close()
                self.outage.failed(time.monotonic(), error)
        self._update_title()
        if self.children is not None:
            self.children.keep_standby(self.stopping)
        self._wait()

    def _talk_to_redis(self, now: float) -> None:
        """Everything that needs Redis, in order: events, heartbeats, settling, reserving."""
        assert self.client is not None
        self._handle_events(self.subscriptions.ensure(self.client) + self.subscriptions.read())
        self.outage.recovered(time.monotonic())
        if not self._may_pop():
            self.subscriptions.listen_for_puts(False)
        self._heartbeat(now)
        if self.terminating and self.holding:
            self._give_back_held()
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
        return self.child is None and not self.holding and not self.paused and not self.stopping

    def _may_run_held(self) -> bool:
        return bool(self.holding) and self.child is None and not self.terminating

    def _completes_due(self, now: float) -> bool:
        due = self.settler.complete_due()
        return due is not None and now >= due

    def _wait(self) -> None:
        if self._finished():
            return
        now = time.monotonic()
        wake = [now + PARENT_CHECK_INTERVAL]
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
            wake.append(deadline)  # once passed it is acted on (_check_limits), not waited for
        if self.child is not None and self.limits.max_memory is not None:
            wake.append(self.child.memory_check_at)
        if self.children is not None:
            wake += self.children.wake_times(now, self.stopping, self.outage.since is None)
        timeout = min(wake) - now
        if timeout <= 0:
            return  # something is due now: the next turn reads the pipes anyway, unblocked
        child = self.child
        poller = select.poll()
        poller.register(self._wakeup_r, select.POLLIN)
        pubsub_fd = self.subscriptions.fileno()
        if pubsub_fd is not None:
            poller.register(pubsub_fd, select.POLLIN)
        if child is not None:
            poller.register(child.report_fd, select.POLLIN)
        poller.poll(timeout * 1000)

    # --- signals --------------------------------------------------------------------------------

    def _install_signal_handlers(self) -> None:
        # The handlers do nothing (but, for a job running in this process, stop it): Python's
        # C-level handler writes each signal's number to the wakeup pipe, which the loop reads.
        # So no signal is lost and none does the loop's work in a handler.
        self._wakeup_r, self._wakeup_w = os.pipe()
        for fd in (self._wakeup_r, self._wakeup_w):
            os.set_blocking(fd, False)
            os.set_inheritable(fd, False)
        # Put back at exit, for a process that runs a worker and then goes on (invoke qless.work).
        self._saved_handlers = {s: signal.getsignal(s) for s in (*HANDLED_SIGNALS, signal.SIGALRM)}
        signal.set_wakeup_fd(self._wakeup_w, warn_on_full_buffer=False)
        for signum in HANDLED_SIGNALS:
            signal.signal(signum, lifeline.wake_only)
        if self.in_process is not None:
            self.in_process.install()
            signal.signal(signal.SIGQUIT, self._quit_during_job)
        # The pool manager forks workers with these signals blocked, so that one sent between
        # the fork and this point waits for the handlers instead of killing the worker.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)

    def _quit_during_job(self, signum: int, frame: Any) -> None:
        # The loop handles QUIT once the job returns; a graceful timeout must start now.
        if self.in_process is not None and self.in_process.running:
            self._start_graceful_timeout()

    def _start_graceful_timeout(self) -> None:
        timeout = self.limits.graceful_timeout
        if timeout is not None and self.stop_deadline is None:
            self.stop_deadline = time.monotonic() + timeout
            if self.in_process is not None:
                self.in_process.stop_by(self.stop_deadline)

    def _handle_signals(self) -> None:
        try:
            data = os.read(self._wakeup_r, 4096)
        except BlockingIOError:
            return
        if signal.SIGUSR2 in data and signal.SIGCONT in data:
            # Pending at once, their order is lost (notes.py): the pool's pause decides, and
            # without a pool, the worker keeps working.
            paused = self.pause.get() if self.pause is not None else False
            log.info("USR2 and CONT came together: %s", "paused" if paused else "taking jobs")
            self.paused = paused
            if not paused:
                self.next_poll = 0.0
            data = bytes(s for s in data if s not in (signal.SIGUSR2, signal.SIGCONT))
        for signum in data:
            handler = getattr(self, f"handle_{signal.Signals(signum).name.lower()}", None)
            if handler is not None:
                handler()

    def handle_sigquit(self) -> None:
        if not self.stopping:
            log.info("QUIT: finishing the current job, then exiting")
        self._stop_gracefully()

    def _stop_gracefully(self) -> None:
        """Take no new job; the current one finishes (within --graceful-timeout, if given)."""
        self._start_graceful_timeout()
        self.stopping = True

    def handle_sigterm(self) -> None:
        log.info("TERM: stopping now")
        self._terminate("the worker was told to stop (SIGTERM)")

    def handle_sigint(self) -> None:
        log.info("INT: stopping now")
        self._terminate("the worker was told to stop (SIGINT)")

    def _terminate(self, reason: str) -> None:
        self.stopping = self.terminating = True
        self._kill_child(reason)

    def handle_sigusr1(self) -> None:
        log.info("USR1: killing the current job, if any")
        self._kill_child("the worker was told to kill it (SIGUSR1)")

    def _kill_child(self, reason: str) -> None:
        if self.children is not None:
            self.children.kill(reason)

    def handle_sigusr2(self) -> None:
        if not self.paused:
            log.info("USR2: paused; taking no new jobs until CONT")
        self.paused = True

    def handle_sigcont(self) -> None:
        if self.paused:
            log.info("CONT: taking jobs again")
        self.paused = False
        self.next_poll = 0.0

    def handle_sigchld(self) -> None:
        """Nothing to do here: the loop reaps its children on every turn."""

    def handle_sigalrm(self) -> None:
        """A job timeout in this process: already acted on, by the interrupt."""

    def _check_parent(self) -> None:
        if self.watch_parent is None or self.stopping:
            return
        if os.getppid() != self.watch_parent:
            log.warning(
                "the process that started this worker (%d) is gone; exiting after the current job",
                self.watch_parent,
            )
            self._stop_gracefully()

    # --- events from qless ----------------------------------------------------------------------

    def _handle_events(self, events: list[dict[str, Any]]) -> None:
        for event in events:
            self._handle_event(event)

    def _handle_event(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if event["channel"] == self.subscriptions.idle_channel:
            if kind == "put" and event.get("queue") in self.queues:
                self.next_poll = 0.0
            return
        if kind not in ("lock_lost", "canceled", "put"):
            return
        what = {"lock_lost": "lost its lock", "canceled": "was canceled", "put": "was moved"}[kind]
        jid = event.get("jid")
        child = self.child
        if child is not None and jid == child.jid:
            child.read_report()  # it may have said it settled the job itself: that is the news
            if child.settled is None and child.report is None:
                self._kill_child(f"the job {what}")
        elif jid and (held := self.holding.drop(jid)) is not None:
            log.warning("%s %s before it ran; it is not run here", describe_job(held), what)

    # --- reserving and starting a job -----------------------------------------------------------

    def _reserve_and_run(self) -> None:
        count = 1 if self.fork_per_job else self.prefetch.size
        jobs = self._pop(count)
        if not jobs and not self.subscriptions.listening_for_puts:
            # Listen for puts before one more look, so that a put after that look is heard.
            self._handle_events(self.subscriptions.listen_for_puts(True))
            jobs = self._pop(count)
        if not jobs:
            self.next_poll = time.monotonic() + self.interval
            return
        self.next_poll = 0.0
        log.debug("popped %d job(s) (asked for %d)", len(jobs), count)
        self.prefetch.popped(len(jobs))
        # Held first: if Redis goes away from here on, they are heartbeated, given back or run
        # once it is back, like any held job.
        self.holding.hold([HeldJob.popped(job) for job in jobs])
        self.subscriptions.listen_for_puts(False)  # busy: stop hearing every put of qless
        self._run_held()

    def _pop(self, count: int) -> list[dict[str, Any]]:
        """Pop up to ``count`` jobs from the first of the queues (in the reserver's order) that
        has any; the completes owed travel with the first pop."""
        assert self.client is not None
        for queue in self.reserver.order():
            [answer] = self.settler.send_with(self.client, [["pop", queue, self.name, count]])
            self.reserver.tried(queue)
            if isinstance(answer, QlessException):
                raise answer
            jobs = json.loads(answer)
            if jobs:
                return jobs
        return []

    def _run_held(self) -> None:
        held = self.holding.next()
        if held is not None:
            self._start(held)

    def _start(self, popped: HeldJob) -> None:
        if not class_allowed(popped.job["klass"], self.allow_modules):
            assert self.client is not None
            self.settler.forbid(self.client, popped.job, self.allow_modules)
            return
        if not self.began:
            self.began = True
            self.notes.say(BEGAN)
        if self.fork_per_job:
            self._start_child(popped)
        else:
            self._run_in_process(popped)

    def _give_back_held(self) -> None:
        """TERM/INT: return the jobs held but not started to their queue, retries intact."""
        assert self.client is not None
        self.holding.give_back(self.client)

    # --- a job in a child -----------------------------------------------------------------------

    def _start_child(self, popped: HeldJob) -> None:
        try:
            child = self.children.start(popped, self.job_timeout)
        except OSError as error:  # no fork (a pids limit, memory): not this job's fault
            log.warning("could not fork a child for %s (%s); giving it back to its queue",
                        describe_job(popped.job), error)  # fmt: skip
            self.holding.hold([popped])
            self._give_back_held()
            self.subscriptions.listen_for_puts(False)  # its own put must not wake it at once
            self.next_poll = time.monotonic() + self.interval
            return
        if self.will is not None:
            self.will.started(popped.job)
        log.debug("job child %d runs %s", child.pid, describe_job(popped.job))

    def _supervise_children(self, now: float) -> None:
        if self.children is None:
            return
        for run in self.children.supervise(now, self.job_timeout):
            child = run.child
            self._finish_job(
                child.job, run.report, run.status, child.kill_reason, child.timed_out,
                child.next_heartbeat,
            )  # fmt: skip

    def _heartbeat(self, now: float) -> None:
        """Heartbeat the running job and the held ones that are due."""
        assert self.client is not None
        child = self.child
        if child is not None and now >= child.next_heartbeat:
            child.next_heartbeat = now + child.heartbeat_every
            try:
                # No data argument: the job may have changed its data; ours is stale.
                self.client("heartbeat", child.jid, self.name)
            except QlessException as refused:
                if redis_is_down(refused):
                    raise  # a failover or a full Redis: an outage, not a refusal
                child.read_report()
                if child.kill_reason is None and child.settled is None and child.report is None:
                    self._kill_child(f"qless refused its heartbeat ({refused})")
        self.holding.heartbeat(self.client, self.name, now)

    # --- a job in this process ------------------------------------------------------------------

    def _run_in_process(self, popped: HeldJob) -> None:
        """--no-fork-per-job: run the job here. TERM, INT and USR1 interrupt it; QUIT waits."""
        assert self.in_process is not None
        if self.in_process.stop_requested:  # TERM or INT, not yet seen by the loop
            self.holding.put_back(popped)  # given back, unstarted, once the loop sees it
            return
        job = popped.job
        started_at = time.time()
        self._set_title(proctitle.processing(job["queue"], started_at))
        self._record_state("processing", job, started_at)
        self.running_here = popped
        if self.will is not None:
            self.will.started(job)
        assert self.keeper is not None
        with self.keeper.job_running():
            report, reason = self.in_process.run(job)
        self.running_here = None
        self.prefetch.ran(report["seconds"])
        if reason == "graceful":
            reason = self.limits.graceful_reason()
        timed_out = reason == "timeout"
        self._finish_job(job, report, None, reason, timed_out, popped.next_heartbeat)

    def _keeper_due(self) -> Optional[float]:
        """While a job runs in process: when a heartbeat or a complete owed is due."""
        running = self.running_here
        times = [
            t for t in (self.settler.complete_due(), self.holding.next_heartbeat()) if t is not None
        ]
        if running is not None:
            times.append(running.next_heartbeat)
        return min(times, default=None)

    def _tend(self, now: float) -> None:
        """While a job runs in process (in the keeper's thread): heartbeats, completes owed."""
        assert self.client is not None
        self.holding.heartbeat(self.client, self.name, now, self.running_here)
        if self._completes_due(now):
            self.settler.send_with(self.client, [])

    def _finish_job(
        self,
        job: Optional[dict[str, Any]],
        report: dict[str, Any],
        status: Optional[int],
        kill_reason: Optional[str],
        timed_out: bool,
        lock_due: float,
    ) -> None:
        """A job's run has ended: decide how it is settled (settling.py)."""
        if job is None:
            return
        self.jobs_done += 1
        settlement = settlement_for(
            job, report, status, kill_reason, timed_out, self.name, self.job_timeout, lock_due
        )
        if settlement is not None:
            self.settler.add(settlement)
        else:
            self._observe(job, settled_outcome(report), float(report.get("seconds") or 0.0))
        why = self.limits.worker_done(self.jobs_done)
        if why:
            self._recycle(why)

    def _observe(self, job: dict[str, Any], outcome: str, seconds: float) -> None:
        """One job's outcome, for the metrics: completed, failed, retried, moved, canceled."""
        if self.meter is not None:
            self.meter.finished(job["queue"], outcome, seconds)

    def _recycle(self, why: str) -> None:
        """Stop gracefully, to be replaced by the manager (a recycle, not a failure)."""
        if self.recycling or self.stopping:
            return
        self.recycling = why
        log.info("worker %s recycling: %s", self.name, why)
        self._stop_gracefully()

    def _check_limits(self, now: float) -> None:
        """The graceful stop's deadline, and the running job child's memory."""
        child = self.child
        deadline = self.stop_deadline
        if deadline is not None and now >= deadline and (child is not None or self.holding):
            self._terminate(self.limits.graceful_reason())
        if child is not None and now >= child.memory_check_at:
            child.memory_check_at = now + MEMORY_CHECK_INTERVAL
            reason = self.limits.child_over(child.pid)
            if reason:
                self._kill_child(reason)

    # --- titles and the end ---------------------------------------------------------------------

    def _update_title(self) -> None:
        child = self.child
        if child is not None:
            self._set_title(proctitle.forked(child.pid, child.started))
            self._record_state("processing", child.job, child.started)
        elif self.paused:
            self._set_title(proctitle.paused())
            self._record_state("paused")
        elif not self.holding:
            self._set_title(proctitle.waiting(self.queues))
            self._record_state("stopping" if self.stopping else "waiting")

    def _record_state(
        self, state: str, job: Optional[dict[str, Any]] = None, started: float = 0.0
    ) -> None:
        """The worker's record for qless-pool status (state.py)."""
        if self.slot is not None:
            standby = self.children.standby if self.children is not None else None
            child = self.child
            self.slot.record(
                state, job, started, self.jobs_done, child and child.pid,
                standby and standby.pid, len(self.holding),
            )  # fmt: skip

    def _set_title(self, title: str) -> None:
        if title != self._title:
            proctitle.set_title(title)
            self._title = title

    def _shut_down(self, clean: bool) -> None:
        """``clean``: the loop ended as it should (not by an exception): then nothing is left
        for a will to tell, and it is removed."""
        if self.children is not None:
            self.children.shut_down()
        if self.slot is not None:
            self.slot.update("stopping")
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
            except (*REDIS_DOWN, QlessException):
                pass
        signal.set_wakeup_fd(-1)
        for signum, handler in self._saved_handlers.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        for fd in (self._wakeup_r, self._wakeup_w):
            if fd >= 0:
                os.close(fd)
        self._wakeup_r = self._wakeup_w = -1
        if self.will is not None:
            self.will.close(remove=clean)
        log.info("worker %s exiting after %d job(s)", self.name, self.jobs_done)
