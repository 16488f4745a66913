"""The worker parent's signals (qless and resque semantics), as the loop acts on them.

    QUIT       finish the current job, then exit (within --graceful-timeout, if given)
    TERM, INT  stop the current job now (it is handed back), then exit
    USR1       stop the current job now (it is handed back), keep working
    USR2       take no new jobs (the title says Paused); CONT: take jobs again
    WINCH      retire if idle (a range's step down, pool/scaling.py): if its pool asked it
               (notes.RetireSlots) and no job runs, give back what it holds and exit
               (IDLE_RETIRED); running one, or not asked, ignored
    CHLD       (a job child exited: the loop reaps it on its next turn)

The handlers do nothing: Python's C-level handler writes each signal's number to the worker's
wakeup pipe, which its loop reads (``handle_<signal>`` methods). So no signal is lost and none
does the loop's work in a handler. (A job run in the worker process is the exception: TERM, INT,
USR1 and the job's alarms interrupt it where it is; see inprocess.py.)
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any, Optional

from .. import lifeline
from ..logs import logger
from ..notes import PauseFlag, RetireSlots
from .limits import Limits
from .reservation import Holding
from .runmode import RunMode

__all__ = ["HANDLED_SIGNALS", "IDLE_RETIRED", "SignalHandling"]

log = logger.getChild("worker")

#: Signals the worker parent acts on; SIGCHLD wakes it when a job child exits.
HANDLED_SIGNALS = (
    signal.SIGQUIT,
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGCONT,
    signal.SIGWINCH,
    signal.SIGCHLD,
)
#: The exit status of a worker that retired, idle, when its pool scaled down (pool/scaling.py).
IDLE_RETIRED = 76


class SignalHandling(RunMode):
    """The worker's part that reads and acts on its signals (a base of worker.base.Worker)."""

    # The worker's, read and set here.
    stopping: bool
    terminating: bool
    paused: bool
    pause: Optional[PauseFlag]
    retire: Optional[RetireSlots]
    next_poll: float
    stop_deadline: Optional[float]
    retired_idle: bool
    limits: Limits
    holding: Holding
    watch_parent: Optional[int]
    _wakeup_r: int
    _wakeup_w: int
    _saved_handlers: dict[int, Any]

    def _install_signal_handlers(self) -> None:
        self._wakeup_r, self._wakeup_w = os.pipe()
        for fd in (self._wakeup_r, self._wakeup_w):
            os.set_blocking(fd, False)
            os.set_inheritable(fd, False)
        # Put back at exit, for a process that runs a worker and then goes on (invoke qless.work).
        self._saved_handlers = {s: signal.getsignal(s) for s in (*HANDLED_SIGNALS, signal.SIGALRM)}
        signal.set_wakeup_fd(self._wakeup_w, warn_on_full_buffer=False)
        for signum in HANDLED_SIGNALS:
            signal.signal(signum, lifeline.wake_only)

    def _unblock_signals(self) -> None:
        # The pool manager forks workers with these signals blocked, so that one sent between
        # the fork and the handlers' installation waits for them instead of killing the worker.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)

    def _restore_signal_handlers(self) -> None:
        signal.set_wakeup_fd(-1)
        for signum, handler in self._saved_handlers.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        for fd in (self._wakeup_r, self._wakeup_w):
            if fd >= 0:
                os.close(fd)
        self._wakeup_r = self._wakeup_w = -1

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

    def handle_sigterm(self) -> None:
        log.info("TERM: stopping now")
        self._terminate("the worker was told to stop (SIGTERM)")

    def handle_sigint(self) -> None:
        log.info("INT: stopping now")
        self._terminate("the worker was told to stop (SIGINT)")

    def handle_sigusr1(self) -> None:
        log.info("USR1: killing the current job, if any")
        self._kill_running("the worker was told to kill it (SIGUSR1)")

    def handle_sigusr2(self) -> None:
        if not self.paused:
            log.info("USR2: paused; taking no new jobs until CONT")
        self.paused = True

    def handle_sigcont(self) -> None:
        if self.paused:
            log.info("CONT: taking jobs again")
        self.paused = False
        self.next_poll = 0.0

    def handle_sigwinch(self) -> None:
        if self.stopping or self.retire is None or not self.retire.asked(os.getpid()):
            # Not asked by its pool (a terminal's resize sends WINCH too), or asked and then
            # not any more (read after a job in process): nothing to do.
            return
        if self._busy():
            log.debug("WINCH: running a job, so not retiring")
            return
        log.info("WINCH: idle, retiring (the pool scales down)")
        self.retired_idle = True
        # As TERM for what it holds (given back unstarted, no retry spent), with nothing running.
        self.stopping = self.terminating = True

    def handle_sigchld(self) -> None:
        """Nothing to do here: the loop reaps its children on every turn."""

    def handle_sigalrm(self) -> None:
        """A job timeout in this process: already acted on, by the interrupt."""

    def _stop_gracefully(self) -> None:
        """Take no new job; the current one finishes (within --graceful-timeout, if given)."""
        self._start_graceful_timeout()
        self.stopping = True

    def _start_graceful_timeout(self) -> None:
        timeout = self.limits.graceful_timeout
        if timeout is not None and self.stop_deadline is None:
            self.stop_deadline = time.monotonic() + timeout
            self._stop_by(self.stop_deadline)

    def _check_graceful_deadline(self, now: float) -> None:
        """A graceful stop's deadline has passed: what runs or is held is stopped now."""
        deadline = self.stop_deadline
        if deadline is not None and now >= deadline and (self._busy() or self.holding):
            self._terminate(self.limits.graceful_reason())

    def _terminate(self, reason: str) -> None:
        self.stopping = self.terminating = True
        self._kill_running(reason)

    def _check_parent(self) -> None:
        """Exit (after the current job) when the process that forked this worker is gone."""
        if self.watch_parent is None or self.stopping:
            return
        if os.getppid() != self.watch_parent:
            log.warning(
                "the process that started this worker (%d) is gone; exiting after the current job",
                self.watch_parent,
            )
            self._stop_gracefully()
