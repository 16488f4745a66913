"""A worker's will: what it leaves undone if it dies, and the helper that settles it.

A worker parent can die with work in hand: a job it runs in its own process (--no-fork-per-job)
calls ``os._exit`` or crashes the interpreter; someone sends it SIGKILL. qless would notice only
when the jobs' locks expire (a minute by default), and then run every one of them again,
including jobs that had finished and whose ``complete`` the worker was about to send with its
next pop. So the worker keeps a journal, its *will*, in the pool's state directory: a header of
HEADER_SIZE bytes, rewritten in place (one ``pwrite``) as each job starts::

    W <name>         the worker's name in qless
    R <jid>          the job it started last (the one that may have been running)

then one line per command it owes qless for a job whose run ended, appended as it is owed::

    C <json>         a complete, sent with the next pop; a retry or fail, sent next

and cut back to the header whenever everything it owed has been sent. So two writes a job and
one ``ftruncate`` a pop, no fsync (the file is on a tmpfs and only has to survive the process,
not the machine): about 7 microseconds a job (docs/BENCHMARKS.md). The helper hands the R job
back only if qless still says it runs on the dead worker, and sends what was owed first, so a
job that ended needs no line of its own.

When the manager reaps a worker that died (any exit but a clean one), it forks a short-lived
helper (``qless-pool-settler``) that reads the will and settles, with the dead worker's name:

- every command owed is sent (a retry or fail only if the job is still the dead worker's): a job
  that finished does not run again because a later job crashed its worker, and a job handed
  back is handed back once, its retry spent;
- the job it was running is handed back with ``retry`` as ``<queue>-DirtyExit``, as a killed
  job child's is: it runs again, and a job that kills its worker every time fails once its
  retries are spent (a poison job cannot crash workers for ever);
- every other job still locked to it (popped ahead, never started) is given back to its queue,
  no retry spent, none given back either (its retry count becomes the retries it has left: two
  jobs that each crash the worker holding the other cannot reset each other's count for ever);
- the dead worker is deregistered from qless.

Without a will (the state directory could not be written), every job still locked to the dead
worker is handed back with retry: which one ran is not known. The manager itself never talks to
Redis: the helper does, for at most SETTLE_DEADLINE seconds of outage.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from .. import lifeline
from ..logs import logger

__all__ = ["SETTLE_DEADLINE", "Remains", "Will", "open_will", "read_will", "settle_remains"]

log = logger.getChild("settler")

#: How long the helper keeps trying while Redis is away (qless's default lock); then the jobs'
#: locks expire as usual.
SETTLE_DEADLINE = 60.0


#: The will's first bytes: who the worker is and the job it runs, rewritten in place (one
#: ``pwrite``, never a truncate-then-write that a death could cut in two).
HEADER_SIZE = 1024
_COMMANDS = ("complete", "retry", "fail", "put", "cancel")  # what a worker may owe qless


class Will:
    """The worker's side: the header (its name, the job it runs) and the commands it owes.

    Best effort, like the rest of the state: a write that fails (a full tmpfs, the directory
    removed) turns the will off, with one warning; the worker goes on without it.
    """

    def __init__(self, path: str, worker: str):
        self.path = path
        self.worker = worker
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        self.failed = False  # a write failed: no more are tried (the fd stays open until close)
        self.end = HEADER_SIZE  # where the next command owed goes
        # The keeper thread (jobs in process) sends the completes owed while a job runs.
        self._lock = threading.Lock()
        with self._lock:
            self._header(None)

    def started(self, job: dict[str, Any]) -> None:
        with self._lock:
            self._header(job["jid"])

    def owe(self, command: list[Any]) -> None:
        """A command this worker owes qless (Settler.add)."""
        line = b"C " + json.dumps(command).encode() + b"\n"
        with self._lock:
            if self._write(line, self.end):
                self.end += len(line)

    def paid(self) -> None:
        """Everything it owed has been sent: the commands go, the header stays."""
        with self._lock:
            if self.failed or self.end == HEADER_SIZE:
                return
            try:
                os.ftruncate(self.fd, HEADER_SIZE)
            except OSError as error:
                self._give_up(error)
            self.end = HEADER_SIZE

    def _header(self, jid: Optional[str]) -> None:
        """Rewrite the header (the caller holds the lock). A jid too long for it is written as
        unknown: the helper then hands back every job the worker held with retry."""
        lines = f"W {self.worker}\n" + (f"R {jid}\n" if jid is not None else "")
        data = lines.encode()
        if len(data) >= HEADER_SIZE:
            data = f"W {self.worker}\nU\n".encode()
        self._write(data.ljust(HEADER_SIZE - 1) + b"\n", 0)

    def _write(self, data: bytes, offset: int) -> bool:
        if self.failed:
            return False
        try:
            os.pwrite(self.fd, data, offset)
        except OSError as error:
            self._give_up(error)
            return False
        return True

    def _give_up(self, error: OSError) -> None:
        log.warning(
            "cannot keep this worker's will in %s (%s): if it dies, its jobs wait for their "
            "locks to expire",
            self.path,
            error,
        )
        self.failed = True

    def close(self, remove: bool = True) -> None:
        """The worker ends; ``remove``: cleanly, leaving nothing to settle."""
        with self._lock:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1
        if remove:
            with contextlib.suppress(OSError):
                os.unlink(self.path)


@dataclass
class Remains:
    """What a will says: the worker's name, the job it was running when it died (``unknown``:
    it could not say), and the commands it owed."""

    worker: Optional[str] = None
    running: Optional[str] = None
    unknown: bool = False
    owed: list[list[Any]] = field(default_factory=list)


def open_will(path: str) -> int:
    """The will at ``path``, open for reading (OSError if there is none, or not a file)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, f"{path} is not a regular file")
    return fd


def read_will(fd: int) -> Remains:
    """What the will open on ``fd`` says (the fd is closed). A line a death cut short, or a
    command a worker cannot owe, is left out."""
    with os.fdopen(fd, "rb") as file:
        data = file.read()
    remains = Remains()
    for line in data[:HEADER_SIZE].split(b"\n"):
        kind, _, rest = line.strip().partition(b" ")
        if kind == b"W":
            remains.worker = rest.decode(errors="replace")
        elif kind == b"R":
            remains.running = rest.decode(errors="replace")
        elif kind == b"U":
            remains.unknown = True
    for line in data[HEADER_SIZE:].split(b"\n")[:-1]:  # the last piece: cut short, or empty
        kind, _, rest = line.partition(b" ")
        if kind != b"C":
            continue
        with contextlib.suppress(ValueError):
            command = json.loads(rest)
            if (
                isinstance(command, list)
                and len(command) > 2
                and command[0] in _COMMANDS
                and all(isinstance(item, (str, int, float)) for item in command)
            ):
                remains.owed.append(command)
    return remains


def _jid_of(command: list[Any]) -> str:
    """The job a command is about: ``put`` names the queue first."""
    return str(command[2] if command[0] == "put" else command[1])


def settle_remains(redis_url: str, worker: str, will_fd: int, how: str) -> int:
    """The helper's body: settle what ``worker`` (a dead worker's qless name, unless its will
    names it) left, as its will (open on ``will_fd``, -1 if none) says; ``how`` it died goes
    into the retried job's message. Returns the exit status: 0, or 1 if Redis stayed away for
    SETTLE_DEADLINE."""
    from ..client import connect, redis_is_down

    remains = read_will(will_fd) if will_fd >= 0 else None
    if remains is not None and remains.worker:
        worker = remains.worker  # its own name, whatever the host is called now
    if not lifeline.HAVE_PDEATHSIG:
        # Its job child dies with it only when a thread of the child notices: wait for that.
        time.sleep(2 * lifeline.PARENT_POLL)
    deadline = time.monotonic() + SETTLE_DEADLINE
    delay = 0.5
    while True:
        try:
            client = connect(redis_url, worker, socket_connect_timeout=3.0, socket_timeout=3.0)
            _settle(client, worker, remains, how)
            return 0
        except Exception as error:
            if not redis_is_down(error):
                raise
            if time.monotonic() + delay > deadline:
                log.error(
                    "Redis stayed unavailable (%s); what worker %s left is settled when its "
                    "jobs' locks expire",
                    error,
                    worker,
                )
                return 1
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def _settle(client: Any, worker: str, remains: Optional[Remains], how: str) -> None:
    from qless.exceptions import QlessException

    from ..client import redis_is_down
    from .reservation import HeldJob, Holding
    from .settling import Settlement, Settler

    settler = Settler(worker)
    for command in remains.owed if remains else []:
        found = client("get", _jid_of(command))
        if not found:
            continue  # canceled meanwhile: nothing to send
        job = json.loads(found)
        settler.add(Settlement(job, command, "its worker died before sending it"))
    if settler.batched:
        settler.send_with(client, [])  # logs each one: completed, or refused
    settler.send_now(client)  # retries and fails, each if the job is still the dead worker's
    locked = json.loads(client("workers", worker))
    holding = Holding()
    for jid in [*locked.get("jobs", []), *locked.get("stalled", [])]:
        found = client("get", jid)
        job = json.loads(found) if found else None
        if not job or job.get("state") != "running" or job.get("worker") != worker:
            continue
        if remains is not None and not remains.unknown and jid != remains.running:
            # Popped ahead, never started: given back with the retries it has left (a put
            # would reset them), so that jobs crashing each other's workers cannot loop.
            left = min(int(job.get("retries", 5)), int(job.get("remaining", 5)))
            holding.hold([HeldJob({**job, "retries": max(0, left)}, 0.0, 0.0)])
            continue
        ran = "it ran" if remains is not None and not remains.unknown else "it may have run"
        message = f"the worker process running it ({worker}) {how}; {ran} without completing"
        group = f"{job['queue']}-DirtyExit"
        command = ["retry", jid, job["queue"], worker, 0, group, message]
        settler.add(Settlement(job, command, message))
    settler.send_now(client)  # logs each one: handed back with retry (N retries left)
    if holding:
        holding.give_back(client)  # logs each one: given back to its queue, not started
    try:
        client("worker.deregister", worker)
    except QlessException as error:
        if redis_is_down(error):
            raise
