"""The floor of pickup: what the leanest qless worker woken by puts must do, in a plain loop.

    python benchmarks/floor_listen_worker.py URL QUEUE [--fork]

It listens on qless's ``ql:log`` channel and, for each put to its queue, pops one job and runs
it through qless-py's ``Job.process``: in its own process, or (``--fork``) in a standby child
forked ahead, which gets the job over a pipe, runs it on a connection of its own and exits (the
next standby is forked once it has). Nothing else: no poll interval, heartbeats, signals,
titles beyond "ready", will or status; messages are read straight from the connection.

It is the yardstick for the pickup targets: a put's way to a job's start through qless-core's
put and pop, Redis's publish, and the wake-ups of this machine, with no framework.
"""

from __future__ import annotations

import json
import os
import select
import socket
import sys
from typing import Any

import benchjobs  # noqa: F401 - the job code, loaded first as a pool preloads it
import qless
from setproctitle import setproctitle

from qless_pool.client import connect

#: The title the harness waits for (contenders.py): subscribed, standby forked.
READY = "floor-listen: ready"


def puts_to(queue: str, reply: Any) -> bool:
    """Whether a pubsub reply is qless's news of a put to ``queue``."""
    if not isinstance(reply, list) or len(reply) != 3 or reply[0] != "message":
        return False
    try:
        event = json.loads(reply[2])
    except ValueError:
        return False
    return isinstance(event, dict) and event.get("event") == "put" and event.get("queue") == queue


def fork_standby(job_client: qless.Client) -> tuple[int, int]:
    """A child that waits for its job on a pipe, runs it, exits: (pid, the pipe's write end)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(write_end)
        setproctitle("floor-listen: standby")
        try:
            data = b""
            while not data.endswith(b"\n"):
                chunk = os.read(read_end, 65536)
                if not chunk:
                    break
                data += chunk
            if data:
                qless.Job(job_client, **json.loads(data)).process()
        finally:
            os._exit(0)
    os.close(read_end)
    return pid, write_end


def work(url: str, queue: str, fork: bool) -> None:
    name = f"{socket.gethostname()}-{os.getpid()}"
    client = connect(url, name)
    job_client = connect(url, name, announce=False) if fork else client
    pubsub = client.redis.pubsub()
    pubsub.subscribe("ql:log")
    while (pubsub.get_message(timeout=5.0) or {}).get("type") != "subscribe":
        pass
    connection = pubsub.connection
    standby = fork_standby(job_client) if fork else None
    setproctitle(READY)
    poller = select.poll()
    poller.register(connection._sock.fileno(), select.POLLIN)
    while True:
        poller.poll()
        puts = 0
        while connection.can_read(timeout=0):
            puts += puts_to(queue, connection.read_response())
        for _ in range(puts):
            popped = json.loads(client("pop", queue, name, 1))
            if not popped:
                continue
            if standby is None:
                qless.Job(client, **popped[0]).process()
                continue
            pid, job_pipe = standby
            os.write(job_pipe, (json.dumps(popped[0]) + "\n").encode())
            os.close(job_pipe)
            os.waitpid(pid, 0)
            standby = fork_standby(job_client)


if __name__ == "__main__":
    work(sys.argv[1], sys.argv[2], "--fork" in sys.argv[3:])
