"""Reload: new code without a stop (``qless-pool reload``, which sends SIGURG), as a rolling
hand-over from the running manager to a new one it starts (a base of manager.Pool; the channel,
the request and each side's record are in handover.py)::

    the old manager                              the new manager (its child, re-executed)
    URG: fork, and exec the same command line    reads the config file, preloads the
         and environment, from the working       application afresh; takes over the inherited
         directory as given ($PWD)               metrics socket; never daemonizes
                                        <----    ready {its counts}
    keeps per group min(its count, the new       spawns workers while, per group, both pools
    count - new workers up): reconcile QUITs     take jobs for at most one more than the count
    one old worker per new one up (its           (the surge)
    running job finishes first)  ---- active {group: n} ---->
                                        <----    up {group: n}   n of its workers reserve
                                        <----    serving          every slot is up
    agrees (no deadline from here)   ---- take-over ---->
                                                 renames its pidfile over the old one, tells
                                        <----    taken           systemd MAINPID= and READY=1
    QUITs the rest; exits after their jobs
    (or stays, as the keeper: see below)

Capacity never falls below the configured counts and exceeds them by one worker per group at
most. Neither manager talks to Redis. The old manager gives up after ``timeout`` seconds without
"serving" (or at an error, or when the new manager exits): it kills a new manager still
preloading, and QUITs one that has workers once its own are back up. A reload's outcome is kept
in manager.json (``reloads``), where ``qless-pool reload`` reads it.

*The keeper.* A manager whose parent waits for it (a terminal, ``invoke qless.pool`` or
``qless_pool.run()`` in the foreground, PID 1 of a container) must not exit when it hands
over: its parent would take the pool for stopped while the new one runs on unseen. Once its own
workers are gone it stays as the keeper: it forwards every signal it gets to the current
manager (its child, or a child's successor adopted as subreaper) and exits with its status
(keeper.py, executed in place of the old manager: a bare Python, the old application's memory
let go). A daemon or a systemd service (``$NOTIFY_SOCKET``: ``NotifyAccess=all`` lets systemd
follow ``MAINPID=``) exits instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import tempfile
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Callable, Optional

from .. import lifeline
from ..logs import logger
from ..ops.finding import running
from .handover import (
    ROLLBACK_LONGEST,
    SUCCESSOR_VARIABLE,
    Channel,
    HandOver,
    Successor,
    decode_counts,
    encode_counts,
    exec_successor,
    logical_directory,
    read_requests,
    remove_directory,
)
from .signals import RELOAD_SIGNAL
from .table import WorkerRecord, active_by_group

__all__ = ["RELOAD_SIGNAL", "Reloading", "logical_directory"]

log = logger.getChild("manager")

Queues = tuple[str, ...]


class Reloading:
    """Both managers' parts of a reload (see the module's docstring)."""

    # The manager's, read and set here.
    pid: int
    appname: str
    workers: dict[int, WorkerRecord]
    stopping: Optional[str]
    drain: bool
    winched: bool
    daemonized: bool
    metrics_listener: Optional[Any]
    metrics_pid: Optional[int]
    pause: Any
    state: Any
    groups: Any
    scaler: Any  # ranges.py: the range groups' wanted counts pass to the new manager
    single_process_group: bool
    #: The environment and working directory the pool was started with (pool/launch.py sets
    #: them; run() alone: the process's): the new manager starts with the same.
    start_environ: Optional[dict[str, str]]
    start_directory: str
    #: Is this manager's parent waiting for it (a terminal, PID 1's container)? Then it stays
    #: as the keeper after a hand-over. None: decide (``keeps``).
    handover: Optional[HandOver]
    successor: Optional[Successor]
    reloads: deque[dict[str, Any]]
    #: Called on the new manager when it serves every slot: the pidfile is taken over here.
    on_serving: list[Callable[[], None]]
    publisher: Any
    lock_fd: Optional[int]  # the lock file's descriptor (pool/launch.py), if -l
    pidfile_fd: Optional[int]  # the pidfile's (pool/launch.py), if any
    signals: Any

    if TYPE_CHECKING:  # the manager's other bases'

        def _emit(self, event: str) -> None: ...

        def _fork(self, body: Callable[[], int], keep: Any = ()) -> int: ...

        def reconcile(self) -> None: ...

        def _cancel_reload(self, why: str) -> None: ...

        def range_counts(self, groups: Any) -> dict[tuple[str, ...], int]: ...

        def desired(self) -> dict[Queues, int]: ...

    # --- the old manager ----------------------------------------------------------------------

    @property
    def keeps(self) -> bool:
        """Does this manager stay as the keeper after handing over (the module's docstring)?"""
        if self.successor is not None and self.successor.kept:
            return False  # the keeper above it forwards to its successor
        notify = (self.start_environ or {}).get("NOTIFY_SOCKET")
        return os.getpid() == 1 or not (self.daemonized or notify)

    @property
    def handed_over(self) -> bool:
        return self.handover is not None and self.handover.phase == "handed-over"

    def handle_sigurg(self) -> None:
        requests = read_requests(self.state.directory if self.state else None)
        first, later = requests[0], requests[1:]
        for request in later:  # sent together: one reload serves the first
            why = "another reload came first, and runs"
            self._report({"id": request.id, "phase": "refused", "error": why})
        why_not = None
        if self.handover is not None and self.handover.running:
            why_not = f"a reload is in progress (new manager {self.handover.new_pid})"
        elif self.handed_over:
            assert self.handover is not None
            why_not = f"this pool has handed over to manager {self.handover.new_pid}"
        elif self.stopping:
            why_not = "the pool is stopping"
        elif self.winched:
            why_not = "the pool has no workers since WINCH (send HUP first)"
        elif self.drain:
            why_not = "a --drain pool stops once its queues are empty: it does not reload"
        elif self.successor is not None and not self.successor.serving:
            why_not = "this manager is still taking over from the one before it"
        if why_not:
            log.warning("reload refused: %s", why_not)
            self._report({"id": first.id, "phase": "refused", "error": why_not})
            return
        self._cancel_reload("a reload")  # the new manager reads the config afresh anyway
        self._start_successor(first.id, first.timeout)

    def _report(self, report: dict[str, Any]) -> dict[str, Any]:
        report = {"at": time.time(), "new_pid": None, "error": None, **report}
        self.reloads.append(report)
        return report

    def _start_successor(self, request_id: Optional[str], timeout: float) -> None:
        log.info("reload: starting a new manager from %s (timeout %gs)", self.start_directory,
                 timeout)  # fmt: skip
        channel, theirs = Channel.pair()
        passed = [theirs.fileno()]
        listener = self.metrics_listener.fileno() if self.metrics_listener is not None else None
        if listener is not None:
            passed.append(listener)
        # The pidfile (locked): rewritten in place by the new manager where it cannot make a
        # file beside it (a directory root owns, the pool running as --user).
        pidfile = self.pidfile_fd if self.pidfile_fd is not None and self.pidfile_fd >= 0 else None
        if pidfile is not None:
            passed.append(pidfile)
        handed = {
            "channel": theirs.fileno(),
            "metrics_fd": listener,
            "pidfile_fd": pidfile,
            "predecessor": os.getpid(),
            "kept": self.keeps or (self.successor is not None and self.successor.kept),
            "paused": self.pause.get(),
            "request": request_id,
            "active": encode_counts(self._active(), "active"),
            "scaled": encode_counts(self.scaler.wanted(), "wanted"),
        }
        environ = dict(self.start_environ if self.start_environ is not None else os.environ)
        environ[SUCCESSOR_VARIABLE] = json.dumps(handed)
        environ["PWD"] = self.start_directory
        metrics_directory = self._successor_metrics_directory(environ)
        try:
            pid = self._fork(
                lambda: exec_successor(environ, self.start_directory, passed, self.lock_fd),
                keep=passed,
            )
        except OSError as error:
            channel.close()
            theirs.close()
            remove_directory(metrics_directory)
            log.error("reload: cannot fork the new manager: %s", error)
            self._report({"id": request_id, "phase": "failed", "error": f"fork: {error}"})
            return
        theirs.close()
        self._emit("reloading")
        report = self._report({"id": request_id, "phase": "starting", "new_pid": pid})
        self.handover = HandOver(
            request_id, pid, channel, timeout, time.monotonic() + timeout, report=report,
            metrics_directory=metrics_directory,
        )  # fmt: skip

    def _successor_metrics_directory(self, environ: dict[str, str]) -> Optional[str]:
        """With --metrics-port, the new manager's multiprocess directory, made here (and set in
        its environment) so that this manager can remove it if the new one dies unseen."""
        from ..ops import metrics
        from ..ops.state import private_base

        if self.metrics_listener is None or environ.get(metrics.MULTIPROC_VARIABLE):
            return None  # none, or the application's own
        try:
            directory = tempfile.mkdtemp(prefix="metrics-", dir=private_base())
        except OSError:
            return None  # the new manager makes one itself
        environ[metrics.MULTIPROC_VARIABLE] = directory
        return directory

    def _read_channel(self) -> None:
        """What the new manager said (the old manager's loop, on every wake)."""
        handover = self.handover
        if handover is None or not handover.running:
            return
        for message in handover.channel.receive():
            kind = message.get("kind")
            if kind == "ready" and handover.phase == "starting":
                handover.phase = handover.report["phase"] = "handing-over"
                handover.counts = decode_counts(message.get("groups"), "count")
                log.info("reload: new manager %d is ready; handing the slots over one by one",
                         handover.new_pid)  # fmt: skip
            elif kind == "up":
                handover.up = decode_counts(message.get("groups"))
            elif kind == "serving" and handover.phase == "handing-over":
                # From here on no deadline: it takes the pidfile and MAINPID over, then says so.
                handover.phase = handover.report["phase"] = "committing"
                handover.channel.send("take-over")
            elif kind == "taken" and handover.phase == "committing":
                self._handed_over()
                return
            elif kind == "error":
                self._hand_over_failed(str(message.get("message")), kill=False)
                return
        # It closes its end once it has taken over (or dies: then reaping says so; a zombie
        # is not running).
        if handover.channel.gone() and handover.phase == "committing" and running(handover.new_pid):
            self._handed_over()

    def _handed_over(self) -> None:
        handover = self.handover
        assert handover is not None
        handover.phase = handover.report["phase"] = "handed-over"
        handover.report["took"] = round(time.time() - handover.report["at"], 3)
        handover.channel.close()
        log.info(
            "reload: new manager %d serves every slot; stopping the %d old worker(s) after their "
            "jobs%s", handover.new_pid, len(self.workers),
            ", then keeping the terminal" if self.keeps else ", then exiting",
        )  # fmt: skip
        # Its metrics helper and socket, and drain watcher, are the new manager's now.
        if self.metrics_pid is not None:
            lifeline.send(self.metrics_pid, signal.SIGTERM)
        if self.metrics_listener is not None:
            self.metrics_listener.close()
            self.metrics_listener = None
        self.reconcile()  # desired() is empty now: every old worker is QUIT

    def _hand_over_failed(self, error: str, kill: bool = True) -> None:
        """The new manager cannot take over: stop it, and serve on as before."""
        handover = self.handover
        assert handover is not None
        was = handover.phase
        handover.phase = handover.report["phase"] = "failed"
        handover.report["error"] = error
        handover.up = {}
        log.error("reload failed: %s; the running pool serves on", error)
        if kill and lifeline.alive(handover.new_pid) and was != "starting":
            # Its workers serve until ours are back up (_retire_failed_successor): then it is
            # sent QUIT (its workers finish their jobs). Until then the channel stays open: at
            # its end the new manager would stop by itself.
            handover.retire_by = time.monotonic() + ROLLBACK_LONGEST
        else:
            handover.channel.close()
            if kill and lifeline.alive(handover.new_pid):
                # Preloading (perhaps for ever): it has no workers, nothing to wait for.
                with contextlib.suppress(OSError):
                    os.killpg(handover.new_pid, signal.SIGKILL)
                lifeline.send(handover.new_pid, signal.SIGKILL)
        self._emit("reloaded")
        if handover.hup_pending and not self.stopping:
            self.signals.append(signal.SIGHUP)  # the HUP ignored meanwhile, now
        if not self.stopping:
            self.reconcile()

    def _check_hand_over(self, now: float) -> None:
        handover = self.handover
        if handover is not None and handover.retire_by is not None:
            self._retire_failed_successor(handover, handover.retire_by, now)
        if (
            handover is not None
            and handover.phase in ("starting", "handing-over")
            and now >= handover.deadline
        ):
            what = "ready" if handover.phase == "starting" else "serving every slot"
            self._hand_over_failed(
                f"the new manager {handover.new_pid} was not {what} within {handover.timeout:g}s"
            )

    def _retire_failed_successor(self, handover: HandOver, deadline: float, now: float) -> None:
        """After a failed reload: QUIT the new manager once this pool is back to its counts,
        every worker up (or ROLLBACK_LONGEST later, or at once if this pool stops), so that the
        failure never leaves the queues short of workers."""
        if not self.stopping and now < deadline:
            up = _up_by_group(self.workers.values())
            if any(up.get(q, 0) < n for q, n in self.desired().items()):
                return
        handover.retire_by = None
        handover.channel.close()
        lifeline.send(handover.new_pid, signal.SIGQUIT)

    def _successor_exited(self, pid: int, status: int) -> bool:
        """Was ``pid`` the new manager (True)? One that exits before serving fails the reload."""
        if self.handover is None or pid != self.handover.new_pid:
            return False
        if self.handover.retire_by is not None:  # gone by itself: no QUIT to a pid reused
            self.handover.retire_by = None
            self.handover.channel.close()
        if not self.handed_over:
            remove_directory(self.handover.metrics_directory)
        if self.handover.running:
            self._hand_over_failed(
                f"the new manager {pid} {lifeline.describe_status(status)} before it served "
                "(see the pool's log)",
                kill=False,
            )
        return True

    def during_hand_over(self, signum: int) -> bool:
        """A signal during a hand-over is for both pools; after it, this manager only finishes
        its workers' jobs (a keeper passes every signal on). True: nothing more to do here.

        =================  =====================================  ===========================
        signal             during the hand-over                   after it (old jobs finish)
        =================  =====================================  ===========================
        QUIT, INT, TERM    both pools stop (passed on, and here)  here; passed on by a keeper
        USR1, USR2, CONT   both pools (passed on, and here)       here; passed on by a keeper
        HUP, WINCH         ignored (the new manager reads the     passed on by a keeper
                           config afresh)
        URG                refused: one reload at a time          passed on by a keeper
        =================  =====================================  ===========================
        """
        handover = self.handover
        if handover is None or handover.phase == "failed":
            return False
        name = signal.Signals(signum).name
        ignored = signum in (signal.SIGHUP, signal.SIGWINCH)
        if handover.running:
            if ignored:
                log.info("%s ignored: a reload is in progress (the new manager reads the config "
                         "afresh)", name)  # fmt: skip
                handover.hup_pending |= signum == signal.SIGHUP
                return True
            stops = signum in (signal.SIGQUIT, signal.SIGINT, signal.SIGTERM)
            if stops and handover.phase == "starting":
                # Still loading the application: it has no workers, and cannot act on a signal
                # before it is loaded (perhaps never).
                self._hand_over_failed(f"{name} came before the new manager was ready")
            elif signum != RELOAD_SIGNAL:
                lifeline.send(handover.new_pid, signum)
            return False
        if self.keeps or (self.successor is not None and self.successor.kept):
            # The keeper (or one above us, still passing its signals to us) speaks for the pool.
            lifeline.send(handover.new_pid, signum)
            return ignored or signum == RELOAD_SIGNAL
        if ignored:
            log.info("%s ignored: this manager handed the pool over to %d (send it there)", name,
                     handover.new_pid)  # fmt: skip
            return True
        return False

    def reload_desired(self, desired: dict[Queues, int]) -> dict[Queues, int]:
        """The counts reconcile keeps while a reload runs, per group: the old pool one worker
        fewer for each new one up; the new pool at most one more than the configured count
        minus the old pool's (the surge), so that a new worker starts only once the old pool
        has let one go for the one before it."""
        if self.handover is not None:
            if self.handover.phase == "handed-over":
                return {}
            counts = self.handover.counts
            if self.handover.running and counts is not None:
                up = self.handover.up
                # Once told, an old worker that dies is the new manager's to replace, not ours.
                said = self.handover.active_said
                return {q: min(n, max(0, counts.get(q, 0) - up.get(q, 0)),
                               n if said is None else said.get(q, 0))
                        for q, n in desired.items()}  # fmt: skip
        if self.successor is not None and not self.successor.serving:
            old = self.successor.old_active
            return {q: min(n, max(0, n + 1 - old.get(q, 0))) for q, n in desired.items()}
        return desired

    def _active(self) -> dict[Queues, int]:
        return {q: len(group) for q, group in active_by_group(self.workers.values()).items()}

    def _tell_successor(self) -> None:
        """How many of its workers take jobs, by group (when that changed): the new manager
        starts its next worker of a group once the old pool has let one go."""
        handover = self.handover
        if handover is None or handover.phase not in ("handing-over", "committing"):
            return
        active = self._active()
        if active != handover.active_said:
            handover.active_said = active
            handover.channel.send("active", groups=encode_counts(active, "active"))

    # --- the new manager ----------------------------------------------------------------------

    def _channels(self) -> list[Channel]:
        """The channels the loop waits on, besides its signals and notes."""
        found = []
        if self.handover is not None and self.handover.running:
            found.append(self.handover.channel)  # closed at EOF: the new manager has exited
        if self.successor is not None:
            found.append(self.successor.channel)
        return [channel for channel in found if not channel.closed]

    def _tell_predecessor(self) -> None:
        """How many workers of each group are up (when that changed): the old manager keeps
        that many fewer; once every slot is up, take over."""
        successor = self.successor
        if successor is None or successor.serving:
            return
        up = _up_by_group(self.workers.values())
        if up != successor.up_said:
            successor.up_said = up
            successor.channel.send("up", groups=encode_counts(up))
        self._serve_if_every_slot_up()

    def _serve_if_every_slot_up(self) -> None:
        """Every slot of the new pool is up: ask the old manager to let it take over."""
        successor = self.successor
        if successor is None or successor.asked or self.groups is None:
            return
        up = _up_by_group(self.workers.values())
        wanted = self.range_counts(self.groups)  # a range: what this pool wants of it now
        if any(up.get(q, 0) < n for q, n in wanted.items()):
            return
        successor.asked = True
        successor.channel.send("serving")

    def _take_over(self) -> None:
        """The old manager agreed: take the pidfile and systemd's MAINPID, then say so (the old
        manager exits only then)."""
        successor = self.successor
        assert successor is not None
        successor.serving = True
        for take_over in self.on_serving:
            try:
                take_over()
            except Exception:  # the pool serves: what could not be taken over is said
                log.exception("taking over from manager %d", successor.predecessor)
        self._emit("ready")
        if self.publisher is not None:  # said before the old manager can exit: reload reads it
            self.publisher.publish(self)
        log.info("serving every slot: manager %d hands over to this one", successor.predecessor)
        successor.channel.send("taken")
        successor.channel.receive()  # what the old manager said meanwhile: read, not reset
        successor.channel.close()

    def _read_predecessor(self) -> None:
        """The old manager's end: it says nothing; it closes when it gives up or dies."""
        successor = self.successor
        if successor is None or successor.channel.closed:
            return
        for message in successor.channel.receive():
            if message.get("kind") == "active":
                successor.old_active = decode_counts(message.get("groups"), "active")
            elif message.get("kind") == "take-over" and successor.asked and not self.stopping:
                self._take_over()
                return
        if successor.channel.gone() and not successor.serving and not self.stopping:
            log.error("the old manager %d is gone before this one served: stopping",
                      successor.predecessor)  # fmt: skip
            os.kill(os.getpid(), signal.SIGQUIT)


def _up_by_group(workers: Any) -> dict[Queues, int]:
    return {q: sum(w.up for w in group) for q, group in active_by_group(workers).items()}
