"""A worker's will: what it leaves undone if it dies, and the helper that settles it.

A worker parent can die with work in hand: a job it runs in its own process (--no-fork-per-job)
calls ``os._exit`` or crashes the interpreter; someone sends it SIGKILL. qless would notice only
when the jobs' locks expire (a minute by default), and then run every one of them again,
including jobs that had finished and whose ``complete`` the worker was about to send with its
next pop. So the worker keeps a journal, its *will*, in the pool's state directory::

    R <jid>          it started running this job
    C <json>         a command it owes qless for a job whose run ended, as JSON: a complete,
                     sent with the next pop; a retry or fail, sent next

and truncates it whenever everything it owed has been sent: two short appends a job, and two
calls per pop, no fsync (the file is on a tmpfs and only has to survive the process, not the
machine): about 7 microseconds a job (docs/BENCHMARKS.md). The last R names the job that may
have been running: the helper hands it back only if qless still says it runs on the dead
worker, and what the worker owed for it is sent first, so a job that ended needs no line of
its own.

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
import json
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from .logs import logger

__all__ = ["SETTLE_DEADLINE", "Remains", "Will", "read_will", "settle_remains"]

log = logger.getChild("settler")

#: How long the helper keeps trying while Redis is away; then the jobs' locks expire as usual.
SETTLE_DEADLINE = 30.0


class Will:
    """The worker's side: its journal, appended to as jobs start, end and are settled.

    Best effort, like the rest of the state: a write that fails (a full tmpfs, the directory
    removed) turns the will off, with one warning; the worker goes on without it.
    """

    def __init__(self, path: str):
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
        self.failed = False  # a write failed: no more are tried (the fd stays open until close)
        self.running: Optional[bytes] = None  # the R line of the job running now
        # The keeper thread (jobs in process) sends the completes owed while a job runs.
        self._lock = threading.Lock()

    def started(self, job: dict[str, Any]) -> None:
        self.running = f"R {job['jid']}\n".encode()
        with self._lock:
            self._write(self.running)

    def ended(self) -> None:
        """The job it ran has ended (what it owes for it, if anything, is in the will)."""
        self.running = None

    def owe(self, command: list[Any]) -> None:
        """A command this worker owes qless (Settler.add): the job's jid is its second item."""
        line = b"C " + json.dumps(command).encode() + b"\n"
        with self._lock:
            self._write(line)

    def paid(self) -> None:
        """What it owed has been sent: start the journal again."""
        with self._lock:
            if self.failed:
                return
            try:
                os.ftruncate(self.fd, 0)
                if self.running is not None:
                    os.write(self.fd, self.running)
            except OSError as error:
                self._give_up(error)

    def _write(self, data: bytes) -> None:
        """Append ``data`` (the caller holds the lock)."""
        if self.failed:
            return
        try:
            os.write(self.fd, data)
        except OSError as error:
            self._give_up(error)

    def _give_up(self, error: OSError) -> None:
        log.warning(
            "cannot keep this worker's will in %s (%s): if it dies, its jobs wait for their "
            "locks to expire",
            self.path,
            error,
        )
        self.failed = True

    def close(self) -> None:
        """The worker ends cleanly: nothing is left to settle."""
        with self._lock:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1
        with contextlib.suppress(OSError):
            os.unlink(self.path)


@dataclass
class Remains:
    """What a will says: the job running when the worker died, and the commands it owed."""

    running: Optional[str] = None
    owed: list[list[Any]] = field(default_factory=list)


def read_will(path: str) -> Optional[Remains]:
    """The will at ``path`` (None if there is none). A line cut short by the death is left out."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as file:
        data = file.read()
    remains = Remains()
    for line in data.split(b"\n")[:-1]:  # the last piece has no newline: cut short, or empty
        kind, _, rest = line.partition(b" ")
        if kind == b"R":
            remains.running = rest.decode(errors="replace")
        elif kind == b"E":
            remains.running = None
        elif kind == b"C":
            with contextlib.suppress(ValueError):
                command = json.loads(rest)
                if isinstance(command, list) and len(command) > 1:
                    remains.owed.append(command)
    return remains


def settle_remains(redis_url: str, worker: str, will_path: str, how: str) -> int:
    """The helper's body: settle what ``worker`` (a dead worker's qless name) left, as its will
    at ``will_path`` says; ``how`` it died goes into the retried job's message. Returns the
    exit status: 0, or 1 if Redis stayed away for SETTLE_DEADLINE."""
    from .client import connect, redis_is_down

    remains = read_will(will_path)
    deadline = time.monotonic() + SETTLE_DEADLINE
    delay = 0.5
    while True:
        try:
            client = connect(redis_url, worker, socket_connect_timeout=3.0, socket_timeout=3.0)
            _settle(client, worker, remains, how)
            break
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
    with contextlib.suppress(OSError):
        os.unlink(will_path)
    return 0


def _settle(client: Any, worker: str, remains: Optional[Remains], how: str) -> None:
    from qless.exceptions import QlessException

    from .client import redis_is_down
    from .reservation import HeldJob, Holding
    from .settling import Settlement, Settler

    settler = Settler(worker)
    for command in remains.owed if remains else []:
        found = client("get", command[1])
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
        if remains is not None and jid != remains.running:
            # Popped ahead, never started: given back with the retries it has left (a put
            # would reset them), so that jobs crashing each other's workers cannot loop.
            left = min(int(job.get("retries", 5)), int(job.get("remaining", 5)))
            holding.hold([HeldJob({**job, "retries": max(0, left)}, 0.0, 0.0)])
            continue
        ran = "it ran" if remains is not None else "it may have run"
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
