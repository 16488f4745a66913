"""Limits: when a worker, or the job it runs, has had enough.

- ``--max-jobs N`` (and ``--max-jobs-jitter M``): a worker stops after N + random(0..M) jobs, to
  be replaced; the jitter keeps all workers from restarting at once.
- ``--max-memory MB``: a worker whose RSS is above MB after a job stops, to be replaced (with
  jobs in the worker process, that includes what its jobs left behind); a job child whose own
  memory (what it does not share with its worker) goes above MB is killed, and its job handed
  back. A job's first second is not checked; after that, once a second.
- ``--graceful-timeout S``: a job still running S seconds after its worker was told to stop
  gracefully (QUIT, a graceful TERM, HUP, recycling) is killed and handed back.

(``--job-timeout`` fails a job that runs too long: that is the job's failure, see settling.py.)
A worker that stops for one of the first two exits with status RECYCLED, which the manager
counts as a recycle: it replaces the worker at once, with no respawn backoff.
"""

from __future__ import annotations

import os
import random
import time
from typing import Optional

from .. import lifeline
from ..logs import logger
from ..ops.state import private_bytes, rss_bytes

__all__ = ["MEMORY_CHECK_INTERVAL", "RECYCLED", "Limits"]

log = logger.getChild("worker")

#: How often the worker looks at its own (after a job) or its job child's memory.
MEMORY_CHECK_INTERVAL = 1.0
#: The exit status of a worker that stopped to be replaced (--max-jobs, --max-memory).
RECYCLED = 75


class Limits:
    """One worker's limits; ``max_memory`` in megabytes."""

    def __init__(
        self,
        max_jobs: Optional[int] = None,
        max_jobs_jitter: int = 0,
        max_memory: Optional[int] = None,
        graceful_timeout: Optional[float] = None,
    ):
        self.max_jobs, self.max_jobs_jitter, self.max_memory_mb = (
            max_jobs,
            max_jobs_jitter,
            max_memory,
        )
        self.job_limit = max_jobs + random.randint(0, max_jobs_jitter) if max_jobs else None
        self.max_memory = max_memory * 1024 * 1024 if max_memory else None
        self.graceful_timeout = graceful_timeout
        self._next_memory_check = 0.0
        self._unmeasurable_said = False

    def worker_done(self, jobs_done: int) -> Optional[str]:
        """After a job: why this worker should be replaced now, if it should."""
        if self.job_limit is not None and jobs_done >= self.job_limit:
            return f"it ran {jobs_done} jobs (--max-jobs)"
        if self.max_memory is None or time.monotonic() < self._next_memory_check:
            return None
        self._next_memory_check = time.monotonic() + MEMORY_CHECK_INTERVAL
        rss = rss_bytes(os.getpid())
        if rss is not None and rss > self.max_memory:
            return f"its RSS {rss >> 20} MB is above --max-memory {self.max_memory >> 20} MB"
        return None

    def child_over(self, pid: int) -> Optional[str]:
        """Why the job child ``pid`` must be killed for its memory, if it must."""
        if self.max_memory is None:
            return None
        used = private_bytes(pid)
        if used is None and not self._unmeasurable_said and lifeline.alive(pid):
            # Not gone: /proc will not say (hidepid, no /proc). Said once: it will not change.
            self._unmeasurable_said = True
            log.warning(
                "--max-memory: cannot measure the memory of job child %d (/proc/%d/smaps_rollup "
                "and statm are unreadable): job children are not held to the limit",
                pid,
                pid,
            )
        if used is not None and used > self.max_memory:
            return (
                f"its own memory {used >> 20} MB went above --max-memory {self.max_memory >> 20} MB"
            )
        return None

    def graceful_reason(self) -> str:
        return (
            f"still running {self.graceful_timeout:g}s after the worker was told to stop "
            f"(--graceful-timeout)"
        )
