"""The floor: qless pop + complete in a plain loop, no framework at all.

    python benchmarks/floor_worker.py URL QUEUE

Each job gets the same start record as every contender's jobs (benchjobs.mark, or for the quiet
jobs benchjobs.mark_quietly), and nothing else: no fork, no heartbeats, no events, no signals, no bookkeeping. What a
contender spends above this is its framework.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time

import benchjobs

from qless_pool.client import connect

if __name__ == "__main__":
    url, queue = sys.argv[1:3]
    name = f"{socket.gethostname()}-{os.getpid()}"
    client = connect(url, name)
    connection = client.redis
    while True:
        popped = json.loads(client("pop", queue, name, 1))
        if not popped:
            time.sleep(0.001)
            continue
        job = popped[0]
        if job["klass"] == "benchjobs.Quiet":
            benchjobs.mark_quietly(benchjobs.put_time(job["data"]))
        else:
            benchjobs.mark(connection, benchjobs.put_time(job["data"]))
        client("complete", job["jid"], name, queue, job["data"])
