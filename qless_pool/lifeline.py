"""Keeping the pool's processes tied together: no process outlives the one it serves.

- A job child (and a helper of the manager: the drain watcher, the metrics server, a standby
  child) dies with its parent: :func:`die_with_parent`. On Linux the kernel sends it SIGKILL
  when its parent dies (``prctl(PR_SET_PDEATHSIG)``); elsewhere a thread in the child checks its
  parent twice a second and kills the child's process group when the parent is gone.
- A job child leads its own process group, and when it ends whatever is left in that group
  (a background process the job started) is killed: :func:`reap_group`. A job that really wants
  a process to outlive it must start it in a session of its own (``setsid``).
- The manager is a *subreaper* (Linux): a job child whose worker parent was killed is
  re-parented to the manager rather than to init, so the manager can kill what the job left in
  its group once the child itself is dead (the worker parent, which would have done it, is gone).

A worker parent is deliberately not tied to the manager this way: when the manager dies, each
worker finishes its current job before it exits (docs/ARCHITECTURE.md, "The invariants").
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, NoReturn, Optional

__all__ = [
    "HAVE_PDEATHSIG",
    "alive",
    "become_subreaper",
    "children",
    "die_with_parent",
    "exit_child",
    "kill_group",
    "leads_group_in_session",
    "reap",
    "send",
]

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
#: How often the fallback thread (no PR_SET_PDEATHSIG on this platform) looks at its parent.
PARENT_POLL = 0.5


def _load_prctl() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # pragma: no cover - a libc without prctl
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    return prctl


# Resolved once, at import (in the manager, before any fork): a job child only makes the call.
_prctl = _load_prctl()
HAVE_PDEATHSIG = _prctl is not None


def die_with_parent(parent_pid: int, use_prctl: bool = True) -> None:
    """Make this process die (SIGKILL) when ``parent_pid``, its parent, dies.

    Called right after the fork. The parent may already have died before the call: then this
    process is killed at once. Without PR_SET_PDEATHSIG (or with ``use_prctl=False``), a daemon
    thread checks the parent every PARENT_POLL seconds and kills this process's group.
    """
    if use_prctl and _prctl is not None and _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0:
        if os.getppid() != parent_pid:  # it died before the prctl: no signal will come
            os.kill(os.getpid(), signal.SIGKILL)
        return
    thread = threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True)
    thread.start()


def _watch_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(PARENT_POLL)
    with contextlib.suppress(OSError):
        if os.getpgid(0) == os.getpid():
            os.killpg(0, signal.SIGKILL)  # a job child: its leftovers go with it
    os.kill(os.getpid(), signal.SIGKILL)


def alive(pid: int) -> bool:
    """Is there a process ``pid`` (ours or another user's)?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # there is one; it is another user's
        pass
    return True


def become_subreaper(on: bool = True) -> bool:
    """Adopt the orphans of this process's descendants (Linux); returns whether it worked."""
    if _prctl is None:
        return False
    return bool(_prctl(_PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) == 0)


def send(pid: int, signum: int) -> None:
    """Signal ``pid``; one that has exited (and been reaped) is fine."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def kill_group(pgid: int, signum: int) -> None:
    """Signal a process group (or, if not allowed, its leader alone); gone is fine."""
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass
    except PermissionError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pgid, signum)


def reap(
    pid: Optional[int] = None,
    kill_leftovers: Callable[[int, int], bool] = lambda pid, status: True,
) -> Optional[tuple[int, int]]:
    """Reap one exited child (``pid``, or any child if None): ``(pid, wait status)``, or None if
    none has exited. First, while the zombie still holds its pid and so its process group id
    (nothing can reuse them yet), kill whatever is left in the group it leads, if
    ``kill_leftovers(pid, wait status)`` says so. Asked for a ``pid`` that is not a child of
    this process, raises ChildProcessError; with no child at all, returns None.
    """
    waitid = getattr(os, "waitid", None)
    if waitid is None:  # pragma: no cover - macOS before Python 3.13: reap first, then kill
        try:
            found, status = os.waitpid(-1 if pid is None else pid, os.WNOHANG)
        except ChildProcessError:
            if pid is not None:
                raise
            return None
        if not found:
            return None
        if kill_leftovers(found, status):
            kill_group(found, signal.SIGKILL)
        return found, status
    idtype, ident = (os.P_ALL, 0) if pid is None else (os.P_PID, pid)
    try:
        result = waitid(idtype, ident, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        if pid is not None:
            raise
        return None
    if result is None or not result.si_pid:
        return None
    found = result.si_pid
    # The wait status waitpid will give, from what waitid says without reaping.
    exited = result.si_code == os.CLD_EXITED
    status = (result.si_status & 0xFF) << 8 if exited else result.si_status & 0x7F
    if kill_leftovers(found, status):
        kill_group(found, signal.SIGKILL)
    return os.waitpid(found, 0)


def leads_group_in_session(pid: int) -> bool:
    """Does ``pid`` (alive or a zombie) lead a process group of this process's session? A job
    child does; a process the job moved to a session of its own on purpose does not."""
    try:
        return os.getpgid(pid) == pid and os.getsid(pid) == os.getsid(0)
    except OSError:
        return False


def describe_status(status: int) -> str:
    """A wait status in words: ``exit status 3``, ``killed by SIGKILL``; ``vanished`` for -1 (a
    child reaped by someone else)."""
    if status < 0:
        return "vanished"
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit status {os.WEXITSTATUS(status)}"


def wake_only(signum: int, frame: Any) -> None:
    """A signal handler that does nothing: installed with ``signal.set_wakeup_fd``, whose pipe
    already holds the signal's number for the process's loop to act on."""


def exit_child(status: int) -> NoReturn:
    """The end of a forked child: flush what it printed, then ``os._exit`` (never the parent's
    atexit handlers, nor its buffered output a second time)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # exiting regardless
            pass
    os._exit(status)


def children(pid: int) -> list[int]:
    """The live children of ``pid`` (by /proc: any process, not only this one's)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as file:
                fields = file.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(entry))
    return found
