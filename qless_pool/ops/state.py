"""A running pool's state, for ``qless-pool status``, health checks and the metrics helper.

The manager stays Redis-free and single-threaded, and reading the state must never block or
slow the pool, so the state is files that the pool writes and anyone may read at any time::

    <runtime root>/qless-pool-<uid>/<manager pid>/     0700, the pool's user only
        manager.json        0600  the manager: config, groups (desired and live), worker table;
                                  rewritten (atomically) when any of it changes
        worker-<pid>        0600  one per worker parent: a fixed-size record it rewrites in place
                                  (a shared memory map, no system call) at each job
        worker-<pid>.will   0600  what the worker would leave unsettled if it died (will.py)
        metrics/                  prometheus_client's multiprocess files (--metrics-port)

The runtime root is ``$QLESS_POOL_RUNTIME_DIR``, else ``/dev/shm`` (memory, and not hidden by
systemd's PrivateTmp), else the temp directory. ``qless-pool status`` finds a pool's directory
from the manager's pid and user, so it works for a pool started any way (the command, Invoke,
``qless_pool.run()``, systemd) as long as both agree on the root.

A worker's record is written as a seqlock: an odd sequence number while it changes, so a reader
that catches it half-written reads again.
"""

from __future__ import annotations

import contextlib
import errno
import json
import mmap
import os
import shutil
import stat
import struct
import tempfile
import time
from collections.abc import Mapping
from typing import Any, Optional

__all__ = [
    "RUNTIME_VARIABLE",
    "PoolState",
    "WorkerSlot",
    "configured_queues",
    "pool_directory",
    "private_base",
    "private_bytes",
    "read_manager",
    "read_worker",
    "rss_bytes",
    "runtime_root",
    "worker_state",
]

RUNTIME_VARIABLE = "QLESS_POOL_RUNTIME_DIR"
MANAGER_FILE = "manager.json"
#: Far more than any manager.json (about 100 bytes a worker).
MANAGER_LIMIT = 16 << 20

#: A worker's record: sequence, state, job started (epoch), updated (epoch), jobs done,
#: child pid, standby pid, held jobs, the job's jid, queue and class (UTF-8, NUL-padded), and
#: since when Redis has been unreachable to it (epoch; 0: it is not) with what it met.
_RECORD = struct.Struct("<QBxxxddQiiI64s128s256sd256s")
RECORD_SIZE = 1024
STATES = ("starting", "waiting", "processing", "paused", "stopping")
#: How long a worker without a record is taken to be starting.
STARTING = 10.0


def runtime_root(environ: Optional[Mapping[str, str]] = None) -> str:
    environ = os.environ if environ is None else environ
    if environ.get(RUNTIME_VARIABLE):
        return environ[RUNTIME_VARIABLE]
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


def pool_directory(pid: int, uid: int, root: Optional[str] = None) -> str:
    return os.path.join(root or runtime_root(), f"qless-pool-{uid}", str(pid))


def _private_directory(path: str) -> None:
    """Make ``path`` a directory only this user may use; refuse one someone else made."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise OSError(errno.EPERM, f"{path} is not a directory of this user")
    if stat.S_IMODE(info.st_mode) & 0o077:
        os.chmod(path, 0o700)


def private_base(root: Optional[str] = None) -> str:
    """``<runtime root>/qless-pool-<uid>``, made (0700) if need be."""
    base = os.path.join(root or runtime_root(), f"qless-pool-{os.getuid()}")
    _private_directory(base)
    return base


class PoolState:
    """The manager's side: the pool's directory, its manager.json, the workers' record paths."""

    def __init__(self, pid: int, root: Optional[str] = None):
        self.pid = pid
        self.directory = os.path.join(private_base(root), str(pid))
        # A directory of an earlier process with this pid (killed with -9) is stale.
        shutil.rmtree(self.directory, ignore_errors=True)
        _private_directory(self.directory)

    def worker_path(self, pid: int) -> str:
        return os.path.join(self.directory, f"worker-{pid}")

    def will_path(self, pid: int) -> str:
        """Where a worker keeps its will (will.py)."""
        return os.path.join(self.directory, f"worker-{pid}.will")

    def write_manager(self, data: dict[str, Any]) -> None:
        path = os.path.join(self.directory, MANAGER_FILE)
        temporary = f"{path}.{os.getpid()}"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "w") as file:
                json.dump(data, file)
            os.replace(temporary, path)
        except BaseException:  # a full tmpfs: leave no half-written file behind
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise

    def intact(self) -> bool:
        """Is manager.json still there? Something may remove the directory under a running
        pool: systemd-logind's RemoveIPC when the pool's user has no session left, a tmpfs
        cleaner."""
        return os.path.exists(os.path.join(self.directory, MANAGER_FILE))

    def restore(self) -> None:
        """Make the directory again (raises OSError), for qless-pool status and new workers."""
        _private_directory(os.path.dirname(self.directory))
        _private_directory(self.directory)

    def forget_worker(self, pid: int) -> None:
        with contextlib.suppress(OSError):  # best effort: gone already, or its directory
            os.unlink(self.worker_path(pid))

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


class WorkerSlot:
    """The worker's side: its record, rewritten in place.

    Making it raises OSError (its directory gone, a full tmpfs); the worker then runs without.
    """

    def __init__(self, path: str):
        self.path = path
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            # Blocks allocated now, not on the first write through the map: on a full tmpfs
            # (Docker's /dev/shm is 64 MB) that write would kill the worker with SIGBUS;
            # allocating fails here instead, with ENOSPC. (macOS has no posix_fallocate.)
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(fd, 0, RECORD_SIZE)
            else:
                os.ftruncate(fd, RECORD_SIZE)
            self.map = mmap.mmap(fd, RECORD_SIZE)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        finally:
            os.close(fd)
        self.sequence = 0
        self.jobs_done = 0
        self.child_pid = 0
        self.standby_pid = 0
        self.held = 0
        self.redis_down: tuple[float, str] = (0.0, "")
        self._recorded: Any = None

    def record(
        self,
        state: str,
        job: Optional[Mapping[str, Any]],
        started: float,
        jobs_done: int,
        child_pid: Optional[int],
        standby_pid: Optional[int],
        held: int,
        redis_down: tuple[float, str] = (0.0, ""),
    ) -> None:
        """update(), if anything has changed since the last record (the loop calls this on
        every turn). ``redis_down``: since when (epoch, 0: not) and what the worker met."""
        now = (state, job and job.get("jid"), jobs_done, child_pid, standby_pid, held, redis_down)
        if now == self._recorded:
            return
        self._recorded = now
        self.jobs_done, self.held, self.redis_down = jobs_done, held, redis_down
        self.child_pid, self.standby_pid = child_pid or 0, standby_pid or 0
        self.update(state, job, started)

    def update(
        self,
        state: str,
        job: Optional[Mapping[str, Any]] = None,
        started: float = 0.0,
    ) -> None:
        """Record ``state`` (one of STATES) and the current job, if any."""
        self.sequence += 1
        struct.pack_into("<Q", self.map, 0, self.sequence)  # odd: being written
        _RECORD.pack_into(
            self.map,
            0,
            self.sequence,
            STATES.index(state),
            started,
            time.time(),
            self.jobs_done,
            self.child_pid,
            self.standby_pid,
            self.held,
            _encoded(job, "jid", 64),
            _encoded(job, "queue", 128),
            _encoded(job, "klass", 256),
            self.redis_down[0],
            self.redis_down[1].encode()[:256],
        )
        self.sequence += 1
        struct.pack_into("<Q", self.map, 0, self.sequence)

    def close(self, remove: bool = True) -> None:
        self.map.close()
        if remove:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


def _encoded(job: Optional[Mapping[str, Any]], key: str, size: int) -> bytes:
    if not job:
        return b""
    return str(job.get(key, "")).encode()[:size]


def _open_record(path: str) -> Any:
    """``path`` opened for reading, if it is a regular file (raises OSError otherwise).

    qless-pool status may run as root, and these files are in the pool's user's directory: a
    symlink there must not make root read (and show) another file, nor a FIFO hang it.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, f"{path} is not a regular file")
    return os.fdopen(fd, "rb")


def read_worker(path: str) -> Optional[dict[str, Any]]:
    """A worker's record as a dict, or None if there is none (yet), or none to trust."""
    try:
        with _open_record(path) as file:
            for _ in range(100):
                file.seek(0)
                data = file.read(_RECORD.size)
                if len(data) < _RECORD.size:
                    return None
                fields = _RECORD.unpack(data)
                file.seek(0)
                again = struct.unpack("<Q", file.read(8))[0]
                if fields[0] % 2 == 0 and again == fields[0]:
                    break
            else:
                return None
    except OSError:  # none yet, or its directory removed or replaced
        return None
    _, state, started, updated, done, child, standby, held, jid, queue, klass = fields[:11]
    down_since, down_error = fields[11:]
    job = None
    if jid.rstrip(b"\0"):
        job = {
            "jid": jid.rstrip(b"\0").decode(errors="replace"),
            "queue": queue.rstrip(b"\0").decode(errors="replace"),
            "klass": klass.rstrip(b"\0").decode(errors="replace"),
            "started": started,
        }
    return {
        "state": STATES[state] if state < len(STATES) else "unknown",
        "updated": updated,
        "jobs_done": done,
        "job_child": child or None,
        "standby": standby or None,
        "held": held,
        "job": job,
        "redis_down_since": down_since or None,
        "redis_error": down_error.rstrip(b"\0").decode(errors="replace") or None,
    }


def worker_state(record: Optional[Mapping[str, Any]], started: float, now: float) -> str:
    """A worker's state from its record; with none, "starting" at first (its after_prefork hooks
    run before it writes one), then "unknown" (its record was lost: the directory removed since
    it started, or could not be made)."""
    if record:
        return str(record["state"])
    return "starting" if now - started < STARTING else "unknown"


def rss_bytes(pid: int) -> Optional[int]:
    """A process's resident memory, from /proc (None where there is none)."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as file:
            return int(file.read().split()[1]) * _PAGE_SIZE
    except (OSError, IndexError, ValueError):
        return None


_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def private_bytes(pid: int) -> Optional[int]:
    """The memory a process holds that it shares with no other (a job child: what its job added
    to what it shares, copy-on-write, with its worker), from /proc/<pid>/smaps_rollup.

    A process that changed its user (the pool's, after --user) is not dumpable, and then only
    root may read its smaps_rollup: the measure is then statm's resident pages less its shared
    (file and shmem) ones. That counts the anonymous pages still shared copy-on-write with the
    worker too, so it says more than smaps would, never less. None if neither can be read (the
    process is gone, or /proc hides it: hidepid)."""
    total = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as file:
            for line in file:
                if line.startswith(("Private_Clean:", "Private_Dirty:")):
                    total += int(line.split()[1]) * 1024
    except OSError:  # EACCES; ENOENT on kernels before 4.14 (and if the process is gone)
        return _unshared_bytes(pid)
    except (IndexError, ValueError):
        return None
    return total


def _unshared_bytes(pid: int) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/statm", "rb") as file:
            fields = file.read().split()
        return (int(fields[1]) - int(fields[2])) * _PAGE_SIZE
    except (OSError, IndexError, ValueError):
        return None


def configured_queues(manager: Mapping[str, Any]) -> list[str]:
    """Every queue the manager's groups name, once each, in the config's order."""
    return list(dict.fromkeys(q for group in manager.get("groups", []) for q in group["queues"]))


def read_manager(directory: str) -> Optional[dict[str, Any]]:
    """The manager's state, or None if it cannot be read (not written yet, its directory
    removed or replaced, not a regular file)."""
    try:
        with _open_record(os.path.join(directory, MANAGER_FILE)) as file:
            text = file.read(MANAGER_LIMIT + 1)
    except OSError:
        return None
    if len(text) > MANAGER_LIMIT:  # not the manager's (a sparse file would be read for ever)
        return None
    try:
        manager = json.loads(text)
    except ValueError:
        return None
    return manager if isinstance(manager, dict) else None
