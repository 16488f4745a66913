"""An application for the pool tests to preload (``-m poolapp`` / ``-m poolapp:build_ballast``)."""

import gc
import os

import qless_pool

LOADED_IN = os.getpid()  # the process that preloaded us: the manager
BALLAST: list = []


@qless_pool.after_prefork
def record_worker(worker):
    path = os.environ.get("POOLAPP_HOOK_LOG")
    if path:
        with open(path, "a") as log:
            log.write(f"{os.getpid()} {os.getppid()} {LOADED_IN} {','.join(worker.queues)}\n")
    if os.environ.get("POOLAPP_HOOK_FAILS"):
        raise RuntimeError("the database is down")
    if os.environ.get("POOLAPP_COLLECT"):
        gc.collect()  # a full collection in every worker: it must not touch the preloaded objects


def build_ballast():
    """About POOLAPP_BALLAST_MB megabytes of small Python objects, tracked by the collector."""
    megabytes = int(os.environ.get("POOLAPP_BALLAST_MB", "100"))
    BALLAST.extend([i, f"item-{i}"] for i in range(megabytes * 1024 * 1024 // 150))
