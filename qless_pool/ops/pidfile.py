"""The pidfile: the manager's pid while it runs, locked for the manager's life (the daemon's, or
``-p FILE``'s); a reload's new manager takes it over (pool/reload.py)."""

from __future__ import annotations

import contextlib
import fcntl
import os
from typing import Optional

from .. import lifeline
from ..logs import logger
from .daemon import DaemonError, _open_file

__all__ = ["Pidfile"]

log = logger.getChild("daemon")


class Pidfile:
    """``path`` holds the manager's pid while it runs.

    The file is opened without following a symlink and locked (flock) for the manager's life, so
    two starts cannot both take it: the lock, not a check-then-write, decides. A file naming a
    live qless-pool process refuses the start; a stale or empty one is taken over. Only the
    process that wrote the file removes it.
    """

    def __init__(self, path: str):
        self.path = path
        self.fd = -1
        self.owner: Optional[int] = None

    def acquire(self) -> None:
        fd, _ = _open_file("pidfile", self.path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            os.close(fd)
            raise DaemonError(
                f"pidfile {self.path} is held by a running qless-pool (pid {pid or 'unknown'}); "
                "stop it first"
            ) from None
        pid = _read_pid(fd)
        if pid and pid != os.getpid() and _is_qless_pool(pid):
            os.close(fd)
            raise DaemonError(
                f"pidfile {self.path} names a running qless-pool (pid {pid}); stop it first"
            )
        if pid:
            log.info("replacing stale pidfile %s (pid %d is gone)", self.path, pid)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        os.fsync(fd)
        self.fd, self.owner = fd, os.getpid()

    def take_over(self) -> None:
        """Name this process in the file a reload's old manager holds (pool/reload.py): a new
        file, locked before it has a name, renamed over the path, so that a reader sees one pid
        or the other and a start finds it locked all along. Where this process may not make
        files (a directory root owns, the pool running as --user), the old file is rewritten in
        place, through the descriptor the old manager handed over (its lock with it)."""
        directory, name = os.path.split(self.path)
        temporary = os.path.join(directory, f".{name}.{os.getpid()}")
        try:
            if directory:  # a relative path may now lead into a new release's directory
                os.makedirs(directory, exist_ok=True)
            fd = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        except OSError:
            if self.fd < 0:
                raise
            self._rewrite_in_place()
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.write(fd, f"{os.getpid()}\n".encode())
            os.fsync(fd)
            os.replace(temporary, self.path)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
        if self.fd >= 0:
            os.close(self.fd)
        self.fd, self.owner = fd, os.getpid()
        log.info("pidfile %s names this manager now", self.path)

    def adopt(self, fd: int) -> None:
        """The old manager's descriptor of the file (locked), handed over by a reload."""
        os.set_inheritable(fd, False)
        self.fd = fd

    def _rewrite_in_place(self) -> None:
        # One write, padded to the old length: a reader sees one pid or the other, not a mix.
        old = os.pread(self.fd, 64, 0)
        text = str(os.getpid()).ljust(max(len(old) - 1, 0)) + "\n"
        os.pwrite(self.fd, text.encode(), 0)
        os.ftruncate(self.fd, len(text))
        self.owner = os.getpid()
        log.info("pidfile %s names this manager now (rewritten in place)", self.path)

    def disown(self) -> None:
        """Let go of the file without removing it: a reload's new manager takes it over."""
        if self.fd >= 0:
            os.close(self.fd)
        self.fd, self.owner = -1, None

    def release(self) -> None:
        """Remove the file, if this process wrote it and it still names this process (a reload's
        new manager has renamed its own over it: that one stays)."""
        if self.fd < 0:
            return
        if (
            os.getpid() == self.owner
            and _read_pid(self.fd) == self.owner
            and _same_file(self.path, self.fd)
        ):
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            except PermissionError:  # privileges dropped since: leave it empty, hence stale
                os.ftruncate(self.fd, 0)
        os.close(self.fd)
        self.fd, self.owner = -1, None


def _same_file(path: str, fd: int) -> bool:
    try:
        named, held = os.stat(path, follow_symlinks=False), os.fstat(fd)
    except OSError:
        return False
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)


def _read_pid(fd: int) -> Optional[int]:
    try:
        return int(os.pread(fd, 64, 0).decode().strip() or 0) or None
    except (ValueError, UnicodeDecodeError):
        return None


def _is_qless_pool(pid: int) -> bool:
    """Is ``pid`` alive, and (where /proc tells) a qless-pool process rather than a reused pid?"""
    if not lifeline.alive(pid):
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            return b"qless-pool" in file.read()
    except OSError:
        return True  # alive, and no way to tell: do not take it over
