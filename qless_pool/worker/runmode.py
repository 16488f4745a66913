"""What a run mode provides the worker's shared loop (a base of base.Worker): the places where a
child per job (forking.py) and jobs in process (inprocess.py) differ. The loop calls these; each
mode overrides what it needs, and the defaults here are a mode whose jobs the loop never sees
running (in process: the loop does not turn while a job runs).
"""

from __future__ import annotations

from typing import Optional

from .reservation import HeldJob

__all__ = ["RunMode"]


class RunMode:
    """The run mode's part of a worker (see the module's docstring)."""

    def _start_mode(self) -> None:
        """Once the worker runs and its signal handlers are in place."""

    def _start_job(self, held: HeldJob) -> None:
        raise NotImplementedError

    def _next_at_once(self) -> bool:
        """After a job: start the next held one now, without a turn of the loop."""
        return False

    def _busy(self) -> bool:
        """A job runs now (the loop turns while it does: a child per job)."""
        return False

    def _lingering(self) -> bool:
        """Processes of its own to wait for before it may exit (its job children)."""
        return False

    def _supervise(self, now: float) -> None:
        """The running job, if the loop watches it: reap, report, timeout, memory."""

    def _heartbeat_running(self, now: float) -> None:
        """Heartbeat the running job, if the loop does (Redis: may raise an outage)."""

    def _job_taken_away(self, jid: str, what: str) -> bool:
        """qless says job ``jid`` ``what`` (lost its lock, was canceled, moved): True if it is
        the running one (then it is acted on)."""
        return False

    def _wake_times(self, now: float) -> list[float]:
        return []

    def _wake_fds(self) -> list[int]:
        return []

    def _show_busy(self) -> bool:
        """Title and record while a job runs; False if none does."""
        return False

    def _standby_pid(self) -> Optional[int]:
        """The child forked ahead for the next job, if any (for qless-pool status)."""
        return None

    def _kill_running(self, reason: str) -> None:
        """Stop the job running now, if any."""

    def _stop_by(self, deadline: float) -> None:
        """A graceful stop must be over by ``deadline`` (monotonic): the job running too."""

    def _end_mode(self) -> None:
        """The worker is exiting."""
