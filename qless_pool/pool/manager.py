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

import contextlib
import os
import select
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Optional

from .. import hooks, lifeline, notes, options, proctitle
from ..config import MAX_POOL_WORKERS, ConfigError, ConfigSource, Groups
from ..logs import logger, set_role
from ..ops import state
from ..urls import check_redis_url, default_redis_url, mask_secrets
from ..worker.base import HANDLED_SIGNALS, Worker, worker_name
from ..worker.limits import RECYCLED
from ..worker.reservation import default_allowed_modules
from ..worker.will import open_will, settle_remains
from .drain import DrainWatcher, run_watcher

__all__ = ["TERM_BEHAVIOURS", "Pool", "WorkerRecord"]

log = logger.getChild("manager")

#: Signals only the manager handles; the rest are the worker's too.
MANAGER_ONLY_SIGNALS = (signal.SIGHUP, signal.SIGWINCH)
MANAGER_SIGNALS = (*MANAGER_ONLY_SIGNALS, *HANDLED_SIGNALS)
#: What TERM does: "immediate" (INT every worker, exit at once; the default), "graceful"
#: (QUIT every worker, exit at once) or "graceful-wait" (as QUIT: wait for the workers).
TERM_BEHAVIOURS = ("immediate", "graceful", "graceful-wait")
#: The longest the loop sleeps when nothing happens.
TICK = 1.0
#: A worker that dies sooner than this after its start, before its first job, counts as a failed
#: start (one that dies running a job does not: the job is to blame, and it is retried).
HEALTHY_AFTER = 5.0
#: HUPs in a burst are one reload: it waits until none has come for HUP_QUIET seconds, and at
#: most HUP_LONGEST seconds after the first (a storm of HUPs must not restart every worker once
#: each, nor postpone the reload for ever).
HUP_QUIET = 0.2
HUP_LONGEST = 2.0
#: Signals that would stop the manager (their default action), for no reason of its own: a
#: background process group reading or writing the terminal. Ignored (the workers too).
IGNORED_SIGNALS = (signal.SIGTTIN, signal.SIGTTOU)
#: Backoff after failed starts: 1 s, doubling, at most a minute.
FIRST_BACKOFF = 1.0
MAX_BACKOFF = 60.0


@dataclass(frozen=True)
class WorkerRecord:
    """One worker parent in the table, from spawn to reap."""

    pid: int
    queues: tuple[str, ...]
    started_at: float  # monotonic
    retiring: bool = False  # told to QUIT (or stop): no longer counts toward its group
    began: bool = False  # it started a job: dying is not a failed start


@dataclass
class Backoff:
    """Failed starts of one group in a row, and when the group may start a worker again."""

    failures: int = 0
    until: float = 0.0


class Pool:
    """The pool manager. ``Pool(config).run()`` returns the exit status.

    config              a ConfigSource, or what it accepts: a path, a dict, a callable
    environment         the config section (default: $QLESS_ENV, $RACK_ENV, $RAILS_ENV)
    appname             shown in titles and log lines (default: the working directory's name)
    redis_url           for the workers (default: $QLESS_URL, $REDIS_URL, localhost)
    worker_options      passed to every Worker: interval, reserver, fork_per_job, prefetch,
                        job_timeout, kill_grace, allow_modules, max_jobs, max_jobs_jitter,
                        max_memory, graceful_timeout (see Worker)
    term_behaviour      "immediate" (default), "graceful" or "graceful-wait"
    spawn_delay         seconds between two spawns
    max_workers         the most workers the config may ask for in all (a config error beyond)
    single_process_group  keep workers in the manager's process group
    daemonized          WINCH acts only then (a terminal resize sends WINCH too)
    reopen_logs         called on HUP (the daemon reopens its log files)
    lifecycle           called as lifecycle(event, pool) for "started" (before the first
                        spawn), "ready" (first workers started), "reloading", "reloaded",
                        "stopping" and "workers" (their number changed)
    close_in_workers    file descriptors a worker closes right after the fork (the pidfile's)
    drain               stop (gracefully) once the configured queues are empty; the exit
                        status is then 1 if a job failed during the run (see drain.py)
    metrics_listener    a bound socket to serve Prometheus /metrics on, from a helper process
                        (metrics.py; $PROMETHEUS_MULTIPROC_DIR must be set before preloading)
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
    ):
        if term_behaviour not in TERM_BEHAVIOURS:
            raise ValueError(f"term_behaviour must be one of {', '.join(TERM_BEHAVIOURS)}")
        # Checked here, before anything forks: a value a worker would refuse must not reach
        # every worker, one after the other (options.py).
        self.worker_options = {
            name: options.check(name, value) for name, value in (worker_options or {}).items()
        }
        spawn_delay = options.check("spawn_delay", spawn_delay)
        if max_workers is not None:
            max_workers = options.check("max_workers", max_workers)
        if redis_url is not None:
            redis_url = options.check("redis", redis_url)
        if isinstance(config, ConfigSource):
            self.source = config
            if max_workers is not None:
                self.source.max_workers = max_workers
        else:
            self.source = ConfigSource(
                config, environment, max_workers=max_workers or MAX_POOL_WORKERS
            )
        self.appname = appname if appname is not None else os.path.basename(os.getcwd())
        self.redis_url = check_redis_url(redis_url or default_redis_url())
        self.term_behaviour = term_behaviour
        self.spawn_delay = spawn_delay
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
        self._wakeup_r = self._wakeup_w = -1
        self._title = ""
        self._worker_count = -1
        self._published: Any = None
        self._state_problem: Optional[str] = None  # why the state cannot be written, once said
        self._state_written = False  # manager.json is there (or was, if intact() says no)

    def effective_options(self) -> dict[str, Any]:
        """The options (options.py) as this pool holds them, the Redis password masked: its own,
        its workers', and what its launcher did (``launch_options``)."""
        return {
            **self.launch_options,
            "config": self.source.name,
            "environment": self.source.environment,
            "max_workers": self.source.max_workers,
            "appname": self.appname,
            "redis": mask_secrets(self.redis_url),
            "spawn_delay": self.spawn_delay,
            "single_process_group": self.single_process_group,
            "term": self.term_behaviour,
            "drain": self.drain,
            **self.worker_options,
        }

    # --- start and the loop ---------------------------------------------------------------------

    def load_config(self) -> None:
        """Read the config (raises ConfigError): done before preloading the application, so a
        broken file fails the start at once."""
        self.groups = self.source.load()

    def run(self) -> int:
        """Run the pool until a signal (or drain mode) ends it; returns the exit status: 0, or in
        drain mode 1 if a job failed."""
        self.pid = os.getpid()
        self.started = time.time()
        set_role("manager", self.appname)
        if self.groups is None:
            self.load_config()
        self._open_state()
        self.notes = notes.Notes()
        self._install_signal_handlers()
        # A job child whose worker was killed comes to us, so that what it left is killed too.
        subreaper = lifeline.become_subreaper()
        log.info(
            "manager started (%s): %s",
            self.source.name,
            _describe_groups(self.groups),
        )
        for warning in self.source.warnings:
            log.warning("%s", warning)
        self._warn_if_empty(self.groups, "")
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
        self.reconcile()
        self._update_title()
        self._emit("ready")
        try:
            while True:
                self._sleep()
                self.reap()
                while self.signals and self.stopping != "now":
                    self.handle_signal(self.signals.popleft())
                if self.reload_due is not None and time.monotonic() >= self.reload_due:
                    self.reload()
                if self.stopping == "now" or (
                    # The drain watcher's exit status is the run's verdict: wait for it too.
                    self.stopping == "wait" and not self.workers and self.drain_pid is None
                ):
                    break
                if self.stopping is None:
                    self.reconcile()
                    self._keep_metrics_helper()
                self._update_title()
        finally:
            self._restore_signal_handlers()
            self.notes.close()
            if subreaper:
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
        poller = select.poll()  # not select(): a preloaded app may hold fds above 1024
        poller.register(self._wakeup_r, select.POLLIN)
        assert self.notes is not None
        poller.register(self.notes.read_fd, select.POLLIN)
        if poller.poll(max(0.0, wake - now) * 1000):
            self._read_signals()
            self._read_notes()

    # --- signals --------------------------------------------------------------------------------

    def _install_signal_handlers(self) -> None:
        # Handlers do nothing: Python's C handler writes the signal number to the wakeup pipe.
        self._wakeup_r, self._wakeup_w = os.pipe()
        for fd in (self._wakeup_r, self._wakeup_w):
            os.set_blocking(fd, False)
        signal.set_wakeup_fd(self._wakeup_w, warn_on_full_buffer=False)
        for signum in MANAGER_SIGNALS:
            signal.signal(signum, lifeline.wake_only)
        for signum in IGNORED_SIGNALS:  # inherited by the workers and their job children
            signal.signal(signum, signal.SIG_IGN)

    def _restore_signal_handlers(self) -> None:
        signal.set_wakeup_fd(-1)
        for signum in (*MANAGER_SIGNALS, *IGNORED_SIGNALS):
            signal.signal(signum, signal.SIG_DFL)
        for fd in (self._wakeup_r, self._wakeup_w):
            if fd >= 0:
                os.close(fd)
        self._wakeup_r = self._wakeup_w = -1

    def _read_signals(self) -> None:
        while True:
            try:
                data = os.read(self._wakeup_r, 4096)
            except BlockingIOError:
                return
            if not data:
                return
            if signal.SIGUSR2 in data and signal.SIGCONT in data:
                # Pending at once, their order is lost (notes.py): the pool keeps working.
                log.info("USR2 and CONT came together (Unix keeps no order between them): CONT")
                data = bytes(signum for signum in data if signum != signal.SIGUSR2)
            for signum in data:
                # During a graceful wait, INT and TERM jump the queue: they escalate now.
                if self.stopping == "wait" and signum in (signal.SIGINT, signal.SIGTERM):
                    self.signals.appendleft(signum)
                elif signum != signal.SIGCHLD:  # reaping is done on every turn anyway
                    self.signals.append(signum)

    def handle_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        getattr(self, f"handle_{name.lower()}")()

    def handle_sighup(self) -> None:
        if self.reopen_logs is not None:
            self.reopen_logs()
        if self.stopping:
            log.info("HUP ignored: the pool is stopping")
            return
        # The reload waits for the burst to end (HUP_QUIET, HUP_LONGEST): one reload for all.
        now = time.monotonic()
        if self.reload_asked is None:
            self.reload_asked = now
        self.hups += 1
        self.reload_due = min(now + HUP_QUIET, self.reload_asked + HUP_LONGEST)
        log.debug("HUP: reloading in %.2fs, unless more HUPs come", self.reload_due - now)

    def reload(self) -> None:
        """A HUP's work: read the config again (a bad one: keep the old), restart every worker
        gracefully, spawn to the new counts."""
        hups, self.hups = self.hups, 0
        self.reload_due = self.reload_asked = None
        if self.stopping:
            return
        burst = f" ({hups} HUPs in a burst, one reload)" if hups > 1 else ""
        log.info("HUP: reloading %s%s", self.source.name, burst)
        self._emit("reloading")
        try:
            groups = self.source.load()
        except ConfigError as error:
            log.error("HUP: %s; keeping the current config and workers", error)
            self._emit("reloaded")
            return
        except Exception:  # a bug of ours, or of a config loader: never the manager's end
            log.exception("HUP: reading %s failed; keeping the current config and workers",
                          self.source.name)  # fmt: skip
            self._emit("reloaded")
            return
        for warning in self.source.warnings:
            log.warning("HUP: %s", warning)
        self._warn_if_empty(groups, "HUP: ")
        self.groups = groups
        self.winched = False
        self.backoffs.clear()
        log.info("HUP: config %s; restarting every worker gracefully", _describe_groups(groups))
        self.restarts["reload"] += sum(not w.retiring for w in self.workers.values())
        self.signal_workers(signal.SIGQUIT)
        self.reconcile()
        self._emit("reloaded")

    def _warn_if_empty(self, groups: Groups, prefix: str) -> None:
        if not any(groups.values()):
            log.warning(
                "%s%s asks for no workers at all (%s): no job will run until it asks for some "
                "and the pool is sent HUP",
                prefix,
                self.source.name,
                "it is empty" if not groups else "every count is 0",
            )

    def handle_sigquit(self) -> None:
        log.info("QUIT: stopping every worker after its current job, then exiting")
        self._stop("wait")
        self.signal_workers(signal.SIGQUIT)

    def handle_sigint(self) -> None:
        if self.stopping == "wait":
            log.info("INT: not waiting for the workers (they finish their current jobs)")
        else:
            log.info("INT: stopping every worker after its current job; exiting now")
            self.signal_workers(signal.SIGQUIT)
        self._stop("now")

    def handle_sigterm(self) -> None:
        if self.stopping == "wait":
            log.info("TERM: stopping every worker now (their jobs are handed back); exiting now")
            self.signal_workers(signal.SIGINT)
            self._stop("now")
        elif self.term_behaviour == "graceful-wait":
            log.info("TERM: stopping every worker after its current job, then exiting")
            self.signal_workers(signal.SIGQUIT)
            self._stop("wait")
        elif self.term_behaviour == "graceful":
            log.info("TERM: stopping every worker after its current job; exiting now")
            self.signal_workers(signal.SIGQUIT)
            self._stop("now")
        else:
            log.info("TERM: stopping every worker now (their jobs are handed back); exiting now")
            self.signal_workers(signal.SIGINT)
            self._stop("now")

    def handle_sigwinch(self) -> None:
        if not self.daemonized:
            log.debug("WINCH ignored: not running as a daemon (a terminal resize sends it)")
            return
        if self.stopping:
            return
        log.info("WINCH: stopping every worker after its current job; HUP starts them again")
        self._cancel_reload("WINCH")
        self.winched = True
        self.signal_workers(signal.SIGQUIT)

    def handle_sigusr1(self) -> None:
        self._forward(signal.SIGUSR1)

    def handle_sigusr2(self) -> None:
        self.pause.set(True)
        self._forward(signal.SIGUSR2)

    def handle_sigcont(self) -> None:
        self.pause.set(False)
        self._forward(signal.SIGCONT)

    def _cancel_reload(self, why: str) -> None:
        """A HUP still waiting for its burst to end is overtaken by a later signal."""
        if self.reload_due is not None:
            log.info("HUP not acted on: %s came after it", why)
            self.reload_due = self.reload_asked = None
            self.hups = 0

    def _stop(self, how: str) -> None:
        self._cancel_reload("a stop")
        if self.stopping is None:
            self._emit("stopping")
            if self.drain_pid is not None:
                _kill(self.drain_pid, signal.SIGTERM)  # if it asked for the stop, it has exited
            if self.metrics_pid is not None:
                _kill(self.metrics_pid, signal.SIGTERM)
        self.stopping = how

    def _forward(self, signum: int) -> None:
        log.info("%s: passing it on to every worker", signal.Signals(signum).name)
        self.signal_workers(signum, retire=False)

    def _read_notes(self) -> None:
        assert self.notes is not None
        for pid, note in self.notes.read():
            record = self.workers.get(pid)
            if record is not None and note == notes.BEGAN:
                self.workers[pid] = replace(record, began=True)

    # --- the worker table -----------------------------------------------------------------------

    def signal_workers(self, signum: int, retire: bool = True) -> None:
        """Send ``signum`` to every worker in the table; unless ``retire`` is False (USR1, USR2,
        CONT), they no longer count toward their groups: reconcile starts their replacements."""
        for record in list(self.workers.values()):
            _kill(record.pid, signum)
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
            if pid == self.drain_pid:
                self._drain_watcher_exited(status)
                continue
            if pid in self.helpers:
                what = self.helpers.pop(pid)
                if not (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0):
                    log.warning("%s: %s", what, lifeline.describe_status(status))
                continue
            if pid == self.metrics_pid:
                self.metrics_pid = None
                if not self.stopping:
                    log.error(
                        "the metrics helper exited (%s); restarting it",
                        lifeline.describe_status(status),
                    )
                    self.metrics_restart_at = time.monotonic() + FIRST_BACKOFF
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
            if not _clean_exit(status):
                self._settle_for(record, status)
            if record.retiring:
                log.info(
                    "%s stopped: %s after %.1fs", what, lifeline.describe_status(status), lived
                )
                continue
            if os.WIFEXITED(status) and os.WEXITSTATUS(status) == RECYCLED:
                # It said why when it decided to go; a recycle is not a failed start.
                log.debug("%s recycled after %.1fs", what, lived)
                self.restarts["recycled"] += 1
                continue
            log.warning("%s died: %s after %.1fs", what, lifeline.describe_status(status), lived)
            self.restarts["died"] += 1
            self._note_exit(record.queues, lived, record.began)

    def _leftovers_to_kill(self, pid: int, status: int) -> bool:
        """Is what an exited process left in its process group to be killed (lifeline.reap)?

        A worker that died (not a clean exit) in a group of its own: whatever a job it ran in
        process started must not run on while the settler hands that job to another worker. An
        exited process we adopted (as subreaper) that led a process group of our session: a job
        child whose worker parent was killed."""
        if pid in self.workers:
            return not self.single_process_group and not _clean_exit(status)
        return (
            pid not in self.helpers
            and pid not in (self.drain_pid, self.metrics_pid)
            and lifeline.leads_group_in_session(pid)
        )

    def _drain_watcher_exited(self, status: int) -> None:
        self.drain_pid = None
        if os.WIFEXITED(status) and os.WEXITSTATUS(status) in (0, 1):
            self.exit_status = os.WEXITSTATUS(status)
            return
        if self.stopping is None:
            log.error(
                "the drain watcher failed (%s); stopping the pool", lifeline.describe_status(status)
            )
            self.exit_status = 1
            self.signal_workers(signal.SIGQUIT)
            self._stop("wait")

    def _note_exit(self, queues: tuple[str, ...], lived: float, began: bool = False) -> None:
        """A worker of ``queues`` died (or could not be forked) ``lived`` seconds after its
        start: a failed start if soon and before its first job (then its group backs off)."""
        backoff = self.backoffs.setdefault(queues, Backoff())
        if lived >= HEALTHY_AFTER or began:
            backoff.failures = 0
            return
        backoff.failures += 1
        delay = min(FIRST_BACKOFF * 2 ** (backoff.failures - 1), MAX_BACKOFF)
        backoff.until = time.monotonic() + delay
        log.error(
            "workers for %s die right after starting (%d in a row); backing off: next start in %gs",
            ",".join(queues),
            backoff.failures,
            delay,
        )

    def _settle_for(self, record: WorkerRecord, status: int) -> None:
        """A worker died: fork a helper to settle the jobs it left (will.py), if it may have
        left any (it began a job, or wrote a will). The will is opened here and handed over
        open: the manager may remove its state directory (a stop) before the helper reads it."""
        will_fd = -1
        if self.state is not None:
            with contextlib.suppress(OSError):
                will_fd = open_will(self.state.will_path(record.pid))
        if not (record.began or will_fd >= 0):
            return
        if os.WIFEXITED(status):
            how = f"exited with status {os.WEXITSTATUS(status)}"
        else:
            how = f"was {lifeline.describe_status(status)}"
        name = worker_name(record.pid)
        try:
            pid = self._fork(lambda: self._become_settler(name, will_fd, how))
        except OSError as error:
            log.error("cannot fork a settler for worker %d: %s", record.pid, error)
            return
        finally:
            if will_fd >= 0:
                os.close(will_fd)  # the helper has its own copy
        self.helpers[pid] = f"settler of worker {record.pid}"

    def _become_settler(self, name: str, will_fd: int, how: str) -> int:
        # Not tied to the manager: what it settles must be settled even if the manager exits.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, MANAGER_SIGNALS)
        set_role("settler", self.appname)
        app = f"[{self.appname}]" if self.appname else ""
        proctitle.set_title(f"qless-pool-settler{app}: settling what {name} left")
        return settle_remains(self.redis_url, name, will_fd, how)

    def desired(self) -> Groups:
        return {} if self.winched else self.groups

    def _active(self) -> dict[tuple[str, ...], list[WorkerRecord]]:
        """The workers that count toward each group (not retiring), by group: made once per
        use, not once per group (a config may have thousands of groups)."""
        active: dict[tuple[str, ...], list[WorkerRecord]] = {}
        for record in self.workers.values():
            if not record.retiring:
                active.setdefault(record.queues, []).append(record)
        return active

    def _next_spawn_time(self, now: float) -> float:
        """When reconcile can next start a missing worker (far away if none is missing)."""
        active = self._active()
        times = [
            max(self.next_spawn_at, self.backoffs[q].until if q in self.backoffs else now)
            for q, n in self.desired().items()
            if len(active.get(q, ())) < n
        ]
        return min(times, default=now + TICK)

    def reconcile(self) -> None:
        """QUIT the surplus workers of every group, then spawn the missing ones."""
        desired = self.desired()
        now = time.monotonic()
        active = self._active()
        for queues in list(active):
            group = active[queues]
            backoff = self.backoffs.get(queues)
            if (
                backoff
                and backoff.failures
                and any(w.began or now - w.started_at >= HEALTHY_AFTER for w in group)
            ):
                log.info("workers for %s start healthily again", ",".join(queues))
                backoff.failures = 0
            surplus = max(0, len(group) - desired.get(queues, 0))
            for record in sorted(group, key=lambda w: w.started_at, reverse=True)[:surplus]:
                log.info("worker %d (%s) is surplus; sending QUIT", record.pid, ",".join(queues))
                _kill(record.pid, signal.SIGQUIT)
                self.workers[record.pid] = replace(record, retiring=True)
                group.remove(record)
        for queues, count in desired.items():
            backoff = self.backoffs.get(queues)
            live = len(active.get(queues, ()))
            while live < count:
                if backoff is not None and now < backoff.until:
                    break
                if now < self.next_spawn_at:
                    return
                if self.spawn(queues) is None:
                    break
                live += 1
                if self.spawn_delay:
                    self.next_spawn_at = now + self.spawn_delay

    # --- forking a worker -----------------------------------------------------------------------

    def spawn(self, queues: tuple[str, ...]) -> Optional[int]:
        """Fork a worker parent for ``queues``; returns its pid (None if fork failed)."""
        try:
            assert self.notes is not None
            pid = self._fork(lambda: self._become_worker(queues), keep=[self.notes.write_fd])
        except OSError as error:
            log.error("cannot fork a worker for %s: %s", ",".join(queues), error)
            self._note_exit(queues, 0.0)
            return None
        self.workers[pid] = WorkerRecord(pid, queues, time.monotonic())
        log.info("spawned worker %d for %s", pid, ",".join(queues))
        return pid

    def _fork(self, body: Callable[[], int], keep: Sequence[int] = ()) -> int:
        """Fork a child that drops the manager's state, runs ``body`` and exits with its status;
        of the manager's own descriptors it keeps ``keep`` only."""
        # Blocked across the fork; a worker unblocks them once its own handlers are in place.
        signal.pthread_sigmask(signal.SIG_BLOCK, MANAGER_SIGNALS)
        try:
            pid = os.fork()
        finally:
            if os.getpid() == self.pid:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, MANAGER_SIGNALS)
        if pid:
            return pid
        status = 1
        try:
            signal.set_wakeup_fd(-1)
            listener = [self.metrics_listener.fileno()] if self.metrics_listener else []
            assert self.notes is not None
            own = (self._wakeup_r, self._wakeup_w, self.notes.read_fd, self.notes.write_fd)
            for fd in (*own, *self.close_in_workers, *listener):
                if fd not in keep:
                    os.close(fd)
            for signum in MANAGER_SIGNALS:
                signal.signal(signum, signal.SIG_DFL)
            # The worker unblocks its own signals once its handlers are in place; these it
            # never handles, and a blocked mask would pass to every job (even across exec).
            signal.pthread_sigmask(signal.SIG_UNBLOCK, MANAGER_ONLY_SIGNALS)
            if not self.single_process_group:
                # Its own process group: a terminal's Ctrl-C reaches the manager only.
                os.setpgid(0, 0)
            status = body()
        except BaseException:
            log.exception("child process failed")
            status = 1
        finally:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except Exception:  # exiting regardless
                    pass
            os._exit(status)

    def _become_worker(self, queues: tuple[str, ...]) -> int:
        """The worker parent's body: the after_prefork hooks, then the worker's loop."""
        set_role("worker", self.appname)
        worker = Worker(
            list(queues),
            self.redis_url,
            watch_parent=self.pid,
            appname=self.appname,
            state_path=self.state.worker_path(os.getpid()) if self.state else None,
            will_path=self.state.will_path(os.getpid()) if self.state else None,
            notes_fd=self.notes.write_fd if self.notes else None,
            pause=self.pause,
            metrics=self.metrics_listener is not None,
            **self.worker_options,
        )
        try:
            hooks.run_after_prefork(worker)
        except Exception:
            log.exception("an after_prefork hook failed in the worker for %s", ",".join(queues))
            return 1
        return worker.work()

    def _become_drain_watcher(self, started: float) -> int:
        lifeline.die_with_parent(self.pid)
        # The signals stay unblocked-by-default here: the watcher uses default dispositions.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, MANAGER_SIGNALS)
        groups = self.groups or {}
        # Only queues a worker serves can drain; the others are looked at once, for a warning.
        served = [queue for group, count in groups.items() if count for queue in group]
        unserved = [queue for group in groups for queue in group if queue not in served]
        watcher = DrainWatcher(
            served,
            self.redis_url,
            self.pid,
            self.worker_options.get("interval", 5.0),
            self.appname,
            started,
            unserved=unserved,
        )
        return run_watcher(watcher)

    def _keep_metrics_helper(self) -> None:
        if (
            self.metrics_listener is None
            or self.metrics_pid is not None
            or self.state is None
            or time.monotonic() < self.metrics_restart_at
        ):
            return
        self.metrics_pid = self._fork(
            self._become_metrics_helper, keep=[self.metrics_listener.fileno()]
        )

    def _become_metrics_helper(self) -> int:
        from ..ops import metrics

        lifeline.die_with_parent(self.pid)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, MANAGER_SIGNALS)
        set_role("metrics", self.appname)
        address, port = self.metrics_listener.getsockname()[:2]
        app = f"[{self.appname}]" if self.appname else ""
        proctitle.set_title(f"qless-pool-metrics{app}: serving http://{address}:{port}/metrics")
        assert self.state is not None
        return metrics.serve(self.metrics_listener, self.state.directory, self.redis_url)

    def _update_title(self) -> None:
        title = proctitle.manager(self.appname, self.workers.values())
        if title != self._title:
            proctitle.set_title(title)
            self._title = title
        if len(self.workers) != self._worker_count:
            self._worker_count = len(self.workers)
            self._emit("workers")
        self._publish_state()

    # --- the state qless-pool status reads (state.py) -------------------------------------------

    def _open_state(self) -> None:
        try:
            self.state = state.PoolState(self.pid)
        except OSError as error:
            log.warning("no state for qless-pool status: %s", error)

    def _publish_state(self) -> None:
        """Rewrite manager.json when anything in it has changed (spawns, reaps, signals)."""
        if self.state is None:
            return
        now = time.monotonic()
        desired = self.desired() if self.groups is not None else {}
        backoffs = {q: b.until for q, b in self.backoffs.items() if b.failures and b.until > now}
        snapshot = (
            tuple(self.workers.values()),
            tuple(desired.items()),
            tuple(backoffs.items()),
            self.stopping,
            tuple(self.restarts.values()),
            self.metrics_pid,
        )
        if snapshot == self._published and self.state.intact():
            return
        wall = time.time() - now  # monotonic -> epoch
        groups = []
        active = self._active()
        for queues in dict.fromkeys([*desired, *(w.queues for w in self.workers.values())]):
            groups.append(
                {
                    "queues": list(queues),
                    "desired": desired.get(queues, 0),
                    "live": len(active.get(queues, ())),
                    "backoff_until": wall + backoffs[queues] if queues in backoffs else None,
                }
            )
        data = {
            "version": 1,
            "pid": self.pid,
            "started": self.started,
            "appname": self.appname,
            "config": self.source.name,
            "environment": self.source.environment,
            # Never the password: the state is files any process of the pool's user can read.
            "redis_shown": mask_secrets(self.redis_url),
            "redis_masked": mask_secrets(self.redis_url) != self.redis_url,
            "stopping": self.stopping,
            "winched": self.winched,
            "groups": groups,
            "workers": [
                {
                    "pid": w.pid,
                    "queues": list(w.queues),
                    "started": wall + w.started_at,
                    "retiring": w.retiring,
                }
                for w in self.workers.values()
            ],
            "restarts": dict(self.restarts),
            "options": self.effective_options(),
            "drain_pid": self.drain_pid,
            "metrics_pid": self.metrics_pid,
        }
        try:
            if not self.state.intact():
                if self._state_written:
                    log.warning(
                        "the pool's state in %s was removed under it; making it again (the "
                        "running workers' records for qless-pool status are lost)",
                        self.state.directory,
                    )
                    self._state_written = False
                self.state.restore()
                self._restore_metrics_directory()
            self.state.write_manager(data)
        except OSError as error:
            # Tried again on every turn (intact() says no) or change; said once, not each time.
            if str(error) != self._state_problem:
                log.warning("cannot write the pool's state (for qless-pool status): %s", error)
                self._state_problem = str(error)
            return
        self._published = snapshot
        self._state_written = True
        if self._state_problem is not None:
            log.info("the pool's state is written again, in %s", self.state.directory)
            self._state_problem = None

    def _restore_metrics_directory(self) -> None:
        """The multiprocess directory lives beside the pool's (state.private_base): gone with
        it, it is made again, so that the workers count their jobs again."""
        if self.metrics_listener is not None:
            from ..ops import metrics

            metrics.restore()

    def _emit(self, event: str) -> None:
        if self.lifecycle is not None:
            self.lifecycle(event, self)


def _clean_exit(status: int) -> bool:
    """A worker's exit that leaves nothing to settle: it stopped as asked, or to be recycled."""
    return os.WIFEXITED(status) and os.WEXITSTATUS(status) in (0, RECYCLED)


def _describe_groups(groups: Groups) -> str:
    return ", ".join(f"{','.join(q)}: {n}" for q, n in groups.items()) or "no workers"


def _kill(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:  # exited and reaped by someone else: nothing to signal
        pass
