"""A reload's hand-over, the parts both managers share (pool/reload.py uses them): the request
``qless-pool reload`` leaves, the channel between the two managers, each side's record, and the
exec that starts the new manager.

The channel is a socketpair (SOCK_SEQPACKET: one JSON message per packet) that the new manager
inherits across exec, with its number in ``$QLESS_POOL_SUCCESSOR``::

    new -> old   ready {its counts}, up {group: workers up}, serving (every slot up),
                 taken (pidfile and MAINPID are its own), error {message}
    old -> new   active {group: its workers taking jobs}, take-over (agreed)
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import sys
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

from .signals import MANAGER_SIGNALS, RELOAD_SIGNAL

__all__ = [
    "DEFAULT_TIMEOUT",
    "REQUEST_FILE",
    "ROLLBACK_LONGEST",
    "SUCCESSOR_VARIABLE",
    "Channel",
    "HandOver",
    "Request",
    "Successor",
    "decode_counts",
    "encode_counts",
    "exec_successor",
    "logical_directory",
    "read_requests",
    "remove_directory",
    "write_request",
]

Queues = tuple[str, ...]

#: The new manager finds the hand-over (its end of the channel, ...) here, as JSON.
SUCCESSOR_VARIABLE = "QLESS_POOL_SUCCESSOR"
#: ``qless-pool reload`` leaves its request (an id, the timeout) in the pool's state directory.
REQUEST_FILE = "reload-request"
DEFAULT_TIMEOUT = 60.0
#: After a failed reload, the new manager's workers serve on until the old pool's are back up,
#: for this long at the most.
ROLLBACK_LONGEST = 30.0


# --- the request ----------------------------------------------------------------------------------


def write_request(directory: str, timeout: float) -> str:
    """Leave a reload request in the pool's state ``directory`` (a file per request: two
    commands at once each get their answer); returns its id."""
    request_id = uuid.uuid4().hex
    path = os.path.join(directory, f"{REQUEST_FILE}.{request_id}")
    temporary = os.path.join(directory, f".{REQUEST_FILE}.{request_id}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    if os.geteuid() == 0:  # root reloading a --user pool: the request must be the pool's to read
        owner = os.stat(directory)
        os.fchown(fd, owner.st_uid, owner.st_gid)
    with os.fdopen(fd, "w") as file:
        json.dump({"id": request_id, "timeout": timeout}, file)
    os.replace(temporary, path)
    return request_id


@dataclass(frozen=True)
class Request:
    id: Optional[str]  # None: a bare SIGURG
    timeout: float = DEFAULT_TIMEOUT


def read_requests(directory: Optional[str]) -> list[Request]:
    """The requests ``qless-pool reload`` left, oldest first (and remove them); a bare SIGURG
    left none: one request with no id and the default timeout."""
    found: list[tuple[float, Request]] = []
    with contextlib.suppress(OSError):
        names = [n for n in os.listdir(directory or "") if n.startswith(f"{REQUEST_FILE}.")]
        for name in names[:100]:
            path = os.path.join(directory or "", name)
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
                with os.fdopen(fd) as file:
                    when = os.fstat(file.fileno()).st_mtime
                    request = json.loads(file.read(4096))
                os.unlink(path)
            except (OSError, ValueError):
                continue
            if isinstance(request, dict) and isinstance(request.get("id"), str):
                timeout = request.get("timeout")
                if not isinstance(timeout, (int, float)) or not 0 < timeout < 10**6:
                    timeout = DEFAULT_TIMEOUT
                found.append((when, Request(request["id"], float(timeout))))
    return [request for _, request in sorted(found, key=lambda f: f[0])] or [Request(None)]


def logical_directory() -> str:
    """The working directory as the operator gave it: ``$PWD`` when it names the same directory
    (``/srv/app/current``, a symlink a deploy repoints), else the resolved one."""
    here = os.getcwd()
    given = os.environ.get("PWD", "")
    with contextlib.suppress(OSError):
        if given and os.path.isabs(given) and os.path.samefile(given, here):
            return given
    return here


# --- the channel ----------------------------------------------------------------------------------


class Channel:
    """One end of the socketpair between the two managers: a JSON message per packet."""

    def __init__(self, sock: socket.socket):
        sock.setblocking(False)
        self.socket = sock
        self.closed = False

    @classmethod
    def pair(cls) -> tuple[Channel, socket.socket]:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        return cls(ours), theirs

    def fileno(self) -> int:
        return self.socket.fileno()

    def send(self, kind: str, **fields: Any) -> bool:
        """Best effort: False if the other end is gone."""
        try:
            self.socket.send(json.dumps({"kind": kind, **fields}).encode())
        except OSError:
            return False
        return True

    def receive(self) -> list[dict[str, Any]]:
        """What has come; sets ``closed`` once the other end is gone."""
        messages = []
        while not self.closed:
            try:
                packet = self.socket.recv(65536)
            except BlockingIOError:
                break
            except ConnectionResetError:
                # The other end closed with our messages unread: Linux says so once, before
                # what it sent last (still queued here, and read next).
                continue
            except OSError:
                packet = b""
            if not packet:
                self.close()  # no copy of it may linger (a worker forked later)
                break
            with contextlib.suppress(ValueError):
                message = json.loads(packet)
                if isinstance(message, dict):
                    messages.append(message)
        return messages

    def gone(self) -> bool:
        """Is the other end gone (as the last receive() found)?"""
        return self.closed

    def close(self) -> None:
        self.closed = True
        with contextlib.suppress(OSError):
            self.socket.close()


# --- the two sides --------------------------------------------------------------------------------


@dataclass
class HandOver:
    """The old manager's side of one reload."""

    id: Optional[str]
    new_pid: int
    channel: Channel
    timeout: float
    deadline: float  # monotonic
    #: starting -> handing-over (it is ready) -> committing (every slot up: it takes the
    #: pidfile and systemd's MAINPID over) -> handed-over; or failed.
    phase: str = "starting"
    #: The new config's counts (said once it is ready): the old pool keeps, per group, the new
    #: count minus the new workers that are up (at most its own count).
    counts: Optional[dict[Queues, int]] = None
    up: dict[Queues, int] = field(default_factory=dict)
    #: Its active workers by group, as last told the new manager (None: not yet told); the old
    #: pool grows no group past it.
    active_said: Optional[dict[Queues, int]] = None
    hup_pending: bool = False  # a HUP came meanwhile: acted on if the reload fails
    retire_by: Optional[float] = None  # failed: the new manager is QUIT then at the latest
    #: The new manager's metrics directory, made by the old one: removed if the new one exits
    #: before it took over (after that, it removes its own).
    metrics_directory: Optional[str] = None
    report: dict[str, Any] = field(default_factory=dict)  # in manager.json's "reloads"

    @property
    def running(self) -> bool:
        return self.phase in ("starting", "handing-over", "committing")


@dataclass
class Successor:
    """The new manager's side: what its predecessor handed it (SUCCESSOR_VARIABLE)."""

    channel: Channel
    predecessor: int
    kept: bool  # a keeper is above it: it exits after a hand-over of its own
    paused: bool
    metrics_fd: Optional[int] = None
    request: Optional[str] = None  # the id of qless-pool reload's request
    pidfile_fd: Optional[int] = None  # the old manager's pidfile, locked
    asked: bool = False  # every slot is up: it asked the old manager to let it take over
    serving: bool = False
    up_said: dict[Queues, int] = field(default_factory=dict)  # last told the old manager
    #: The old pool's workers that take jobs, by group (as it last said): the new pool starts
    #: at most one more than the configured count minus those.
    old_active: dict[Queues, int] = field(default_factory=dict)
    #: The old pool's range groups' wanted counts: the new one starts them there (ranges.py).
    scaled: dict[Queues, int] = field(default_factory=dict)

    @classmethod
    def from_environment(cls) -> Optional[Successor]:
        """The hand-over this process was started for (taken out of the environment, so that
        the workers and a later reload do not see it), or None."""
        raw = os.environ.pop(SUCCESSOR_VARIABLE, None)
        if raw is None:
            return None
        given = json.loads(raw)
        channel = Channel(socket.socket(fileno=int(given["channel"])))
        os.set_inheritable(channel.fileno(), False)
        metrics_fd = given.get("metrics_fd")
        if metrics_fd is not None:
            os.set_inheritable(metrics_fd, False)
        pidfile_fd = given.get("pidfile_fd")
        if pidfile_fd is not None:
            os.set_inheritable(pidfile_fd, False)
        return cls(
            channel, int(given["predecessor"]), bool(given["kept"]), bool(given["paused"]),
            metrics_fd, given.get("request"), pidfile_fd,
            old_active=decode_counts(given.get("active"), "active"),
            scaled=decode_counts(given.get("scaled"), "wanted"),
        )  # fmt: skip

    def failed(self, message: str) -> None:
        """The new code cannot serve: said to the old manager, which runs on."""
        self.channel.send("error", message=message)


def remove_directory(directory: Optional[str]) -> None:
    if directory is not None:
        shutil.rmtree(directory, ignore_errors=True)


def encode_counts(counts: dict[Queues, int], key: str = "up") -> list[dict[str, Any]]:
    """Counts by group, as the channel carries them (JSON has no tuple keys)."""
    return [{"queues": list(queues), key: count} for queues, count in counts.items()]


def decode_counts(items: Any, key: str = "up") -> dict[Queues, int]:
    """The counts encode_counts() made, back."""
    if not isinstance(items, list):
        return {}
    found = {}
    for item in items:
        with contextlib.suppress(KeyError, TypeError, ValueError, OverflowError):
            found[tuple(map(str, item["queues"]))] = max(0, int(item[key]))
    return found


def exec_successor(
    environ: dict[str, str], directory: str, passed: list[int], lock_fd: Optional[int]
) -> int:
    """In the forked child: become the new manager (same command line, environment and
    working directory, followed anew)."""
    for fd in passed:
        os.set_inheritable(fd, True)
    if lock_fd is not None:  # it takes the lock itself (a shared one, beside ours)
        with contextlib.suppress(OSError):
            os.set_inheritable(lock_fd, False)
    # Blocked across exec: a signal the old manager passes on while the new one loads the
    # application waits until its handlers are in place (Pool.run), instead of killing it.
    signal.pthread_sigmask(signal.SIG_BLOCK, [*MANAGER_SIGNALS, RELOAD_SIGNAL])
    try:
        os.chdir(directory)
        os.execve(sys.executable, sys.orig_argv, environ)
    except OSError as error:
        message = f"cannot start {' '.join(sys.orig_argv[:3])} in {directory}: {error}"
        with contextlib.suppress(OSError):
            os.write(2, f"qless-pool: reload: {message}\n".encode())
        with contextlib.suppress(OSError):
            socket.socket(fileno=passed[0]).send(
                json.dumps({"kind": "error", "message": message}).encode()
            )
    return 127
