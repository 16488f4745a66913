"""Running as a daemon: double fork, pidfile, log files and their reopening, a lock, sd_notify.

``daemonize()`` returns in the daemon only. The command that called it waits on a pipe until the
daemon says it has started (pidfile written, application preloaded) or why it could not, and
exits with that status: a start that fails never looks like a success.
"""

from __future__ import annotations

import errno
import fcntl
import grp
import os
import pwd
import socket
import stat
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NoReturn, Optional

from ..logs import logger

__all__ = [
    "DEFAULT_PIDFILE",
    "DEFAULT_STDERR",
    "DEFAULT_STDOUT",
    "EX_CANTCREAT",
    "DaemonError",
    "Identity",
    "LogFiles",
    "PoolLock",
    "Readiness",
    "SystemdNotifier",
    "daemonize",
    "drop_privileges",
    "resolve_identity",
]

log = logger.getChild("daemon")

#: Exit status when a pidfile, log file or lock file cannot be created (sysexits.h EX_CANTCREAT).
EX_CANTCREAT = 73

DEFAULT_PIDFILE = "tmp/pids/qless-pool.pid"
DEFAULT_STDOUT = "log/qless-pool.stdout.log"
DEFAULT_STDERR = "log/qless-pool.stderr.log"


class DaemonError(Exception):
    """A start-up problem to report to the operator in one line (the message says what and
    where), and the exit status it calls for."""

    def __init__(self, message: str, status: int = 1):
        super().__init__(message)
        self.status = status


def _open_file(what: str, path: str, flags: int, mode: int = 0o644) -> tuple[int, bool]:
    """Open (creating it, and its missing directories) a file the pool writes or locks; returns
    the descriptor and whether this call created the file.

    The pool's files must be the files they are named, even in a directory someone else may
    write to (a log directory of the pool's user, while root starts the pool): the last
    component is not followed if it is a symlink (the directories above it may be links), and
    anything but a regular file with no other hard link (whose other name could be anything) is
    refused, so the pool never writes through to another file. A problem is a DaemonError
    naming the path.
    """
    try:
        # O_NONBLOCK: a FIFO in the file's place must be refused, not hang the start.
        fd, created = _create(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK, mode)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise DaemonError(
                f"{what} {path} is a symlink; refusing to follow it", EX_CANTCREAT
            ) from None
        if error.errno == errno.ENXIO:  # a FIFO with no reader, a socket, a device
            raise DaemonError(f"{what} {path} is not a regular file", EX_CANTCREAT) from None
        reason = error.strerror or str(error)
        raise DaemonError(f"cannot create {what} {path}: {reason}", EX_CANTCREAT) from None
    info = os.fstat(fd)
    problem = None
    if not stat.S_ISREG(info.st_mode):
        problem = "is not a regular file"
    elif info.st_nlink > 1:
        problem = f"has {info.st_nlink - 1} other hard link(s); refusing to write through it"
    if problem:
        os.close(fd)
        raise DaemonError(f"{what} {path} {problem}", EX_CANTCREAT)
    os.set_blocking(fd, True)
    return fd, created


# --- the lock -------------------------------------------------------------------------------------


class PoolLock:
    """A shared flock on ``path`` held by the manager and inherited by every worker and job child.

    While any process of the pool lives the lock is held, so a deploy script can wait for all
    of them to be gone with ``flock FILE true`` (an exclusive lock).
    """

    def __init__(self, path: str):
        self.path = path
        self.fd = -1

    def acquire(self) -> None:
        fd, _ = _open_file("lock file", self.path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DaemonError(f"lock {self.path} is held exclusively by another process") from None
        os.set_inheritable(fd, True)
        self.fd = fd


# --- log files ------------------------------------------------------------------------------------


class LogFiles:
    """stdout and stderr sent to files (appended), reopened on HUP (logrotate: rename, HUP).

    A log file is opened as the pidfile is (see ``_open_file``): the pool is often started by
    root with its log directory writable by the pool's user, who could otherwise put a symlink
    or a hard link to any file there and have root append to it (and hand it over, below).
    """

    def __init__(self, stdout: str, stderr: str, sync: bool = True):
        self.stdout, self.stderr, self.sync = stdout, stderr, sync
        self.created = (False, False)  # whether the last open() created each file

    def open(self) -> None:
        """Open both files (raises DaemonError), then put them in place of stdout and stderr."""
        opened = []
        try:
            for path in (self.stdout, self.stderr):
                opened.append(_open_file("log file", path, os.O_WRONLY | os.O_APPEND))
        except DaemonError:
            for fd, _ in opened:
                os.close(fd)
            raise
        for (new, _), fd in zip(opened, (1, 2)):
            os.dup2(new, fd)
            os.close(new)
        self.created = (opened[0][1], opened[1][1])
        # Synced (the default): every line reaches the file when written; --nosync: buffered.
        for stream in (sys.stdout, sys.stderr):
            if hasattr(stream, "reconfigure"):
                stream.reconfigure(line_buffering=self.sync, write_through=self.sync)

    def reopen(self) -> None:
        """HUP: reopen both files; if one cannot be, keep writing to the old ones."""
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        try:
            self.open()
        except DaemonError as error:
            log.error("%s; still writing to the files open before", error)
            return
        log.info("reopened %s and %s", self.stdout, self.stderr)

    def hand_to(self, identity: Identity) -> None:
        """Root, before switching to ``identity``: make the open files its own, so that it can
        reopen them on HUP. Only a file this start created, or one the user already owns, is
        handed over: never a file of someone else (root's, another user's), whatever its name."""
        for fd, path, created in zip((1, 2), (self.stdout, self.stderr), self.created):
            owner = os.fstat(fd).st_uid
            if not created and owner != identity.uid:
                log.warning(
                    "log file %s belongs to uid %d: not handing it to %s (HUP cannot reopen it)",
                    path,
                    owner,
                    identity.describe(),
                )
                continue
            try:
                os.fchown(fd, identity.uid, identity.gid)  # the file open, not a name
            except OSError as error:
                log.warning("cannot hand %s to %s: %s", path, identity.describe(), error.strerror)


def _create(path: str, flags: int, mode: int = 0o644) -> tuple[int, bool]:
    """Open ``path``, creating it and its missing directories, none of them group- or
    world-writable whatever the umask the pool was started with (0 is not rare in init
    scripts); returns the descriptor and whether the file was created by this call."""
    previous = os.umask(0o022)
    try:
        directory = os.path.dirname(path)
        if directory:
            try:
                os.makedirs(directory, exist_ok=True)
            except (FileExistsError, NotADirectoryError):  # a file where a directory should be
                raise NotADirectoryError(
                    errno.ENOTDIR, f"{_not_a_directory(directory)} is not a directory"
                ) from None
        flags |= os.O_CLOEXEC
        # Created or found, told apart (O_EXCL): only a file root created may be handed over.
        for _ in range(3):
            try:
                return os.open(path, flags | os.O_CREAT | os.O_EXCL, mode), True
            except FileExistsError:
                pass
            try:
                return os.open(path, flags), False
            except FileNotFoundError:
                continue  # removed in between: create it after all
        return os.open(path, flags | os.O_CREAT, mode), False  # a race every time: not ours
    finally:
        os.umask(previous)


def _not_a_directory(directory: str) -> str:
    """The first component of ``directory`` that exists and is not a directory."""
    parts = directory.split(os.sep)
    for end in range(1, len(parts) + 1):
        prefix = os.sep.join(parts[:end]) or os.sep
        if os.path.exists(prefix) and not os.path.isdir(prefix):
            return prefix
    return directory


# --- privileges -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    """Whom the pool runs as after dropping root's privileges (``--user``, ``--group``)."""

    uid: int
    gid: int
    user: Optional[str]  # for the supplementary groups; None: a uid with no passwd entry

    def describe(self) -> str:
        return f"uid {self.uid}" + (f" ({self.user})" if self.user else "") + f", gid {self.gid}"


def resolve_identity(user: Optional[str], group: Optional[str]) -> Optional[Identity]:
    """The identity ``--user``/``--group`` name (names or numbers), or None if neither is
    given. Raises DaemonError (status 2) for an unknown user or group, for a switch that would
    keep root's uid or gid by accident, or if this process cannot switch to them (only root
    can switch to another user)."""
    if user is None and group is None:
        return None
    for option, value in (("--user", user), ("--group", group)):
        if value is not None and not value.strip():
            # Most often an unset variable (--user "$RUN_AS"): it must not mean "stay root".
            raise DaemonError(f"{option}: empty (an unset variable?)", 2)
    if not user:
        # It would keep uid 0: a pool that looks unprivileged and is not.
        raise DaemonError(f"--group {group} needs --user (the user to run as)", 2)
    gid, name = None, None
    try:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except KeyError:
        if not user.isdigit():
            raise DaemonError(f"--user {user}: no such user", 2) from None
        uid = int(user)
    else:
        uid, gid, name = entry.pw_uid, entry.pw_gid, entry.pw_name
    if group:
        try:
            gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
        except KeyError:
            raise DaemonError(f"--group {group}: no such group", 2) from None
    if gid is None:
        # A uid with no passwd entry has no group of its own; root's (0) would stay.
        raise DaemonError(
            f"--user {user}: no such user in the password database, so no group to run as; "
            "give --group too",
            2,
        )
    identity = Identity(uid, gid, name)
    if os.geteuid() != 0 and (uid, gid) != (os.geteuid(), os.getegid()):
        raise DaemonError(
            f"--user/--group: only root can switch to {identity.describe()} "
            f"(this is uid {os.geteuid()})",
            2,
        )
    return identity


def drop_privileges(identity: Identity, log_files: Optional[LogFiles] = None) -> None:
    """Become ``identity`` for good (groups, then gid, then uid), after handing it the open
    ``log_files`` (so that it can reopen them on HUP)."""
    if os.geteuid() != 0:
        return  # already this identity (resolve_identity checked)
    if log_files is not None:
        log_files.hand_to(identity)
    if identity.user:
        os.initgroups(identity.user, identity.gid)
    else:
        os.setgroups([])
    os.setgid(identity.gid)
    os.setuid(identity.uid)
    log.info("dropped privileges: running as %s", identity.describe())


# --- becoming a daemon ----------------------------------------------------------------------------


class Readiness:
    """The daemon's end of the start-up pipe: say ``started`` or ``failed`` once."""

    def __init__(self, fd: int):
        self.fd = fd

    def started(self, note: str = "") -> None:
        """``note``: said after the pid (what the operator should know at once)."""
        self._say(f"ok {os.getpid()} {note}".rstrip())

    def failed(self, status: int, message: str) -> None:
        self._say(f"error {status} {message}")

    def _say(self, line: str) -> None:
        if self.fd < 0:
            return
        try:
            os.write(self.fd, (line.replace("\n", " ") + "\n").encode())
        except OSError:
            pass
        os.close(self.fd)
        self.fd = -1


def daemonize() -> Readiness:
    """Double fork and detach (setsid; stdin from /dev/null); the working directory is kept.

    Returns in the daemon only. The calling process waits until the daemon reports, prints the
    outcome and exits: 0 once the daemon has started, the daemon's status if it failed, 1 if it
    died without a word.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_end)
        _wait_for_daemon(pid, read_end)
    os.close(read_end)
    os.setsid()
    if os.fork():
        os._exit(0)  # the session leader goes, so the daemon can never get a terminal
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    return Readiness(write_end)


def _wait_for_daemon(middle: int, read_end: int) -> NoReturn:
    os.waitpid(middle, 0)
    with os.fdopen(read_end, "rb") as pipe:
        line = pipe.readline().decode(errors="replace").strip()
    if line.startswith("ok "):
        pid, _, note = line[3:].partition(" ")
        note = f"; {note}" if note else ""
        print(f"qless-pool: started as a daemon, pid {pid}{note}", file=sys.stderr)
        sys.exit(0)
    if line.startswith("error "):
        _, status, message = line.split(" ", 2)
        print(f"qless-pool: {message}", file=sys.stderr)
        sys.exit(int(status))
    print("qless-pool: the daemon exited during start-up; see its log files", file=sys.stderr)
    sys.exit(1)


# --- systemd --------------------------------------------------------------------------------------


class SystemdNotifier:
    """sd_notify without libsystemd: one datagram to $NOTIFY_SOCKET per state change.

    A no-op when the variable is not set. It is removed from the environment, so that the
    workers and jobs do not talk to systemd as if they were the service.
    """

    def __init__(self, environ: Optional[Mapping[str, str]] = None):
        environ = os.environ if environ is None else environ
        address = environ.get("NOTIFY_SOCKET", "")
        if environ is os.environ:
            os.environ.pop("NOTIFY_SOCKET", None)
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self.socket: Optional[socket.socket] = None

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def notify(self, *fields: str) -> None:
        if not self.address:
            return
        try:
            if self.socket is None:
                self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self.socket.setblocking(False)
            self.socket.sendto("\n".join(fields).encode(), self.address)
        except OSError as error:
            log.debug("sd_notify %s failed: %s", fields, error)

    def __call__(self, event: str, pool: Any) -> None:
        """A Pool lifecycle listener."""
        status = f"STATUS=managing {len(pool.workers)} worker(s)"
        if event == "ready":
            self.notify("READY=1", status, f"MAINPID={os.getpid()}")
        elif event == "reloading":
            usec = int(time.clock_gettime(time.CLOCK_MONOTONIC) * 1_000_000)
            self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading")
        elif event == "reloaded":
            self.notify("READY=1", status)
        elif event == "stopping":
            self.notify("STOPPING=1", "STATUS=stopping")
        elif event == "workers":
            self.notify(status)
