"""The keeper: what stays of a manager that handed its pool over in the foreground
(pool/reload.py says when and why).

It forwards every signal it gets to the current manager and exits with that manager's status,
following it across later reloads (a new manager comes to it, as subreaper, when the one before
exits). ``qless-pool`` and ``invoke qless.pool`` run this file as a script in place of the old
manager (``execv``: the same pid, its children, its subreaper setting and its blocked signals
kept), so that what stays in the terminal, or as PID 1 of a container, is a bare Python, not a
copy of the old application. Hence only the standard library (and setproctitle, if there) is
imported here, and nothing of the package: ``python keeper.py MANAGER_PID APPNAME``.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
import sys
import time
from typing import Optional

#: Every signal the manager acts on (pool/signals.py MANAGER_SIGNALS, less SIGCHLD: a test
#: keeps the two lists the same).
FORWARDED = (
    signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGUSR1,
    signal.SIGUSR2, signal.SIGCONT, signal.SIGWINCH, signal.SIGURG,
)  # fmt: skip
#: As the manager: a terminal's TTIN or TTOU must not stop it.
IGNORED = (signal.SIGTTIN, signal.SIGTTOU)
PR_SET_CHILD_SUBREAPER = 36


def become_keeper(manager: int, appname: str, in_place: bool = True) -> int:
    """Become the keeper of ``manager``. ``in_place``: execute this file in place of this
    process, which lets the old application's memory go (the command, Invoke); else keep in
    this process and return the manager's status (``qless_pool.run()``: its caller gets control
    back)."""
    if in_place:
        with contextlib.suppress(OSError):  # else: keep in this process after all
            sys.stdout.flush()
            sys.stderr.flush()
            script = os.path.abspath(__file__)
            os.execv(sys.executable, [sys.executable, "-I", script, str(manager), appname])
    return keep(manager, appname)


def keep(manager: int, appname: str) -> int:
    """Forward signals to ``manager`` (and its successors) until it exits; its exit status."""
    app = f"[{appname}]" if appname else ""
    _become_subreaper()
    read_fd, write_fd = os.pipe()
    for fd in (read_fd, write_fd):
        os.set_blocking(fd, False)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    for signum in (*FORWARDED, signal.SIGCHLD):
        signal.signal(signum, _wake_only)
    for signum in IGNORED:
        signal.signal(signum, signal.SIG_IGN)
    # Held blocked since the manager's loop ended: delivered now, to the handlers above.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [*FORWARDED, signal.SIGCHLD])
    _say(app, f"keeping this process for manager {manager}: signals sent here are passed on")
    status: Optional[int] = None  # the last exit of our manager
    titled = -1
    try:
        while True:
            if manager != titled:
                _set_title(f"qless-pool-keeper{app}: manager {manager}")
                titled = manager
            poller = select.poll()
            poller.register(read_fd, select.POLLIN)
            if poller.poll(1000):
                with contextlib.suppress(BlockingIOError):
                    for number in os.read(read_fd, 4096):
                        if number != signal.SIGCHLD:
                            with contextlib.suppress(ProcessLookupError):
                                os.kill(manager, number)
            while True:  # every exited child: our manager, or an orphan we adopted
                try:
                    pid, exited = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                if not pid:
                    break
                if pid == manager:
                    status = exited
            if status is None and _alive(manager):
                continue
            # It has exited; after a hand-over its successor is our child now (as subreaper).
            successor = _manager_among_children()
            if successor is None:
                said = _describe(status) if status is not None else "gone"
                _say(app, f"manager {manager} exited ({said})")
                return _exit_code(status) if status is not None else 0
            _say(app, f"manager {manager} handed over to {successor}")
            manager, status = successor, None
    finally:
        signal.set_wakeup_fd(-1)
        for fd in (read_fd, write_fd):
            os.close(fd)


def _wake_only(signum: int, frame: object) -> None:
    """The handler: nothing (Python's C handler has written the number to the wakeup pipe)."""


def _become_subreaper() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _children() -> list[int]:
    me = os.getpid()
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            path = f"/proc/{entry}/stat"
            with contextlib.suppress(OSError, IndexError, ValueError), open(path, "rb") as file:
                if int(file.read().rsplit(b")", 1)[1].split()[1]) == me:
                    found.append(int(entry))
    return found


def _manager_among_children() -> Optional[int]:
    """A child of this process titled as a pool manager (one adopted as subreaper)."""
    for pid in _children():
        with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as file:
            if file.read(64).startswith(b"qless-pool-manager"):
                return pid
    return None


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit status {os.WEXITSTATUS(status)}"


def _exit_code(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def _set_title(title: str) -> None:
    try:
        from setproctitle import setproctitle
    except ImportError:  # pragma: no cover - a dependency of the package; the title is a nicety
        return
    setproctitle(title)


def _say(app: str, message: str) -> None:
    """One line in the pool's log format (the package's logging is not loaded here)."""
    now = time.time()
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)) + f",{int(now % 1 * 1000):03d}"
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.write(f"{stamp} qless-pool-keeper{app}[{os.getpid()}] INFO: {message}\n")
        sys.stderr.flush()


if __name__ == "__main__":
    sys.exit(keep(int(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else ""))
