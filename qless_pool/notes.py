"""What the manager and its worker parents tell each other besides signals.

*Notes*, from the workers to the manager: one pipe, one short line per note. The manager makes
the pipe before forking any worker; each worker writes to it, the manager reads it in its loop
(it wakes the manager at once, like a signal). Each note is one ``write`` of fewer than PIPE_BUF
bytes, so notes from many workers never interleave::

    <pid> up           Redis answered it: it reserves jobs (a reload's hand-over waits for it)
    <pid> began        it started its first job: dying from now on is not a failed start

A note is best effort: a worker never blocks on the pipe (it is far from full: a worker writes
each note once in its life).

*The pause flag*, from the manager to the workers: one byte of memory they all share, 1 while
the pool is paused (USR2 came last, not CONT). Unix keeps no order between two different
signals pending at once (a worker blocks its signals while it forks, a starting worker until
its handlers are in place, and Linux then delivers CONT before USR2 as often as not): a worker
that finds both in one read of its wakeup pipe takes the pause from the flag, not from their
order.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from typing import Optional

__all__ = ["BEGAN", "UP", "NoteTaker", "Notes", "PauseFlag", "RetireSlots"]

UP = "up"
BEGAN = "began"


class Notes:
    """The manager's side: the pipe, and what has been read of it."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        # Both ends: the manager never waits on it, nor a worker (the flag is the pipe's, so
        # every worker's copy of the write end has it).
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self.write_fd, False)
        self._partial = b""

    def read(self) -> list[tuple[int, str]]:
        """The notes written since the last read, as (worker pid, note)."""
        data = self._partial
        while True:
            try:
                chunk = os.read(self.read_fd, 65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            data += chunk
        lines = data.split(b"\n")
        self._partial = lines.pop()
        notes = []
        for line in lines:
            pid, _, note = line.decode(errors="replace").partition(" ")
            if pid.isdigit():
                notes.append((int(pid), note))
        return notes

    def close(self) -> None:
        for fd in (self.read_fd, self.write_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


class NoteTaker:
    """A worker's side: ``say(note)`` to its manager (nothing without one)."""

    def __init__(self, fd: Optional[int]):
        self.fd = fd
        if fd is not None:
            os.set_inheritable(fd, False)

    def say(self, note: str) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):  # the manager is gone, or the pipe full: best effort
            os.write(self.fd, f"{os.getpid()} {note}\n".encode())


class RetireSlots:
    """The workers the manager asked to retire if idle (a range's step down), in a map the
    manager and every worker it forks share: a worker acts on WINCH only if its pid is here,
    so that a WINCH from elsewhere (a terminal's resize, with --single-process-group) or one
    read after its job (in process) retires nobody. A slot a pid: ``pid % SLOTS``."""

    SLOTS = 256

    def __init__(self) -> None:
        self.map = mmap.mmap(-1, 4 * self.SLOTS)

    def _slot(self, pid: int) -> slice:
        start = 4 * (pid % self.SLOTS)
        return slice(start, start + 4)

    def ask(self, pid: int) -> None:
        self.map[self._slot(pid)] = pid.to_bytes(4, "little")

    def withdraw(self, pid: int) -> None:
        if self.asked(pid):
            self.map[self._slot(pid)] = bytes(4)

    def asked(self, pid: int) -> bool:
        return int.from_bytes(self.map[self._slot(pid)], "little") == pid


class PauseFlag:
    """One byte shared by the manager and every worker it forks (an anonymous shared map)."""

    def __init__(self) -> None:
        self.map = mmap.mmap(-1, 1)  # MAP_SHARED: forked workers see the manager's writes

    def set(self, paused: bool) -> None:
        self.map[0] = 1 if paused else 0

    def get(self) -> bool:
        return self.map[0] == 1
