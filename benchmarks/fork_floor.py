"""The fork floor: what fork + exit + wait costs in a process the size of a qless-pool worker.

    python benchmarks/fork_floor.py URL ITERATIONS

The process first imports what a worker imports and connects to Redis as a worker does, then
times ITERATIONS of each, and prints one JSON line:

- bare: fork, the child calls os._exit(0), the parent waits for it;
- with_command: the same, the child first sends one command (PING) on a client made before
  the fork (its first command opens its own connection, as a job child's does).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time

import benchjobs  # noqa: F401 - a worker has the job code loaded
import qless  # noqa: F401

import qless_pool.worker  # noqa: F401 - and the worker module itself
from qless_pool.client import connect


def timed(iterations: int, child) -> list[float]:
    times = []
    for _ in range(iterations):
        started = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            try:
                child()
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        times.append((time.perf_counter() - started) * 1000)
    return times


def summary(times: list[float]) -> dict[str, float]:
    ordered = sorted(times)
    return {
        "median": ordered[len(ordered) // 2],
        "p05": ordered[int(len(ordered) * 0.05)],
        "p95": ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))],
        "mean": sum(ordered) / len(ordered),
        "n": len(ordered),
    }


def rss_mb() -> float:
    with open("/proc/self/statm") as file:
        return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1024 / 1024


if __name__ == "__main__":
    url, iterations = sys.argv[1], int(sys.argv[2])
    name = f"{socket.gethostname()}-{os.getpid()}"
    client = connect(url, name)
    client("config.get", "heartbeat")  # connected, as a worker is
    child_client = connect(url, name, announce=False)
    timed(min(50, iterations), lambda: None)  # warm up
    bare = timed(iterations, lambda: None)
    with_command = timed(iterations, lambda: child_client.redis.ping())
    print(
        json.dumps(
            {
                "bare_ms": summary(bare),
                "with_command_ms": summary(with_command),
                "rss_mb": rss_mb(),
            }
        )
    )
