"""The floor of a fork per job with qless: pop, fork, the child runs the job, wait, in a plain loop.

    python benchmarks/floor_fork_worker.py URL QUEUE

What any qless worker that forks a child per job and keeps qless-pool's contract for the child
must do, and nothing more: the parent pops one job; the child runs it through qless-py's
``Job.process`` on a connection of its own (the job's client is made before the fork; its first
command in the child opens the child's connection) and exits; the parent waits for it. The
benchmark's jobs record their start and complete themselves, so the child sends two commands.
No standby child, no heartbeats, no titles, no signals, no will: what qless-pool-fork spends
above this is its framework, and what this spends above fork_floor.py's "fork + one command on a
new connection + exit + wait" is qless's (the pop, Job.process, the job's complete).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time

import benchjobs  # noqa: F401 - the job code, loaded before the forks as a pool preloads it
import qless

from qless_pool.client import connect


def work(url: str, queue: str) -> None:
    """Pop, fork, run, wait, until interrupted."""
    name = f"{socket.gethostname()}-{os.getpid()}"
    client = connect(url, name)
    job_client = connect(url, name, announce=False)
    while True:
        popped = json.loads(client("pop", queue, name, 1))
        if not popped:
            time.sleep(0.001)
            continue
        fields = popped[0]
        pid = os.fork()
        if pid == 0:
            try:
                qless.Job(job_client, **fields).process()
            finally:
                os._exit(0)
        os.waitpid(pid, 0)


if __name__ == "__main__":
    work(*sys.argv[1:3])
