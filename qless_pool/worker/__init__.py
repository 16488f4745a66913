"""The worker parent: reserve a job from its queues in order, run it, settle it.

``Worker(["foo", "bar"]).work()`` runs one; the pool forks one per configured slot.
"""

from .base import HANDLED_SIGNALS, Worker, worker_name

__all__ = ["HANDLED_SIGNALS", "Worker", "worker_name"]
