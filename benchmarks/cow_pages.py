"""What a forked worker copies of the memory it shares with the manager, step by step.

    python benchmarks/cow_pages.py [--ballast-mb 50] [--children 4]

A process loads an application of ``--ballast-mb`` MB of Python objects (the memory scenario's
benchballast), imports what the manager imports, checks the Redis URL as the manager does, and
freezes the collector (as ``-m`` does). Then, for each step below, it forks ``--children``
children that do that step and wait, and reads the private dirty memory of each child
(``/proc/<pid>/smaps_rollup``): the pages the child wrote to, each copied on write. CPython's
reference counts are written to by every use of an object, so a step's figure is roughly the
pages holding the objects the step touched.

Steps: nothing; set a title; one command on a new redis-py client; qless-pool's connect() and
one qless command; a qless-pool worker idle for half a second (all of its start-up).
"""

from __future__ import annotations

import argparse
import gc
import os
import signal
import statistics
import sys
import threading
import time

from harness import RedisServer, smaps_rollup

MB = 1024 * 1024


def private_dirty_mb(pid: int) -> float:
    return smaps_rollup(pid).get("Private_Dirty", 0) / MB


def measure(step, children: int) -> float:
    """The median private dirty memory of ``children`` children that did ``step``."""
    pids = []
    for _ in range(children):
        pid = os.fork()
        if pid == 0:
            try:
                step()
                time.sleep(60)  # killed once measured
            finally:
                os._exit(0)
        pids.append(pid)
    time.sleep(1.0)
    sizes = [private_dirty_mb(pid) for pid in pids]
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    return statistics.median(sizes)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ballast-mb", type=int, default=50)
    parser.add_argument("--children", type=int, default=4)
    args = parser.parse_args()
    os.environ["BENCH_BALLAST_MB"] = str(args.ballast_mb)
    with RedisServer() as server:
        url = server.url()
        import redis

        import qless_pool.pool.manager  # noqa: F401 - what the manager has loaded
        from qless_pool import logs, proctitle
        from qless_pool.client import connect
        from qless_pool.urls import check_redis_url
        from qless_pool.worker import Worker

        check_redis_url(url)  # as the manager does before it forks
        gc.disable()
        import benchballast  # noqa: F401
        import benchjobs  # noqa: F401

        gc.freeze()
        gc.enable()
        logs.configure("ERROR")

        def idle_worker() -> None:
            threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM)).start()
            Worker(["bench"], url).work()

        steps = [
            ("nothing", lambda: None),
            ("set a title", lambda: proctitle.set_title("qless-0.11.4: Waiting for bench")),
            ("one command on a new redis-py client", lambda: redis.Redis.from_url(url).ping()),
            ("connect() and one qless command", lambda: connect(url, "w")("config.get", "x")),
            ("a worker, idle for 0.5 s", idle_worker),
        ]
        print(f"{'step':<40} {'private dirty MB (median of ' + str(args.children) + ')':>34}")
        for name, step in steps:
            print(f"{name:<40} {measure(step, args.children):34.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
