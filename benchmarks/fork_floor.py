"""The fork floor: what fork + exit + wait costs in a process the size of a qless-pool worker.

    python benchmarks/fork_floor.py URL ITERATIONS

The process first imports what a worker imports and connects to Redis as a worker does, then
times ITERATIONS of each, and prints one JSON line:

- bare: fork, the child calls os._exit(0), the parent waits for it;
- with_command: the same, the child first sends one command (PING) on a client made before
  the fork (its first command opens its own connection, as a job child's does).

Each also says the CPU time (user + system) per fork of the parent and of the child
(``getrusage``): the fork's page tables, the copy-on-write faults on both sides, the child's
start and exit.
"""

from __future__ import annotations

import json
import os
import resource
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


def cpu_ms() -> tuple[float, float]:
    """CPU seconds so far of this process and of its reaped children, in ms."""
    own, children = (
        resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
    )
    return (own.ru_utime + own.ru_stime) * 1000, (children.ru_utime + children.ru_stime) * 1000


def timed_cpu(iterations: int, child) -> tuple[list[float], dict[str, float]]:
    """``timed``, and the CPU per fork of the parent and of the child."""
    before = cpu_ms()
    times = timed(iterations, child)
    after = cpu_ms()
    parent, children = ((a - b) / iterations for a, b in zip(after, before))
    return times, {"parent": parent, "child": children, "total": parent + children}


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
    bare, bare_cpu = timed_cpu(iterations, lambda: None)
    with_command, with_command_cpu = timed_cpu(iterations, lambda: child_client.redis.ping())
    print(
        json.dumps(
            {
                "bare_ms": summary(bare),
                "with_command_ms": summary(with_command),
                "bare_cpu_ms": bare_cpu,
                "with_command_cpu_ms": with_command_cpu,
                "rss_mb": rss_mb(),
            }
        )
    )
