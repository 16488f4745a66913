"""What a worker parent shows of itself: its process title (proctitle.py), its record for
``qless-pool status`` (ops/state.py) and its job counts for Prometheus (ops/metrics.py).

All best effort: a record that cannot be made (a full tmpfs) is said once, and jobs run on.
"""

from __future__ import annotations

from typing import Any, Optional

from .. import proctitle
from ..logs import logger
from ..ops.metrics import JobMeter
from ..ops.state import WorkerSlot

__all__ = ["Presence", "effective_options"]

log = logger.getChild("worker")


class Presence:
    def __init__(self) -> None:
        self.slot: Optional[WorkerSlot] = None
        self.meter: Optional[JobMeter] = None
        self._title = ""

    def open(self, state_path: Optional[str], metrics: bool) -> None:
        """In the worker process, once it runs: its record and its meter."""
        if state_path:
            try:
                self.slot = WorkerSlot(state_path)
            except OSError as error:  # best effort, as the manager's state: jobs come first
                log.warning("no record for qless-pool status: %s", error)
            else:
                self.slot.update("starting")
        if metrics:
            self.meter = JobMeter()

    def title(self, title: str) -> None:
        if title != self._title:
            proctitle.set_title(title)
            self._title = title

    def record(
        self,
        state: str,
        job: Optional[dict[str, Any]] = None,
        started: float = 0.0,
        *,
        jobs_done: int = 0,
        child: Optional[int] = None,
        standby: Optional[int] = None,
        held: int = 0,
        redis_down: tuple[float, str] = (0.0, ""),
    ) -> None:
        """The worker's record for qless-pool status, when anything in it changed."""
        if self.slot is not None:
            self.slot.record(state, job, started, jobs_done, child, standby, held, redis_down)

    def observe(self, job: dict[str, Any], outcome: str, seconds: float) -> None:
        """One job's outcome, for the metrics: completed, failed, retried, moved, canceled."""
        if self.meter is not None:
            self.meter.finished(job["queue"], outcome, seconds)

    def stopping(self) -> None:
        if self.slot is not None:
            self.slot.update("stopping")


def effective_options(worker: Any) -> dict[str, Any]:
    """The worker options (options.py) as ``worker`` holds them: what it logs at start."""
    limits = worker.limits
    return {
        "interval": worker.interval,
        "reserver": worker.reserver.name,
        "fork_per_job": worker.fork_per_job,
        "prefetch": worker.prefetch.fixed,
        "job_timeout": worker.job_timeout,
        "allow_modules": list(worker.allow_modules),
        "max_jobs": limits.max_jobs,
        "max_jobs_jitter": limits.max_jobs_jitter,
        "max_memory": limits.max_memory_mb,
        "graceful_timeout": limits.graceful_timeout,
    }
