"""Finding a running pool, for ``qless-pool status`` and ``qless-pool stop``: by its pidfile
(read without trusting it), its manager's pid, or the directory it was started in (a pool in
the foreground has no pidfile); and its processes, each known by its start time.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import Optional

from .. import lifeline
from .daemon import DEFAULT_PIDFILE
from .state import pool_directory, read_manager, runtime_root

__all__ = [
    "ManyPools",
    "NoPool",
    "PoolProcesses",
    "find_manager",
    "find_pool",
    "pools_started_in",
    "read_pidfile",
]


class NoPool(Exception):
    """No pool is running where we were told to look."""


class ManyPools(NoPool):
    """More than one pool was started here: which one is for the caller to say (--pid)."""


#: A pid is at most 7 digits (pid_max is at most 4194304) and a newline: more is not a pidfile.
PIDFILE_LIMIT = 32


def read_pidfile(path: str) -> int:
    """The pid in ``path``, read safely (NoPool otherwise): ``status`` may run as root on a
    pidfile in a directory its pool's user owns, who could put anything there.

    It is opened without following a symlink and without blocking (a FIFO), read only if it is
    a regular file owned by this user or root, and at most PIDFILE_LIMIT bytes of it; nothing
    read is ever shown back.
    """
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise NoPool(f"no pidfile {path}: no pool is running (give --pid?)") from None
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise NoPool(f"pidfile {path} is a symbolic link; not followed") from None
        raise NoPool(f"cannot read pidfile {path}: {error.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NoPool(f"pidfile {path} is not a regular file")
        if info.st_uid not in (os.getuid(), 0):
            raise NoPool(
                f"pidfile {path} belongs to uid {info.st_uid}, not to this user or root; "
                "not trusted (give --pid?)"
            )
        data = os.read(fd, PIDFILE_LIMIT)
    except OSError as error:
        raise NoPool(f"cannot read pidfile {path}: {error.strerror}") from None
    finally:
        os.close(fd)
    text = data.decode("ascii", errors="replace").strip()
    if not text:
        raise NoPool(f"pidfile {path} is empty: no pool is running")
    if not text.isdigit() or len(data) >= PIDFILE_LIMIT or int(text) == 0:
        raise NoPool(f"pidfile {path} does not hold a pid")
    return int(text)


def find_manager(pidfile: Optional[str], pid: Optional[int]) -> int:
    """The manager's pid, if it is a live qless-pool manager (NoPool otherwise)."""
    if pid is None:
        pid = read_pidfile(pidfile or DEFAULT_PIDFILE)
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            title = file.read(4096).decode(errors="replace")
    except OSError:
        raise NoPool(f"no process {pid}: no pool is running (stale pidfile?)") from None
    if title.startswith("qless-pool-keeper"):
        # A manager that handed over in the foreground keeps the terminal (pool/reload.py):
        # the pool is its child's.
        for child in lifeline.children(pid):
            try:
                return find_manager(None, child)
            except NoPool:
                continue
        raise NoPool(f"process {pid} keeps no pool manager now (its manager has exited)")
    if not title.startswith("qless-pool-manager"):
        raise NoPool(f"process {pid} is not a qless-pool manager ({title.split(chr(0))[0]!r})")
    return _handed_over_to(pid)


def _handed_over_to(pid: int) -> int:
    """The manager a reload handed ``pid``'s pool to (pool/reload.py), if any, else ``pid``: an
    old manager finishing its last jobs is not the pool any more."""
    for _ in range(16):  # a chain of reloads, each of them still finishing
        try:
            directory = pool_directory(pid, os.stat(f"/proc/{pid}").st_uid)
        except OSError:
            return pid
        successor = (read_manager(directory) or {}).get("handed_over_to")
        if not isinstance(successor, int) or not lifeline.alive(successor):
            return pid
        pid = successor
    return pid


def find_pool(pidfile: Optional[str], pid: Optional[int]) -> int:
    """The manager's pid: by ``pid`` or ``pidfile`` if given; else by the daemon's default
    pidfile, else the pool started in this directory (a pool in the foreground has no pidfile).
    NoPool otherwise."""
    if pid is not None or pidfile is not None:
        return find_manager(pidfile, pid)
    try:
        return find_manager(DEFAULT_PIDFILE, None)
    except NoPool as error:
        found = error
    here = os.getcwd()
    started_here = pools_started_in(here)
    if len(started_here) == 1:
        return started_here[0]
    if started_here:
        pids = ", ".join(map(str, started_here))
        raise ManyPools(f"{len(started_here)} pools were started in {here} ({pids}): give --pid")
    if os.path.lexists(DEFAULT_PIDFILE):
        raise found
    raise NoPool(
        f"no pool is running here: no pidfile {DEFAULT_PIDFILE}, and no pool of this user was "
        f"started in {here} (give -p FILE or --pid PID)"
    )


def pools_started_in(directory: str) -> list[int]:
    """The live managers of this user's pools that were started in ``directory``."""
    base = os.path.join(runtime_root(), f"qless-pool-{os.getuid()}")
    try:
        entries = os.listdir(base)
    except OSError:
        return []
    wanted = os.path.realpath(directory)
    # The directory as given too: a deploy repoints /srv/app/current, so the pool started in
    # it runs in the release it pointed at then.
    given = os.environ.get("PWD", "")
    if not (given and os.path.isabs(given) and os.path.realpath(given) == wanted):
        given = ""
    found = []
    for entry in sorted(entries):
        if not entry.isdigit():
            continue
        manager = read_manager(os.path.join(base, entry))
        if (manager or {}).get("handed_over_to"):
            continue  # finishing its last jobs: the pool is its successor's (found here too)
        started_in = (manager or {}).get("directory")
        as_given = (manager or {}).get("start_directory")
        same = isinstance(started_in, str) and os.path.realpath(started_in) == wanted
        if not (same or (given and as_given == given)):
            continue
        try:
            found.append(find_manager(None, int(entry)))
        except NoPool:
            continue  # gone (its directory not yet removed), or its pid reused
    return found


class PoolProcesses:
    """A pool's manager and its children (workers, helpers), each known by its start time, so
    that a pid the kernel reuses is not taken for one of them."""

    def __init__(self, pid: int):
        self.started = {p: _start_time(p) for p in [pid, *lifeline.children(pid)]}

    def alive(self) -> list[int]:
        return [p for p, began in self.started.items() if began and _start_time(p) == began]

    @staticmethod
    def stopped(pid: int) -> bool:
        """Stopped (SIGSTOP, a debugger): it cannot act on a signal until it is continued."""
        try:
            with open(f"/proc/{pid}/stat", "rb") as file:
                return file.read().rsplit(b")", 1)[1].split()[0] in (b"T", b"t")
        except (OSError, IndexError):
            return False


def running(pid: int) -> bool:
    """Is ``pid`` a live process (not gone, not a zombie waiting for its parent)?"""
    return _start_time(pid) is not None


def _start_time(pid: int) -> Optional[int]:
    """A process's start time (clock ticks after boot), None if it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            fields = file.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])
