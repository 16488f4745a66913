"""What the pool manager forks (a base of manager.Pool): its worker parents, and beside them
helpers, each for one job: the settler of a dead worker's jobs (worker/will.py), the drain
watcher (drain.py), the metrics server (ops/metrics.py). None of them makes the manager talk to
Redis: they do, in processes of their own.

Every child drops the manager's own state right after the fork (its wakeup pipe, the notes
pipe, the pidfile, the metrics socket; the manager's signal dispositions), and runs in a
process group of its own unless --single-process-group.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Callable, Optional

from .. import hooks, lifeline, options, proctitle
from ..config import Groups, highest
from ..logs import logger, set_role
from ..notes import Notes, PauseFlag, RetireSlots
from ..ops.state import PoolState
from ..worker import Worker, worker_name
from ..worker.will import open_will, settle_remains
from .drain import DrainWatcher, run_watcher
from .signals import MANAGER_ONLY_SIGNALS, MANAGER_SIGNALS
from .table import FIRST_BACKOFF, WorkerRecord, clean_exit

__all__ = ["Forking"]

log = logger.getChild("manager")


class Forking:
    """What the manager forks (see the module's docstring)."""

    # The manager's, read and set here.
    pid: int
    appname: str
    redis_url: str
    groups: Optional[Groups]
    worker_options: dict[str, Any]
    state: Optional[PoolState]
    stopping: Optional[str]
    exit_status: int
    helpers: dict[int, str]
    drain_pid: Optional[int]
    metrics_pid: Optional[int]
    metrics_listener: Optional[Any]
    metrics_restart_at: float
    workers: dict[int, WorkerRecord]
    notes: Optional[Notes]
    sampler_fd: int  # ranges.py: the sampler's pipe (not a worker's)
    pause: PauseFlag
    retire: RetireSlots
    single_process_group: bool
    close_in_workers: tuple[int, ...]
    _wakeup_r: int
    _wakeup_w: int

    def _note_exit(self, queues: tuple[str, ...], lived: float, began: bool = False) -> None:
        raise NotImplementedError

    if TYPE_CHECKING:  # reload.Reloading's

        def _channels(self) -> list[Any]: ...

    def signal_workers(self, signum: int, retire: bool = True) -> None:
        raise NotImplementedError

    def _stop(self, how: str) -> None:
        raise NotImplementedError

    def _helper_exited(self, pid: int, status: int) -> bool:
        """``pid`` was one of the helpers: act on its exit (True); else False."""
        if pid == self.drain_pid:
            self._drain_watcher_exited(status)
        elif pid == self.metrics_pid:
            self.metrics_pid = None
            if not self.stopping and self.metrics_listener is not None:  # not handed over
                log.error("the metrics helper exited (%s); restarting it",
                          lifeline.describe_status(status))  # fmt: skip
                self.metrics_restart_at = time.monotonic() + FIRST_BACKOFF
        elif pid in self.helpers:
            what = self.helpers.pop(pid)
            if not (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0):
                log.warning("%s: %s", what, lifeline.describe_status(status))
        else:
            return False
        return True

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

    def _become_drain_watcher(self, started: float) -> int:
        lifeline.die_with_parent(self.pid)
        # The signals stay unblocked-by-default here: the watcher uses default dispositions.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, MANAGER_SIGNALS)
        groups = self.groups or {}
        # Only queues a worker serves can drain; the others are looked at once, for a warning.
        served = [queue for group, count in groups.items() if highest(count) for queue in group]
        unserved = [queue for group in groups for queue in group if queue not in served]
        watcher = DrainWatcher(
            served,
            self.redis_url,
            self.pid,
            self.worker_options.get("interval", options.option("interval").default),
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
        listener = self.metrics_listener
        assert listener is not None and self.state is not None
        address, port = listener.getsockname()[:2]
        app = f"[{self.appname}]" if self.appname else ""
        proctitle.set_title(f"qless-pool-metrics{app}: serving http://{address}:{port}/metrics")
        return metrics.serve(listener, self.state.directory, self.redis_url)

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
            own = (self._wakeup_r, self._wakeup_w, self.notes.read_fd, self.notes.write_fd,
                   *([self.sampler_fd] if self.sampler_fd >= 0 else []))  # fmt: skip
            # A reload's channel (reload.py): the other manager must see it close with us.
            channels = [channel.fileno() for channel in self._channels()]
            for fd in (*own, *self.close_in_workers, *listener, *channels):
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
            lifeline.exit_child(status)

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
            retire=self.retire,
            metrics=self.metrics_listener is not None,
            **self.worker_options,
        )
        try:
            hooks.run_after_prefork(worker)
        except Exception:
            log.exception("an after_prefork hook failed in the worker for %s", ",".join(queues))
            return 1
        return worker.work()

    def _leftovers_to_kill(self, pid: int, status: int) -> bool:
        """Is what an exited process left in its process group to be killed (lifeline.reap)?

        A worker that died (not a clean exit) in a group of its own: whatever a job it ran in
        process started must not run on while the settler hands that job to another worker. An
        exited process we adopted (as subreaper) that led a process group of our session: a job
        child whose worker parent was killed."""
        if pid in self.workers:
            return not self.single_process_group and not clean_exit(status)
        return (
            pid not in self.helpers
            and pid not in (self.drain_pid, self.metrics_pid)
            and lifeline.leads_group_in_session(pid)
        )

    def _restore_metrics_directory(self) -> None:
        """The multiprocess directory lives beside the pool's (state.private_base): gone with
        it, it is made again, so that the workers count their jobs again."""
        if self.metrics_listener is not None:
            from ..ops import metrics

            metrics.restore()
