"""The in-process floor with batching: what the leanest qless worker that batches as qless-pool
does must do, in a plain loop, no framework at all.

    python benchmarks/floor_batch_worker.py URL QUEUE

Pops up to 32 jobs at a time (qless-pool's largest batch) and sends the completes of the last
batch with that pop, in one call (client.pipelined, the batch command); runs each job with
qless-py's ``Job.process``, on a client that keeps a plain ``complete()`` for that call, as
qless-pool's does. Nothing else: no heartbeats, events, signals, logs, will, status, limits.

It is the yardstick for the in-process targets: what it gets against qless-py-worker is what a
qless worker can get on this machine with qless-core's scripts and one Redis; what qless-pool
--no-fork-per-job gets below it is what its framework costs.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from typing import Any

import benchjobs  # noqa: F401  (the jobs' module, loaded before the first job)
import qless

from qless_pool.client import connect, pipelined

BATCH = 32


class KeepingClient(qless.Client):  # type: ignore[misc]
    """A client that keeps a job's plain complete(jid, worker, queue, data) for the next pop."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.kept: list[list[Any]] = []

    def __call__(self, command: str, *args: Any) -> Any:
        if command == "complete" and len(args) == 4:
            self.kept.append([command, *args])
            return "complete"
        return super().__call__(command, *args)


def work(url: str, queue: str) -> None:
    name = f"{socket.gethostname()}-{os.getpid()}"
    client = connect(url, name, client_class=KeepingClient)
    while True:
        kept, client.kept = client.kept, []
        answers = pipelined(client, [*kept, ["pop", queue, name, BATCH]])
        popped = json.loads(answers[-1])
        if not popped:
            time.sleep(0.001)
            continue
        for fields in popped:
            qless.Job(client, **fields).process()


if __name__ == "__main__":
    work(*sys.argv[1:3])
