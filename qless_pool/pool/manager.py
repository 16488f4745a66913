"""The pool manager: fork a worker parent per configured slot and keep the counts right.

One process, one thread, one loop (level-triggered, as resque-pool's)::

    reap exited workers -> handle queued signals, one by one -> reconcile -> title -> sleep

*Reconcile* compares the desired counts (the config's groups; none after WINCH) with the worker
table and spawns what is missing and QUITs what is surplus. The same step serves a crashed
worker, a HUP with new counts and a WINCH. A worker leaves the table only when it is reaped, so a
pid the kernel has reused is never signalled.

Signal handlers do nothing but let Python write the signal's number to a wakeup pipe; the loop
reads the pipe. The workers write notes to another pipe (notes.py): when they begin their first
job. The pause (USR2, CONT) is also kept in a byte the workers share (notes.PauseFlag), so that
a worker can tell the pool's pause when Unix hands it USR2 and CONT out of order. HUPs that
come in a burst are one reload.
The manager never talks to Redis: an outage cannot touch it. A worker that dies with jobs in
hand is settled by a helper it forks (will.py).
"""

from __future__ import annotations

import os
import select
import signal
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, Optional

from .. import lifeline, notes, options, proctitle
from ..config import MAX_POOL_WORKERS, ConfigSource, Counts, Groups, describe_groups
from ..logs import logger, set_role
from ..ops import state
from ..urls import check_redis_url, default_redis_url
from ..worker.limits import RECYCLED
from ..worker.reservation import default_allowed_modules
from ..worker.signals import IDLE_RETIRED
from .forks import Forking
from .handover import HandOver, Successor, logical_directory
from .publish import StatePublisher, effective_options
from .ranges import Ranges
from .reload import Reloading
from .scaling import ScaleSettings
from .signals import MANAGER_SIGNALS, ManagerSignals
from .table import Backoff, WorkerRecord, clean_exit, next_spawn_time, note_exit, plan

__all__ = ["TERM_BEHAVIOURS", "Pool", "WorkerRecord"]

log = logger.getChild("manager")

#: What TERM does: "immediate" (INT every worker, exit at once; the default), "graceful"
#: (QUIT every worker, exit at once) or "graceful-wait" (as QUIT: wait for the workers).
TERM_BEHAVIOURS = options.choices("term")
#: The longest the loop sleeps when nothing happens.
TICK = 1.0


class Pool(ManagerSignals, Forking, Reloading, Ranges):
    """The pool manager. ``Pool(config).run()`` returns the exit status.

    config              a ConfigSource, or what it accepts: a path, a dict, a callable
    environment         the config section (default: $QLESS_ENV, $RACK_ENV, $RAILS_ENV)
    appname, redis_url, term_behaviour, spawn_delay, max_workers, single_process_group, drain,
    scale_interval, scale_up_after, scale_down_after, scale_step:
                        the options (options.py; redis_url is ``redis``, term_behaviour ``term``)
    worker_options      passed to every Worker: the worker options (options.py), kill_grace
    daemonized          WINCH acts only then (a terminal resize sends WINCH too)
    reopen_logs         called on HUP (the daemon reopens its log files)
    lifecycle           called as lifecycle(event, pool) for "started" (before the first
                        spawn), "ready" (first workers started), "reloading", "reloaded",
                        "stopping" and "workers" (their number changed)
    close_in_workers    file descriptors a worker closes right after the fork (the pidfile's)
    metrics_listener    a bound socket to serve Prometheus /metrics on, from a helper process
                        (metrics.py; $PROMETHEUS_MULTIPROC_DIR must be set before preloading)
    successor           this manager was started by a reload (reload.py): the hand-over
    """

    def __init__(
        self,
        config: Any = None,
        environment: Optional[str] = None,
        *,
        appname: Optional[str] = None,
        redis_url: Optional[str] = None,
        worker_options: Optional[dict[str, Any]] = None,
        term_behaviour: str = "immediate",
        spawn_delay: float = 0.0,
        max_workers: Optional[int] = None,
        single_process_group: bool = False,
        daemonized: bool = False,
        reopen_logs: Optional[Callable[[], None]] = None,
        lifecycle: Optional[Callable[[str, Pool], None]] = None,
        close_in_workers: Sequence[int] = (),
        drain: bool = False,
        metrics_listener: Optional[Any] = None,
        successor: Optional[Successor] = None,
        scale_interval: float = 1.0,
        scale_up_after: float = 1.0,
        scale_down_after: float = 30.0,
        scale_step: int = 1,
    ):
        if term_behaviour not in TERM_BEHAVIOURS:
            raise ValueError(f"term_behaviour must be one of {', '.join(TERM_BEHAVIOURS)}")
        # Checked here, before anything forks: a value a worker would refuse must not reach
        # every worker, one after the other (options.py).
        check = options.check
        self.worker_options = {name: check(name, v) for name, v in (worker_options or {}).items()}
        self.source = _source(config, environment, max_workers)
        self.appname = appname if appname is not None else os.path.basename(os.getcwd())
        self.redis_url = check_redis_url(check("redis", redis_url) or default_redis_url())
        self.term_behaviour = term_behaviour
        self.spawn_delay = check("spawn_delay", spawn_delay)
        self.single_process_group = single_process_group
        self.daemonized = daemonized
        self.reopen_logs = reopen_logs
        self.lifecycle = lifecycle
        self.close_in_workers = tuple(close_in_workers)
        self.drain = drain
        self.drain_pid: Optional[int] = None
        # --metrics-port: the bound socket, served by a helper process (metrics.py).
        self.metrics_listener = metrics_listener
        #: What the launcher did with the options that are its own (pool/launch.py): shown in
        #: the pool's state beside the pool's and the workers' (effective_options).
        self.launch_options: dict[str, Any] = {}
        self.metrics_pid: Optional[int] = None
        self.metrics_restart_at = 0.0
        self.exit_status = 0
        self.groups: Optional[Groups] = None
        self.workers: dict[int, WorkerRecord] = {}
        self.backoffs: dict[tuple[str, ...], Backoff] = {}
        self.signals: deque[int] = deque()
        self.notes: Optional[notes.Notes] = None
        self.winched = False
        self.pause = notes.PauseFlag()  # USR2 came last (not CONT): workers start paused
        self.retire = notes.RetireSlots()  # the workers asked to retire if idle (ranges.py)
        self.reload_due: Optional[float] = None  # monotonic: a HUP's reload, once the burst ends
        self.reload_asked: Optional[float] = None  # monotonic: the first HUP of the burst
        self.hups = 0  # in the burst
        self.helpers: dict[int, str] = {}  # pid -> what: settlers of dead workers' jobs
        self.stopping: Optional[str] = None  # None, "wait" (for the workers) or "now"
        self.next_spawn_at = 0.0
        self.pid = os.getpid()
        self.started = time.time()
        self.state: Optional[state.PoolState] = None  # for qless-pool status (state.py)
        self.restarts = {"died": 0, "recycled": 0, "reload": 0}
        #: The last HUP's reload: {"at": epoch, "ok": bool, "error": str or None}.
        self.last_reload: Optional[dict[str, Any]] = None
        #: Where the pool was started: qless-pool status finds a pool without a pidfile by it.
        self.directory = os.getcwd()
        # A reload (reload.py): the new manager starts as this one was, from the directory as
        # given; the launcher sets the environment it started with (None: this process's).
        self.start_directory = logical_directory()
        self.start_environ: Optional[dict[str, str]] = None
        self.handover: Optional[HandOver] = None  # the reload this manager runs, or ran last
        self.successor = successor  # the reload that started this manager
        self.reloads: deque[dict[str, Any]] = deque(maxlen=5)  # their outcomes, for manager.json
        self.on_serving: list[Callable[[], None]] = []  # a successor takes over the pidfile
        self.lock_fd: Optional[int] = None  # -l: not passed on to a reload's new manager
        self.pidfile_fd: Optional[int] = None  # passed on: rewritten there if need be
        self._wakeup_r = self._wakeup_w = -1
        self._title = ""
        self._worker_count = -1
        self.publisher: Optional[StatePublisher] = None  # writes it
        # Groups with a range (foo: 1..8): how many each wants now (ranges.py, scaling.py).
        self._init_ranges(
            ScaleSettings(
                check("scale_interval", scale_interval),
                check("scale_up_after", scale_up_after),
                check("scale_down_after", scale_down_after),
                check("scale_step", scale_step),
                self.source.max_workers,
            ),
            successor.scaled if successor is not None else None,
        )

    def effective_options(self) -> dict[str, Any]:
        """The options (options.py) as this pool holds them (publish.effective_options)."""
        return effective_options(self)

    def load_config(self) -> None:
        """Read the config (raises ConfigError): done before preloading the application, so a
        broken file fails the start at once."""
        self.groups = self.source.load()
        self.configure_ranges()

    def run(self) -> int:
        """Run the pool until a signal (or drain mode) ends it; returns the exit status: 0, or in
        drain mode 1 if a job failed."""
        self.pid = os.getpid()
        self.started = time.time()
        set_role("manager", self.appname)
        if self.groups is None:
            self.load_config()
        self.configure_ranges()  # (also when the launcher loaded the config)
        self._open_state()
        self.notes = notes.Notes()
        self._install_signal_handlers()
        # A reload's new manager starts with them blocked (reload.py): what the old manager
        # passed on meanwhile is delivered now, to the handlers.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, MANAGER_SIGNALS)
        if self.successor is not None:  # loaded: the old manager may start handing over
            self.pause.set(self.successor.paused)
            wanted = self.range_counts(self.groups or {})
            counts = [{"queues": list(q), "count": n} for q, n in wanted.items()]
            self.successor.channel.send("ready", groups=counts)
        # A job child whose worker was killed comes to us, so that what it left is killed too.
        subreaper = lifeline.become_subreaper()
        groups = self.groups or {}
        log.info("manager started (%s): %s", self.source.name, describe_groups(groups))
        for warning in self.source.warnings:
            log.warning("%s", warning)
        self._warn_if_empty(groups, "")
        allowed = self.worker_options.get("allow_modules")
        if not (default_allowed_modules() if allowed is None else allowed):
            log.warning(
                "no job class allowlist (--allow-module): anyone who can write to this Redis "
                "can make the workers import any module on their sys.path and run its code"
            )
        self._emit("started")
        if self.drain:
            started = time.time()  # before the fork: the workers may finish jobs before it runs
            self.drain_pid = self._fork(lambda: self._become_drain_watcher(started))
        self._keep_metrics_helper()
        self._keep_sampler()
        self.reconcile()
        self._update_title()
        if self.successor is None:
            self._emit("ready")  # a successor is ready once it serves every slot (reload.py)
        try:
            while True:
                self._sleep()
                self.reap()
                while self.signals and self.stopping != "now":
                    self.handle_signal(self.signals.popleft())
                if self.reload_due is not None and time.monotonic() >= self.reload_due:
                    self.reload()
                self._check_hand_over(time.monotonic())
                if (
                    self.stopping == "now"
                    # The drain watcher's exit status is the run's verdict: wait for it too.
                    or (self.stopping == "wait" and not self.workers and self.drain_pid is None)
                    or (self.handed_over and not self.workers)
                ):
                    break
                if self.stopping is None:
                    self.reconcile()
                    self._keep_metrics_helper()
                    self._keep_sampler()
                    self._tell_predecessor()
                self._update_title()
                if self.stopping is None:
                    # After the title: what ps shows of this pool is never behind what the new
                    # manager acts on.
                    self._tell_successor()
        finally:
            if self.handed_over and self.keeps:
                # Until the keeper's handlers are in place (keeper.py): held, not lost.
                signal.pthread_sigmask(signal.SIG_BLOCK, MANAGER_SIGNALS)
            self._restore_signal_handlers()
            self.notes.close()
            if subreaper and not (self.handed_over and self.keeps):  # the keeper stays one
                lifeline.become_subreaper(False)
            if self.state is not None:
                self.state.remove()
        log.info("manager exiting")
        return self.exit_status

    def _sleep(self) -> None:
        """Until a signal arrives, or the next spawn is due, or a tick has passed."""
        now = time.monotonic()
        wake = now + TICK
        if self.stopping is None:
            wake = min(wake, self._next_spawn_time(now))
        if self.reload_due is not None:
            wake = min(wake, self.reload_due)
        if self.handover is not None and self.handover.running:
            wake = min(wake, self.handover.deadline)
        poller = select.poll()  # not select(): a preloaded app may hold fds above 1024
        poller.register(self._wakeup_r, select.POLLIN)
        assert self.notes is not None
        poller.register(self.notes.read_fd, select.POLLIN)
        for channel in self._channels():
            poller.register(channel.fileno(), select.POLLIN)
        if self.sampler_fd >= 0:
            poller.register(self.sampler_fd, select.POLLIN)
        if poller.poll(max(0.0, wake - now) * 1000):
            self._read_signals()
            self._read_notes()
            self._read_samples()
            self._read_channel()
            self._read_predecessor()

    # --- signals --------------------------------------------------------------------------------

    def _read_notes(self) -> None:
        assert self.notes is not None
        for pid, note in self.notes.read():
            record = self.workers.get(pid)
            if record is not None and note == notes.BEGAN:
                self.workers[pid] = replace(record, began=True)
            elif record is not None and note == notes.UP:
                self.workers[pid] = replace(record, up=True)

    # --- the worker table -----------------------------------------------------------------------

    def signal_workers(self, signum: int, retire: bool = True) -> None:
        """Send ``signum`` to every worker in the table; unless ``retire`` is False (USR1, USR2,
        CONT), they no longer count toward their groups: reconcile starts their replacements."""
        for record in list(self.workers.values()):
            lifeline.send(record.pid, signum)
            if retire and not record.retiring:
                self.workers[record.pid] = replace(record, retiring=True)

    def reap(self) -> None:
        """Collect every exited child; a worker leaves the table only here."""
        self._read_notes()  # a note a worker wrote just before it died (it began a job)
        while True:
            reaped = lifeline.reap(None, self._leftovers_to_kill)
            if reaped is None:
                return
            pid, status = reaped
            if (
                self._helper_exited(pid, status)
                or self._successor_exited(pid, status)
                or self._sampler_exited(pid, status)
            ):
                continue
            record = self.workers.pop(pid, None)
            if record is None:
                log.debug(
                    "reaped %d, not one of our workers (%s)", pid, lifeline.describe_status(status)
                )
                continue
            if self.state is not None:
                self.state.forget_worker(pid)
            lived = time.monotonic() - record.started_at
            what = f"worker {pid} ({','.join(record.queues)})"
            if not clean_exit(status):
                self._settle_for(record, status)
            if record.retiring:
                log.info(
                    "%s stopped: %s after %.1fs", what, lifeline.describe_status(status), lived
                )
                continue
            if os.WIFEXITED(status) and os.WEXITSTATUS(status) == IDLE_RETIRED:
                self._worker_retired_idle(record)  # asked to, when its group scaled down
                continue
            if os.WIFEXITED(status) and os.WEXITSTATUS(status) == RECYCLED:
                # It said why when it decided to go; a recycle is not a failed start.
                log.debug("%s recycled after %.1fs", what, lived)
                self.restarts["recycled"] += 1
                continue
            log.warning("%s died: %s after %.1fs", what, lifeline.describe_status(status), lived)
            self.restarts["died"] += 1
            self._note_exit(record.queues, lived, record.began)

    def _note_exit(self, queues: tuple[str, ...], lived: float, began: bool = False) -> None:
        """A worker of ``queues`` died (or could not be forked) ``lived`` seconds after its
        start: a failed start backs its group off (table.note_exit)."""
        backoff = self.backoffs.setdefault(queues, Backoff())
        delay = note_exit(backoff, lived, began, time.monotonic())
        if delay is not None:
            log.error(
                "workers for %s die right after starting (%d in a row); backing off: next start "
                "in %gs", ",".join(queues), backoff.failures, delay,
            )  # fmt: skip

    def desired(self) -> Counts:
        """The counts reconcile keeps: the config's (a range: what it wants now, ranges.py);
        none after WINCH; during a reload, what the hand-over allows (reload.py)."""
        if self.winched or self.groups is None:
            return self.reload_desired({})
        return self.reload_desired(self.range_counts(self.groups))

    def _next_spawn_time(self, now: float) -> float:
        """When reconcile can next start a missing worker (a tick away if none is missing)."""
        return next_spawn_time(self.desired(), self.workers.values(), self.backoffs, now,
                               self.next_spawn_at, TICK)  # fmt: skip

    def reconcile(self) -> None:
        """QUIT the surplus workers of every group, then spawn the missing ones, as
        table.plan says."""
        now = time.monotonic()
        todo = plan(self.desired(), self.workers.values(), self.backoffs, now,
                    self.next_spawn_at, self.spawn_delay)  # fmt: skip
        for queues in todo.healthy:
            log.info("workers for %s start healthily again", ",".join(queues))
            self.backoffs[queues].failures = 0
        for record in todo.retire:
            log.info("worker %d (%s) is surplus; sending QUIT", record.pid, ",".join(record.queues))
            lifeline.send(record.pid, signal.SIGQUIT)
            self.workers[record.pid] = replace(record, retiring=True)
        failed: set[tuple[str, ...]] = set()
        for queues in todo.spawn:
            if queues in failed:
                continue
            if self.spawn(queues) is None:
                failed.add(queues)
            elif self.spawn_delay:
                self.next_spawn_at = now + self.spawn_delay

    def _update_title(self) -> None:
        title = proctitle.manager(self.appname, self.workers.values())
        if title != self._title:
            proctitle.set_title(title)
            self._title = title
        if len(self.workers) != self._worker_count:
            self._worker_count = len(self.workers)
            self._emit("workers")
        if self.publisher is not None:
            self.publisher.publish(self)

    # --- the state qless-pool status reads (state.py) -------------------------------------------

    def _open_state(self) -> None:
        try:
            self.state = state.PoolState(self.pid)
        except OSError as error:
            log.warning("no state for qless-pool status: %s", error)
            return
        self.publisher = StatePublisher(self.state, self._restore_metrics_directory)

    def _emit(self, event: str) -> None:
        if self.lifecycle is not None:
            self.lifecycle(event, self)


def _source(config: Any, environment: Optional[str], max_workers: Optional[int]) -> ConfigSource:
    """The pool's ConfigSource: ``config`` if it is one, else one made of it."""
    if max_workers is not None:
        max_workers = options.check("max_workers", max_workers)
    if not isinstance(config, ConfigSource):
        return ConfigSource(config, environment, max_workers=max_workers or MAX_POOL_WORKERS)
    if max_workers is not None:
        config.max_workers = max_workers
    return config
