"""The worker parent: reserve a job from its queues in order, run it, settle it.

``Worker(["foo", "bar"]).work()`` runs one; the pool forks one per configured slot. ``Worker``
makes the worker of the run mode asked for: a ``ForkingWorker`` (a child per job, forking.py)
or, with ``fork_per_job=False``, an ``InProcessWorker`` (inprocess.py).
"""

from .base import HANDLED_SIGNALS, Worker, worker_name
from .forking import ForkingWorker
from .inprocess import InProcessWorker

__all__ = ["HANDLED_SIGNALS", "ForkingWorker", "InProcessWorker", "Worker", "worker_name"]
