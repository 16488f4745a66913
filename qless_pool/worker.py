"""The worker: reserve a job from its queues in order, fork a child for it, supervise the child.

A worker parent is one qless worker, named ``<hostname>-<pid>``. It is single-threaded: one loop
waits (``poll``) on the signal wakeup pipe, its pubsub socket and the job child's report pipe,
and each turn of the loop does the next due thing::

    signals -> parent gone? -> job child: reap / heartbeat / timeout / kill -> settle jobs
            -> reserve a job and fork a child for it -> title -> wait

The life of one job::

    pop (first of the queues with a job) -> fork a child -> the child runs qless-py's
    Job.process, completes the job if the job function did not settle it, writes one report
    line on a pipe and exits -> the parent reaps it and *settles* the job: nothing to do if the
    child reported; otherwise, if qless still says the job is running here, the parent replays
    the outcome the child could not report (Redis was down), fails it (job timeout) or hands it
    back with ``retry`` (group ``<queue>-DirtyExit``). So a job is never left ``running`` with a
    dead owner, and an outcome is never reported twice: qless-core refuses complete, fail and
    retry from a worker that no longer holds the job.

While the child runs, the parent heartbeats the job and kills the child when qless says the job
was taken away (``lock_lost``, ``canceled``, or ``put`` to another queue on ``ql:w:<name>``).
While idle it listens to ``ql:log`` for puts to its queues, so a new job starts at once rather
than at the next poll (the poll still finds delayed and recurring jobs).

Redis going away is an *outage*: logged once, retried with a capped backoff, and the worker
carries on where it was when Redis answers again.
"""

from __future__ import annotations

import json
import os
import random
import re
import select
import signal
import socket
import sys
import time
import traceback
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn, Optional

import qless
from qless.exceptions import QlessException

from . import lifeline, proctitle
from .client import (
    CONTROL_TIMEOUT,
    JOB_SOCKET_TIMEOUT,
    REDIS_DOWN,
    Outage,
    connect,
    default_redis_url,
    redis_is_down,
)
from .logs import cap, logger, set_role

__all__ = [
    "RESERVERS",
    "JobClient",
    "Worker",
    "check_allowed_modules",
    "class_allowed",
    "default_allowed_modules",
    "make_reserver",
]

log = logger.getChild("worker")

#: Signals the worker parent acts on (DESIGN.md "Worker parent signals"); SIGCHLD wakes it when
#: the job child exits.
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
#: A report longer than this is cut (a pipe holds 64 KiB; the child must never block on it).
MAX_REPORT_BYTES = 48 * 1024


# --- which job classes may run ------------------------------------------------------------------

#: The job class allowlist from the environment (comma-separated module prefixes).
ALLOW_MODULES_VARIABLE = "QLESS_POOL_ALLOW_MODULES"
_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def default_allowed_modules(environ: Optional[dict[str, str]] = None) -> list[str]:
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


# --- reservers: the order in which a worker tries its queues ------------------------------------


class OrderedReserver:
    """The first queue in the list that has a job wins (the Ruby gem's default)."""

    def __init__(self, queues: Sequence[str]):
        self.queues = list(queues)

    def order(self) -> list[str]:
        return list(self.queues)

    def tried(self, queue: str) -> None:
        """Called after each pop attempt on ``queue``."""


class RoundRobinReserver(OrderedReserver):
    """Each attempt starts at the queue after the one tried last, so no queue starves."""

    def __init__(self, queues: Sequence[str]):
        super().__init__(queues)
        self.cursor = 0

    def order(self) -> list[str]:
        return self.queues[self.cursor :] + self.queues[: self.cursor]

    def tried(self, queue: str) -> None:
        self.cursor = (self.queues.index(queue) + 1) % len(self.queues)


class ShuffledRoundRobinReserver(RoundRobinReserver):
    """Round robin over an order shuffled once per worker, so workers start on different queues."""

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


# --- the job child's client ---------------------------------------------------------------------


class JobClient(qless.Client):
    """The job child's client: it notices the command that settles its job.

    complete, fail, retry, cancel, or a put of the job to another queue settle a job. Once one
    reached Redis the job is *settled* (even if qless refused it: then the job is no longer this
    worker's to settle). When Redis is down the command is kept as ``unreported``, for the worker
    parent to replay when Redis is back; the job's further attempts to settle are refused.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.track_job(None)

    def track_job(self, jid: Optional[str]) -> None:
        """Watch the commands that settle ``jid`` (None: watch nothing)."""
        self.jid = jid
        self.settled = False
        self.unreported: Optional[list[Any]] = None

    def _settles_job(self, command: str, args: tuple[Any, ...]) -> bool:
        if self.jid is None:
            return False
        if command in ("complete", "fail", "retry"):
            return bool(args) and args[0] == self.jid
        if command == "put":  # Job.move
            return len(args) > 1 and args[1] == self.jid
        if command == "cancel":
            return self.jid in args
        return False

    def __call__(self, command: str, *args: Any) -> Any:
        if command in ("fail", "retry"):
            args = _cap_message(command, args)
        if not self._settles_job(command, args):
            return super().__call__(command, *args)
        if self.unreported is not None:
            raise REDIS_DOWN[0]("Redis was unreachable; the job's outcome is kept for the worker")
        try:
            result = super().__call__(command, *args)
        except REDIS_DOWN:
            self.unreported = [command, *args]
            self.settled = True
            raise
        except QlessException:
            self.settled = True
            raise
        self.settled = True
        return result


# --- the worker parent's view of its job child --------------------------------------------------


@dataclass
class JobChild:
    """One forked job child, from fork to reap."""

    pid: int
    job: dict[str, Any]  # the job as qless popped it
    started: float  # epoch seconds, for titles
    report_fd: int
    heartbeat_every: float
    next_heartbeat: float  # monotonic
    deadline: Optional[float]  # monotonic; the job timeout
    kill_reason: Optional[str] = None
    timed_out: bool = False
    escalate_at: Optional[float] = None  # monotonic; SIGKILL if still alive then
    report: bytes = b""

    @property
    def jid(self) -> str:
        return self.job["jid"]

    @property
    def queue(self) -> str:
        return self.job["queue"]


def describe_job(job: dict[str, Any]) -> str:
    return f"job {job['jid']} ({job['klass']}) from {job['queue']}"


@dataclass
class Settlement:
    """A job whose child ended without reporting, and what to do about it."""

    job: dict[str, Any]
    command: list[Any]  # the qless command that settles it, e.g. ["retry", jid, queue, ...]
    reason: str


@dataclass
class Subscriptions:
    """The worker's pubsub connection: ``ql:w:<name>`` always, ``ql:log`` while idle."""

    worker_channel: str
    pubsub: Any = None
    idle_channel: str = "ql:log"
    channels: set[str] = field(default_factory=set)

    def fileno(self) -> Optional[int]:
        connection = getattr(self.pubsub, "connection", None)
        sock = getattr(connection, "_sock", None)
        return sock.fileno() if sock is not None else None

    @property
    def listening_for_puts(self) -> bool:
        return self.idle_channel in self.channels

    def ensure(self, client: qless.Client) -> list[dict[str, Any]]:
        """Be subscribed to the worker's own channel; returns events read on the way."""
        if self.pubsub is None:
            self.pubsub = client.redis.pubsub()
            self.channels = set()
        return self._subscribe(self.worker_channel)

    def listen_for_puts(self, on: bool) -> list[dict[str, Any]]:
        """Subscribe to ``ql:log`` (idle) or leave it (busy: a busy worker needs none of it)."""
        if on:
            return self._subscribe(self.idle_channel)
        if self.listening_for_puts:
            self.pubsub.unsubscribe(self.idle_channel)  # the confirmation is skipped by read()
            self.channels.discard(self.idle_channel)
        return []

    def _subscribe(self, channel: str) -> list[dict[str, Any]]:
        if channel in self.channels:
            return []
        self.pubsub.subscribe(channel)
        # Wait until Redis confirms, so that whatever is published after the next pop is heard.
        events = self._read_until_subscribed({channel})
        self.channels.add(channel)
        return events

    def _read_until_subscribed(self, channels: set[str]) -> list[dict]:
        events: list[dict[str, Any]] = []
        pending = set(channels)
        deadline = time.monotonic() + CONTROL_TIMEOUT
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:  # a stalled Redis: an outage like any other call that times out
                raise REDIS_DOWN[1](f"Redis did not confirm SUBSCRIBE {', '.join(pending)}")
            message = self.pubsub.get_message(timeout=left)
            if message is None:
                continue
            if message["type"] == "subscribe":
                pending.discard(message["channel"])
            else:
                events += self._event(message)
        return events

    def read(self) -> list[dict[str, Any]]:
        """Every event that has arrived, without blocking."""
        events: list[dict[str, Any]] = []
        if self.pubsub is None:
            return events
        while True:
            # Not ignore_subscribe_messages: it returns None for a confirmation even when more
            # messages are buffered, and None must mean "nothing left" here.
            message = self.pubsub.get_message(timeout=0)
            if message is None:
                return events
            events += self._event(message)

    def _event(self, message: dict[str, Any]) -> list[dict[str, Any]]:
        if message["type"] != "message":
            return []
        try:
            event = json.loads(message["data"])
        except (TypeError, ValueError):
            return []
        if not isinstance(event, dict):
            return []
        event["channel"] = message["channel"]
        return [event]

    def close(self) -> None:
        if self.pubsub is not None:
            try:
                self.pubsub.close()
            except Exception:  # a broken connection is what we are dropping
                pass
        self.pubsub = None
        self.channels = set()


# --- the worker parent --------------------------------------------------------------------------


class Worker:
    """A qless worker parent: ``Worker(["foo", "bar"]).work()`` runs until told to stop.

    queues        queue names in priority order
    redis_url     default $QLESS_URL, $REDIS_URL, redis://localhost:6379/0
    interval      seconds between polls while idle (a put to one of the queues wakes it at once)
    reserver      "ordered", "round-robin" or "shuffled-round-robin"
    fork_per_job  fork a child per job (default); False runs jobs in this process
    job_timeout   seconds a job may run before its child is killed and the job failed
    watch_parent  pid of the process that forked this one; exit (after the job) when it is gone
    kill_grace    seconds between SIGTERM and SIGKILL when a job child must die
    allow_modules module prefixes a job's class must be in, else the job is failed as
                  <queue>-ForbiddenClass before anything is imported (default:
                  $QLESS_POOL_ALLOW_MODULES; empty: any class)
    redis_options keyword arguments for redis-py (socket timeouts ...)
    """

    def __init__(
        self,
        queues: Sequence[str],
        redis_url: Optional[str] = None,
        *,
        interval: float = 5.0,
        reserver: str = "ordered",
        fork_per_job: bool = True,
        job_timeout: Optional[float] = None,
        watch_parent: Optional[int] = None,
        kill_grace: float = 5.0,
        appname: Optional[str] = None,
        redis_options: Optional[dict[str, Any]] = None,
        allow_modules: Optional[Sequence[str]] = None,
    ):
        if not queues:
            raise ValueError("a worker needs at least one queue")
        if interval <= 0:
            raise ValueError("interval must be positive")
        if job_timeout is not None and job_timeout <= 0:
            raise ValueError("job_timeout must be positive")
        self.queues = list(queues)
        self.redis_url = redis_url or default_redis_url()
        self.interval = interval
        self.reserver = make_reserver(reserver, self.queues)
        self.fork_per_job = fork_per_job
        self.job_timeout = job_timeout
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
        self.name = f"{socket.gethostname()}-{self.pid}"
        self.client: Optional[qless.Client] = None
        self.job_client: Optional[JobClient] = None
        # What the loop acts on. Signal handlers touch none of it: they only wake the loop.
        self.stopping = False
        self.paused = False
        self.child: Optional[JobChild] = None
        self.pending: deque[Settlement] = deque()
        self.outage = Outage(log)
        self.subscriptions = Subscriptions(f"ql:w:{self.name}")
        self.next_poll = 0.0
        self.jobs_done = 0
        self._wakeup_r = self._wakeup_w = -1
        self._title = ""

    def __repr__(self) -> str:
        return f"<Worker {self.name} {','.join(self.queues)}>"

    # --- the loop -------------------------------------------------------------------------------

    def work(self) -> int:
        """Run until QUIT (after the current job), TERM/INT, or the parent's death. Returns 0."""
        self.pid = os.getpid()
        self.name = f"{socket.gethostname()}-{self.pid}"
        self.subscriptions = Subscriptions(f"ql:w:{self.name}")
        set_role("worker", self.appname)
        self._install_signal_handlers()
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
        log.info(
            "worker %s started on %s (%s, %s)",
            self.name,
            ",".join(self.queues),
            "fork per job" if self.fork_per_job else "jobs in process",
            type(self.reserver).__name__,
        )
        try:
            while not self._finished():
                self._turn()
        finally:
            self._shut_down()
        return 0

    def _finished(self) -> bool:
        # Settle what is pending first; during an outage, give up (the job's lock will expire).
        unsettled = bool(self.pending) and self.outage.since is None
        return self.stopping and self.child is None and not unsettled

    def _turn(self) -> None:
        self._handle_signals()
        self._check_parent()
        now = time.monotonic()
        if self.child is not None:
            self._supervise_child(now)
        if self.outage.ready(now):
            try:
                self._talk_to_redis(now)
            except Exception as error:
                if not redis_is_down(error):
                    raise
                self.subscriptions.close()
                self.outage.failed(time.monotonic(), error)
        self._update_title()
        self._wait()

    def _talk_to_redis(self, now: float) -> None:
        """Everything that needs Redis, in order: events, heartbeat, settling, reserving."""
        assert self.client is not None
        self._handle_events(self.subscriptions.ensure(self.client) + self.subscriptions.read())
        self.outage.recovered(time.monotonic())
        if not self._taking_jobs():
            self.subscriptions.listen_for_puts(False)
        if self.child is not None and now >= self.child.next_heartbeat:
            self._heartbeat(self.child)
        while self.pending:
            self._settle(self.pending[0])
            self.pending.popleft()
        if self._taking_jobs() and self.next_poll <= time.monotonic():
            self._reserve_and_run()
        # Whatever arrived meanwhile (reading may have buffered it, which poll cannot see).
        self._handle_events(self.subscriptions.read())

    def _taking_jobs(self) -> bool:
        return self.child is None and not self.paused and not self.stopping

    def _wait(self) -> None:
        if self._finished():
            return
        now = time.monotonic()
        wake = [now + PARENT_CHECK_INTERVAL]
        if self.outage.since is not None:
            wake.append(self.outage.retry_at)
        elif self._taking_jobs():
            wake.append(self.next_poll)
        if self.pending and self.outage.since is None:
            wake.append(now)
        child = self.child
        if child is not None:
            wake.append(child.next_heartbeat)
            if child.deadline is not None and child.kill_reason is None:
                wake.append(child.deadline)
            if child.escalate_at is not None:
                wake.append(child.escalate_at)
        poller = select.poll()
        poller.register(self._wakeup_r, select.POLLIN)
        pubsub_fd = self.subscriptions.fileno()
        if pubsub_fd is not None:
            poller.register(pubsub_fd, select.POLLIN)
        timeout = max(0.0, min(wake) - now)
        poller.poll(timeout * 1000)

    # --- signals --------------------------------------------------------------------------------

    def _install_signal_handlers(self) -> None:
        # The handlers do nothing; Python's C-level handler writes each signal's number to the
        # wakeup pipe, which the loop reads. So no signal is lost and none does work in a handler.
        self._wakeup_r, self._wakeup_w = os.pipe()
        for fd in (self._wakeup_r, self._wakeup_w):
            os.set_blocking(fd, False)
            os.set_inheritable(fd, False)
        signal.set_wakeup_fd(self._wakeup_w, warn_on_full_buffer=False)
        for signum in HANDLED_SIGNALS:
            signal.signal(signum, _record_signal)
        # The pool manager forks workers with these signals blocked, so that one sent between
        # the fork and this point waits for the handlers instead of killing the worker.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)

    def _handle_signals(self) -> None:
        try:
            data = os.read(self._wakeup_r, 4096)
        except BlockingIOError:
            return
        for signum in data:
            handler = getattr(self, f"handle_{signal.Signals(signum).name.lower()}", None)
            if handler is not None:
                handler()

    def handle_sigquit(self) -> None:
        if not self.stopping:
            log.info("QUIT: finishing the current job, then exiting")
        self.stopping = True

    def handle_sigterm(self) -> None:
        log.info("TERM: stopping now")
        self.stopping = True
        self._kill_child("the worker was told to stop (SIGTERM)")

    def handle_sigint(self) -> None:
        log.info("INT: stopping now")
        self.stopping = True
        self._kill_child("the worker was told to stop (SIGINT)")

    def handle_sigusr1(self) -> None:
        log.info("USR1: killing the current job, if any")
        self._kill_child("the worker was told to kill it (SIGUSR1)")

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
        """Nothing to do here: the loop reaps its child on every turn."""

    def _check_parent(self) -> None:
        if self.watch_parent is None or self.stopping:
            return
        if os.getppid() != self.watch_parent:
            log.warning(
                "the process that started this worker (%d) is gone; exiting after the current job",
                self.watch_parent,
            )
            self.stopping = True

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
        child = self.child
        if child is None or event.get("jid") != child.jid:
            return
        if kind in ("lock_lost", "canceled", "put"):
            what = {"lock_lost": "lost its lock", "canceled": "was canceled", "put": "was moved"}
            self._kill_child(f"the job {what[kind]}")

    # --- reserving and running a job ------------------------------------------------------------

    def _reserve_and_run(self) -> None:
        job = self._reserve()
        if job is None and not self.subscriptions.listening_for_puts:
            # Listen for puts before one more look, so that a put after that look is heard.
            self._handle_events(self.subscriptions.listen_for_puts(True))
            job = self._reserve()
        if job is None:
            self.next_poll = time.monotonic() + self.interval
            return
        self.next_poll = 0.0
        if not class_allowed(job["klass"], self.allow_modules):
            self._forbid(job)
        elif self.fork_per_job:
            self._fork_child(job)
        else:
            self._run_in_process(job)

    def _forbid(self, job: dict[str, Any]) -> None:
        """Fail a job whose class is outside the allowlist, before anything of it is imported."""
        assert self.client is not None
        message = (
            f"job class {job['klass']!r} is not in a module this worker may import "
            f"(--allow-module {' '.join(self.allow_modules)})"
        )
        log.warning("%s: %s; failed as %s-ForbiddenClass", describe_job(job), message, job["queue"])
        try:
            self.client("fail", job["jid"], self.name, f"{job['queue']}-ForbiddenClass", message)
        except QlessException as refused:
            log.info("%s: qless refused fail: %s", describe_job(job), refused)

    def _reserve(self) -> Optional[dict[str, Any]]:
        assert self.client is not None
        for queue in self.reserver.order():
            popped = json.loads(self.client("pop", queue, self.name, 1))
            self.reserver.tried(queue)
            if popped:
                return popped[0]
        return None

    def _fork_child(self, job: dict[str, Any]) -> None:
        report_r, report_w = os.pipe()
        started = time.time()
        # Blocked across the fork: until the child has dropped the worker's handlers, a signal
        # for it would land in the worker's wakeup pipe and look like the worker's own.
        signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
        pid = os.fork()
        if pid == 0:  # the job child
            lifeline.die_with_parent(self.pid)
            os.close(report_r)
            self._run_child(job, started, report_w)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)
        os.close(report_w)
        os.set_blocking(report_r, False)
        try:
            os.setpgid(pid, pid)  # also done by the child; whichever runs first wins
        except OSError:
            pass
        now = time.monotonic()
        heartbeat_every = max(0.05, (float(job["expires"]) - started) / 3)
        self.child = JobChild(
            pid=pid,
            job=job,
            started=started,
            report_fd=report_r,
            heartbeat_every=heartbeat_every,
            next_heartbeat=now + heartbeat_every,
            deadline=now + self.job_timeout if self.job_timeout else None,
        )
        # While busy, stop hearing every event of the whole qless instance.
        self.subscriptions.listen_for_puts(False)
        log.debug("forked %d for %s", pid, describe_job(job))

    def _run_child(self, job: dict[str, Any], started: float, report_fd: int) -> NoReturn:
        """The job child: run the job, report, exit. Never returns."""
        status = 70  # EX_SOFTWARE: something failed before the job could be reported
        try:
            self._become_child()
            proctitle.set_title(proctitle.processing(job["queue"], started))
            os.setpgid(0, 0)  # its own group, so a kill reaches whatever the job started
            set_role("job", self.appname)
            report = _run_job(self.job_client, job)
            _write_report(report_fd, report)
            status = 0
        except BrokenPipeError:
            pass  # the worker parent is gone (and this child about to be): nothing to tell
        except BaseException:
            log.exception("job %s crashed its child process", job.get("jid"))
        finally:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except Exception:  # exiting regardless
                    pass
            os._exit(status)

    def _become_child(self) -> None:
        """Drop the worker's signal handling: the job runs with default dispositions."""
        signal.set_wakeup_fd(-1)
        for fd in (self._wakeup_r, self._wakeup_w):
            os.close(fd)
        for signum in HANDLED_SIGNALS:
            signal.signal(signum, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)

    def _run_in_process(self, job: dict[str, Any]) -> None:
        """--no-fork-per-job: run the job here. TERM, INT and USR1 interrupt it; QUIT waits."""
        assert self.job_client is not None
        started = time.time()
        self._set_title(proctitle.processing(job["queue"], started))
        self.subscriptions.listen_for_puts(False)
        previous = {
            signum: signal.signal(signum, _interrupt_job)
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
        }
        if self.job_timeout:
            signal.signal(signal.SIGALRM, _job_timed_out)
            signal.setitimer(signal.ITIMER_REAL, self.job_timeout)
        timed_out = False
        try:
            report = _run_job(self.job_client, job)
        except JobInterrupted as interrupted:
            report = {}
            timed_out = interrupted.reason == "timeout"
            kill_reason = interrupted.reason
        else:
            kill_reason = None
        finally:
            if self.job_timeout:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, signal.SIG_DFL)
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            self.job_client.track_job(None)
        self._finish_job(job, report, None, kill_reason, timed_out)

    # --- supervising the child ------------------------------------------------------------------

    def _supervise_child(self, now: float) -> None:
        child = self.child
        assert child is not None
        try:
            # Whatever the job left running in its process group dies with it.
            reaped = lifeline.reap(child.pid)
        except ChildProcessError:
            reaped = child.pid, -1
        if reaped is not None:
            status = reaped[1]
            child.report += _read_all(child.report_fd)
            os.close(child.report_fd)
            self.child = None
            report = _parse_report(child.report)
            self._finish_job(child.job, report, status, child.kill_reason, child.timed_out)
            return
        if child.deadline is not None and now >= child.deadline and child.kill_reason is None:
            child.timed_out = True
            self._kill_child(f"the job ran longer than its timeout ({self.job_timeout:g}s)")
        if child.escalate_at is not None and now >= child.escalate_at:
            log.warning(
                "job child %d ignored SIGTERM for %gs; sending SIGKILL", child.pid, self.kill_grace
            )
            lifeline.kill_group(child.pid, signal.SIGKILL)
            child.escalate_at = None

    def _kill_child(self, reason: str) -> None:
        child = self.child
        if child is None or child.kill_reason is not None:
            return
        log.warning("killing job child %d: %s (%s)", child.pid, reason, describe_job(child.job))
        child.kill_reason = reason
        lifeline.kill_group(child.pid, signal.SIGTERM)
        child.escalate_at = time.monotonic() + self.kill_grace

    def _heartbeat(self, child: JobChild) -> None:
        assert self.client is not None
        child.next_heartbeat = time.monotonic() + child.heartbeat_every
        try:
            # No data argument: the child may have changed the job's data; ours is stale.
            self.client("heartbeat", child.jid, self.name)
        except QlessException as refused:
            if child.kill_reason is None and not _report_says_settled(child):
                self._kill_child(f"qless refused its heartbeat ({refused})")

    def _finish_job(
        self,
        job: dict[str, Any],
        report: dict[str, Any],
        status: Optional[int],
        kill_reason: Optional[str],
        timed_out: bool = False,
    ) -> None:
        """Decide how a job whose run has ended is settled, and queue that for Redis."""
        self.jobs_done += 1
        what = describe_job(job)
        if report.get("settled"):
            log.debug("%s: settled by its child", what)
            return
        if report.get("unreported"):
            command = report["unreported"]
            reason = f"its child could not report {command[0]} (Redis was unreachable)"
            self.pending.append(Settlement(job, command, reason))
            return
        if timed_out:
            message = f"killed after running longer than the job timeout ({self.job_timeout:g}s)"
            command = [
                "fail",
                job["jid"],
                self.name,
                f"{job['queue']}-TimeoutError",
                message,
                job["data"],
            ]
            self.pending.append(Settlement(job, command, message))
            return
        if status is None:  # ran in this process (--no-fork-per-job)
            ended = kill_reason or "the job was interrupted"
        else:
            ended = _describe_status(status)
            if kill_reason:
                ended = f"{kill_reason}: {ended}"
        message = f"{ended}; the job did not complete or fail"
        command = [
            "retry",
            job["jid"],
            job["queue"],
            self.name,
            0,
            f"{job['queue']}-DirtyExit",
            message,
        ]
        self.pending.append(Settlement(job, command, message))

    def _settle(self, settlement: Settlement) -> None:
        """Send a settlement to qless if the job is still ours; qless refuses it otherwise."""
        assert self.client is not None
        job = settlement.job
        what = describe_job(job)
        state, owner = self.client.redis.hmget(f"ql:j:{job['jid']}", "state", "worker")
        if state != "running" or owner != self.name:
            log.info(
                "%s: %s; it is no longer ours (%s), nothing to do", what, settlement.reason, state
            )
            return
        command = settlement.command
        try:
            result = self.client(*command)
        except QlessException as refused:
            log.info("%s: qless refused %s: %s", what, command[0], refused)
            return
        if command[0] == "retry":
            outcome = "failed, out of retries" if int(result) < 0 else f"{result} retries left"
            log.warning("%s handed back with retry (%s): %s", what, outcome, settlement.reason)
        else:
            log.warning("%s: sent %s for it, as %s", what, command[0], settlement.reason)

    # --- titles and the end -----------------------------------------------------------------------

    def _update_title(self) -> None:
        if self.child is not None:
            self._set_title(proctitle.forked(self.child.pid, self.child.started))
        elif self.paused:
            self._set_title(proctitle.paused())
        else:
            self._set_title(proctitle.waiting(self.queues))

    def _set_title(self, title: str) -> None:
        if title != self._title:
            proctitle.set_title(title)
            self._title = title

    def _shut_down(self) -> None:
        child = self.child
        if child is not None:  # only when the loop itself failed: do not leave the job behind
            lifeline.kill_group(child.pid, signal.SIGKILL)
            try:
                os.waitpid(child.pid, 0)
            except ChildProcessError:
                pass
        for settlement in self.pending:
            log.warning(
                "job %s is left running in qless: %s; Redis is unreachable, so its lock will "
                "expire and qless will give it to another worker",
                settlement.job["jid"],
                settlement.reason,
            )
        self.subscriptions.close()
        if self.client is not None and self.outage.since is None:
            try:
                self.client("worker.deregister", self.name)
            except (*REDIS_DOWN, QlessException):
                pass
        signal.set_wakeup_fd(-1)
        log.info("worker %s exiting after %d job(s)", self.name, self.jobs_done)


# --- helpers shared by the child and the in-process mode ----------------------------------------


class JobInterrupted(BaseException):
    """Raised into an in-process job by TERM, INT, USR1 or its timeout.

    A BaseException, so qless-py's Job.process does not turn it into a job failure.
    """

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _record_signal(signum: int, frame: Any) -> None:
    """The worker's signal handler: nothing. The wakeup pipe already holds the signal number."""


def _interrupt_job(signum: int, frame: Any) -> None:
    # Only while a job runs in the worker process itself (--no-fork-per-job): the loop cannot
    # turn until the job returns, so the signal has to stop the job where it is. The wakeup pipe
    # still records the signal for the loop.
    raise JobInterrupted(f"interrupted by {signal.Signals(signum).name}")


def _job_timed_out(signum: int, frame: Any) -> None:
    raise JobInterrupted("timeout")


def _run_job(client: JobClient, job_fields: dict[str, Any]) -> dict[str, Any]:
    """Run one job with qless-py; complete it if the job function left it running.

    Returns the report for the worker parent: ``{"settled": True}`` or, when Redis could not be
    told, ``{"unreported": [command, *args]}``.
    """
    client.track_job(job_fields["jid"])
    queue = job_fields["queue"]
    try:
        try:
            job = qless.Job(client, **job_fields)  # parses the job's data
        except (TypeError, ValueError) as error:
            # Not retried: the data will be just as broken the next time.
            client(
                "fail",
                job_fields["jid"],
                client.worker_name,
                f"{queue}-BadJobData",
                f"the job's data is not valid JSON ({error}): {cap(str(job_fields['data']), 1024)}",
            )
        else:
            _process(job, client)
    except (*REDIS_DOWN, QlessException):
        if not client.settled:
            raise
    if client.unreported is not None:
        return {"unreported": client.unreported}
    return {"settled": True}


def _process(job: qless.Job, client: JobClient) -> None:
    try:
        job.process()
    except (SystemExit, KeyboardInterrupt) as exit:
        # qless-py catches Exception only. Running it again would exit again: fail it.
        what = f"{type(exit).__name__}({exit.args[0]!r})" if exit.args else type(exit).__name__
        job.fail(
            f"{job.queue_name}-SystemExit",
            f"the job function raised {what}, which ends the process it runs in; a job must "
            f"return or raise an exception instead\n{traceback.format_exc()}",
        )
        return
    if not client.settled:
        # qless's Ruby workers complete a job whose function returned; qless-py leaves it
        # running until its lock expires and then hands it to another worker.
        job.complete()


def _cap_message(command: str, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """fail(jid, worker, group, message, ...) and retry(jid, queue, worker, delay, group,
    message) with the message capped (MAX_MESSAGE)."""
    index = 3 if command == "fail" else 5
    if len(args) > index and isinstance(args[index], str):
        args = (*args[:index], cap(args[index]), *args[index + 1 :])
    return args


def _write_report(fd: int, report: dict[str, Any]) -> None:
    data = json.dumps(report).encode()
    if len(data) > MAX_REPORT_BYTES and report.get("unreported"):
        command = list(report["unreported"])
        if command[0] == "fail":  # the failure message (a traceback) is what can be long
            command[4] = cap(command[4], MAX_REPORT_BYTES // 2)
        data = json.dumps({"unreported": command}).encode()[:MAX_REPORT_BYTES]
    os.write(fd, data + b"\n")


def _read_all(fd: int) -> bytes:
    """What the (exited) child wrote: at most MAX_REPORT_BYTES, so it fits in the pipe."""
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def _parse_report(data: bytes) -> dict[str, Any]:
    try:
        report = json.loads(data.decode())
    except (UnicodeDecodeError, ValueError):
        return {}
    return report if isinstance(report, dict) else {}


def _report_says_settled(child: JobChild) -> bool:
    """Has the child already reported its job settled? (It may not have been reaped yet.)"""
    child.report += _read_all(child.report_fd)
    return bool(_parse_report(child.report).get("settled"))


def _describe_status(status: int) -> str:
    if status < 0:
        return "its child vanished"
    if os.WIFSIGNALED(status):
        return f"its child was killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"its child exited with status {os.WEXITSTATUS(status)}"
