"""Looking at real processes: /proc, titles, process trees, and waiting on conditions."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import time


def wait_for(condition, timeout: float = 10.0, interval: float = 0.02, message: str = ""):
    """Poll ``condition()`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message or condition}")
        time.sleep(interval)


def stays(condition, seconds: float, interval: float = 0.02, message: str = "") -> None:
    """A check that something does not happen: ``condition()`` holds all through ``seconds``,
    looked at every ``interval``, and the test fails the moment it does not. Only for what must
    not happen where nothing observable marks the moment it would have; everything else waits on
    its condition with ``wait_for``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not condition():
            raise AssertionError(f"no longer true: {message or condition}")
        time.sleep(interval)
    assert condition(), f"no longer true: {message or condition}"


def stat(pid: int) -> tuple[str, int] | None:
    """(state, ppid) of a process, or None if it does not exist."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            data = file.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = data[data.rindex(")") + 2 :].split()
    return fields[0], int(fields[1])


def alive(pid: int) -> bool:
    """Running (a zombie counts as gone)."""
    found = stat(pid)
    return found is not None and found[0] not in ("Z", "X")


def title(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            return file.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except (FileNotFoundError, ProcessLookupError):
        return ""


def children(pid: int) -> list[int]:
    """Living children of ``pid``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            info = stat(int(entry))
            if info is not None and info[1] == pid and info[0] not in ("Z", "X"):
                found.append(int(entry))
    return sorted(found)


def descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        for child in children(todo.pop()):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and everything below it (job children lead their own process groups)."""
    for target in [*descendants(pid), pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(target, signal.SIGKILL)


def become_subreaper() -> None:
    """Orphans of our descendants are re-parented to us (so tests can reap them)."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(36, 1)  # PR_SET_CHILD_SUBREAPER


def reap_orphans() -> None:
    """Collect any exited re-parented orphans (we are a subreaper)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def kill_processes_in(directory, timeout: float = 10.0) -> None:
    """SIGKILL every process whose working directory is ``directory`` or below it, and wait
    until they are gone (reaping those re-parented to us).

    A pool runs in the test's own temp directory, and so do its workers and their job children:
    this finds them even after the manager is gone and they have been re-parented.
    """
    root = os.path.realpath(directory)
    killed = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cwd = os.readlink(f"/proc/{entry}/cwd")
        except OSError:
            continue
        if cwd == root or cwd.startswith(root + os.sep):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry), signal.SIGKILL)
                killed.append(int(entry))

    def gone() -> bool:
        reap_orphans()
        return not any(stat(pid) for pid in killed)

    wait_for(gone, timeout, message=f"processes {killed} to be gone")


def as_unprivileged(fn):
    """Run ``fn()`` as a user without privileges and return what it returns (or raise what it
    raised, as RuntimeError with the message): in a forked child that drops to nobody when the
    tests run as root, in this process otherwise. Its result must be JSON."""
    if os.geteuid() != 0:
        return fn()

    def drop_privileges():
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)

    return in_child(fn, drop_privileges)


def in_child(fn, setup=None):
    """Run ``setup()`` then ``fn()`` in a forked child (which may change what it likes: its
    user, its mount namespace) and return what ``fn`` returns, which must be JSON; what it
    raised is raised here as RuntimeError with the message."""
    import json

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            os.close(read_end)
            if setup is not None:
                setup()
            try:
                answer = {"value": fn()}
            except Exception as error:
                answer = {"error": f"{type(error).__name__}: {error}"}
            os.write(write_end, json.dumps(answer).encode())
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    if not data:
        raise RuntimeError("the child died before it answered")
    answer = json.loads(data)
    if "error" in answer:
        raise RuntimeError(answer["error"])
    return answer["value"]


def successor_of(manager: int) -> int | None:
    """The manager a reload of ``manager`` started (its state says so: a freshly forked worker
    bears its manager's title for a moment, so a title cannot tell), if that one is alive."""
    from qless_pool.ops.state import pool_directory, read_manager

    state = read_manager(pool_directory(manager, os.getuid())) or {}
    reloads = [r for r in state.get("reloads", []) if r.get("phase") != "refused"]
    if not reloads or reloads[-1].get("phase") == "failed":
        return None
    new = reloads[-1].get("new_pid")
    return new if isinstance(new, int) and alive(new) else None
