"""What the pool manager does on each signal, the loop's part (a base of manager.Pool).

    HUP     reopen the log files; reload the config (a bad one: keep the old) and restart every
            worker gracefully: once per burst of HUPs (HUP_QUIET, HUP_LONGEST)
    QUIT    QUIT every worker, wait for all, exit 0 (INT or TERM meanwhile: escalate)
    INT     QUIT every worker, exit at once
    TERM    as --term-immediate (INT every worker), --term-graceful or --term-graceful-wait say
    WINCH   (a daemon only) QUIT every worker, stay up with none until HUP
    URG     reload: hand the pool over to a new manager running the new code (reload.py;
            during a hand-over each signal is for both pools, as reload.py says)
    USR1, USR2, CONT   passed on to every worker; the pause is the pool's (notes.PauseFlag)
    TTIN, TTOU         ignored

The handlers do nothing: Python's C-level handler writes the signal's number to a wakeup pipe,
the manager's loop reads it (:meth:`ManagerSignals._read_signals`) and acts on one signal at a
time (``handle_<signal>`` methods), outside any handler.
"""

from __future__ import annotations

import os
import signal
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Callable, Optional

from .. import lifeline
from ..config import ConfigError, ConfigSource, Groups, describe_groups, highest
from ..logs import logger
from ..notes import PauseFlag
from ..worker import HANDLED_SIGNALS
from .table import Backoff, WorkerRecord

__all__ = [
    "IGNORED_SIGNALS",
    "MANAGER_ONLY_SIGNALS",
    "MANAGER_SIGNALS",
    "RELOAD_SIGNAL",
    "ManagerSignals",
]

log = logger.getChild("manager")

#: The signal behind ``qless-pool reload`` (reload.py): one the seed's contract does not assign,
#: and whose default action (ignore) leaves a process that does not expect it alone.
RELOAD_SIGNAL = signal.SIGURG
#: Signals only the manager handles; the rest are the worker's too.
MANAGER_ONLY_SIGNALS = (signal.SIGHUP, signal.SIGWINCH, RELOAD_SIGNAL)
MANAGER_SIGNALS = (*MANAGER_ONLY_SIGNALS, *HANDLED_SIGNALS)
#: Signals that would stop the manager (their default action), for no reason of its own: a
#: background process group reading or writing the terminal. Ignored (the workers too).
IGNORED_SIGNALS = (signal.SIGTTIN, signal.SIGTTOU)
#: HUPs in a burst are one reload: it waits until none has come for HUP_QUIET seconds, and at
#: most HUP_LONGEST seconds after the first (a storm of HUPs must not restart every worker once
#: each, nor postpone the reload for ever).
HUP_QUIET = 0.2
HUP_LONGEST = 2.0


class ManagerSignals:
    """The manager's signals (see the module's docstring)."""

    # The manager's, read and set here.
    stopping: Optional[str]
    signals: deque[int]
    reopen_logs: Optional[Callable[[], None]]
    reload_due: Optional[float]
    reload_asked: Optional[float]
    hups: int
    source: ConfigSource
    groups: Optional[Groups]
    winched: bool
    backoffs: dict[tuple[str, ...], Backoff]
    restarts: dict[str, int]
    last_reload: Optional[dict[str, Any]]
    workers: dict[int, WorkerRecord]
    term_behaviour: str
    daemonized: bool
    pause: PauseFlag
    drain_pid: Optional[int]
    metrics_pid: Optional[int]
    _wakeup_r: int
    _wakeup_w: int

    def _emit(self, event: str) -> None:
        raise NotImplementedError

    def signal_workers(self, signum: int, retire: bool = True) -> None:
        raise NotImplementedError

    def reconcile(self) -> None:
        raise NotImplementedError

    if TYPE_CHECKING:  # ranges.Ranges', later in the manager's bases

        def configure_ranges(self) -> None: ...

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

    if TYPE_CHECKING:  # reload.Reloading's, later in the manager's bases

        def during_hand_over(self, signum: int) -> bool: ...

    def handle_signal(self, signum: int) -> None:
        if self.during_hand_over(signum):
            return
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
            self._reloaded(str(error))
            return
        except Exception as error:  # a bug of ours, or of a config loader: never the manager's end
            log.exception("HUP: reading %s failed; keeping the current config and workers",
                          self.source.name)  # fmt: skip
            self._reloaded(f"reading {self.source.name} failed: {error!r}")
            return
        for warning in self.source.warnings:
            log.warning("HUP: %s", warning)
        self._warn_if_empty(groups, "HUP: ")
        self.groups = groups
        self.configure_ranges()  # a range group keeps its count, clamped into its new range
        self.winched = False
        self.backoffs.clear()
        log.info("HUP: config %s; restarting every worker gracefully", describe_groups(groups))
        self.restarts["reload"] += sum(not w.retiring for w in self.workers.values())
        self.signal_workers(signal.SIGQUIT)
        self.reconcile()
        self._reloaded(None)

    def _reloaded(self, error: Optional[str]) -> None:
        """A reload is over: kept for qless-pool status (a rejected one stays said until the
        next reload succeeds)."""
        self.last_reload = {"at": time.time(), "ok": error is None, "error": error}
        self._emit("reloaded")

    def _warn_if_empty(self, groups: Groups, prefix: str) -> None:
        if not any(highest(count) for count in groups.values()):
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
                lifeline.send(
                    self.drain_pid, signal.SIGTERM
                )  # if it asked for the stop, it has exited
            if self.metrics_pid is not None:
                lifeline.send(self.metrics_pid, signal.SIGTERM)
        self.stopping = how

    def _forward(self, signum: int) -> None:
        log.info("%s: passing it on to every worker", signal.Signals(signum).name)
        self.signal_workers(signum, retire=False)
