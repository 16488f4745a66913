"""The eight scenarios. Each takes the contenders to run and its parameters, runs every contender in
turn (interleaved: round after round, each round in a rotated order, so that no contender always
runs first or last), and returns every repetition's measurements.

A run that fails (a timeout, a crash) is recorded with its error and the tail of its log, and the
scenario carries on with the next one.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import benchjobs
from contenders import CONTENDERS, Contender, Launch, Producer
from harness import (
    BENCH_DIR,
    CLOCK_TICKS,
    Processes,
    RedisServer,
    age,
    alive,
    cpu_seconds,
    descendants,
    log,
    percentile,
    processes_in,
    read_stat,
    smaps_rollup,
    title,
    wait_until,
)

MB = 1024 * 1024


@dataclass
class Context:
    redis: RedisServer
    processes: Processes
    seed: int = 1


@dataclass
class Running:
    """A contender's processes while a scenario uses them."""

    contender: Contender
    launch: Launch
    processes: list[subprocess.Popen]
    launched_at: float  # time.monotonic() just before the first process started
    top: list[int] = field(default_factory=list)

    def tree(self) -> list[int]:
        return descendants(self.top)

    def ready(self) -> list[int]:
        """The workers that are up and waiting for a job (their idle title says so)."""
        pattern = self.contender.ready
        assert pattern is not None, f"{self.contender.name} has no idle title"
        return [pid for pid in self.tree() if pattern.match(title(pid))]

    def new_ready(self, known: set[int]) -> list[int]:
        """Workers not in ``known`` that are up and waiting (reads only their titles: polling
        the tree costs the harness about 0.2 ms of CPU, which the contender may need)."""
        pattern = self.contender.ready
        assert pattern is not None, f"{self.contender.name} has no idle title"
        return [pid for pid in self.tree() if pid not in known and pattern.match(title(pid))]

    def wait_ready(self, count: int, timeout: float, interval: float = 0.005) -> list[int]:
        def enough() -> Optional[list[int]]:
            ready = self.ready()
            if len(ready) >= count:
                return ready
            if not any(p.poll() is None for p in self.processes):
                raise RuntimeError(f"{self.contender.name} exited before its workers were up")
            return None

        return wait_until(enough, timeout, interval, f"{count} workers of {self.contender.name}")


@contextlib.contextmanager
def running(ctx: Context, contender: Contender, launch: Launch) -> Iterator[Running]:
    env = contender.environment(launch)
    commands = contender.commands(launch)
    started = time.monotonic()
    processes = []
    try:
        for argv in commands:
            processes.append(ctx.processes.launch(argv, launch.directory, env))
        yield Running(contender, launch, processes, started, [p.pid for p in processes])
    finally:
        ctx.processes.stop(launch.directory)


def rotated(names: Sequence[str], round_index: int) -> list[str]:
    shift = round_index % len(names) if names else 0
    return list(names[shift:]) + list(names[:shift])


def attempt(ctx: Context, directory: str, body: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one measurement; a failure becomes the run's record instead of stopping everything."""
    try:
        return body()
    except Exception as error:
        log(f"    FAILED: {error!r}")
        return {
            "error": repr(error),
            "traceback": traceback.format_exc(),
            "log_tail": ctx.processes.log_tail(directory) if os.path.isdir(directory) else "",
        }


# --- 1. throughput ----------------------------------------------------------------------------------


def throughput(
    ctx: Context,
    names: Sequence[str],
    jobs: int,
    worker_counts: Sequence[int],
    rounds: int,
    max_window: Optional[float] = None,
    floor_iterations: int = 0,
    kind: str = "noop",
) -> dict[str, Any]:
    """N no-op jobs are put before the contender starts; the rate is counted from the moment the
    last of its workers started its first job (so start-up is excluded) to the last job's start.
    ``kind``: ``"noop"`` (each job records its start with a Redis command of its own) or
    ``"quiet"`` (in a file: no Redis command but qless's own).

    ``max_window``: stop a run once it has run this many seconds after its first job started,
    even if jobs are left (the slow contenders: a rate needs a steady window, not N jobs).
    ``floor_iterations``: in every round, next to the contenders, also time fork + exit + wait
    (fork_floor.py), so the fork-per-job overhead is set against a floor taken in the same
    minutes (the load of a shared machine drifts)."""
    runs = []
    floors = []
    for round_index in range(rounds):
        for workers in worker_counts:
            if floor_iterations and workers == min(worker_counts):
                floors.append(fork_floor_round(ctx, floor_iterations, round_index, "throughput"))
            for name in rotated(names, round_index):
                contender = CONTENDERS[name]
                directory = ctx.processes.new_directory(f"throughput-{kind}-{name}-{workers}")
                result = attempt(
                    ctx,
                    directory,
                    functools.partial(
                        _throughput_run, ctx, contender, workers, jobs, max_window, directory,
                        kind,
                    ),
                )  # fmt: skip
                runs.append(
                    {"round": round_index + 1, "contender": name, "workers": workers, **result}
                )
                if result.get("jobs_per_s"):
                    log(
                        f"  throughput  round {round_index + 1}/{rounds}  {workers} workers  "
                        f"{name:<28} {result['jobs_per_s']:8.0f} jobs/s"
                    )
    params = {
        "jobs": jobs,
        "max_window_s": max_window,
        "workers": list(worker_counts),
        "rounds": rounds,
        "floor_iterations": floor_iterations,
        "kind": kind,
    }
    return {"params": params, "runs": runs, "fork_floor": floors}


def _throughput_run(
    ctx: Context,
    contender: Contender,
    workers: int,
    jobs: int,
    max_window: Optional[float],
    directory: str,
    kind: str = "noop",
) -> dict[str, Any]:
    ctx.redis.flush()
    producer = Producer(contender.family, ctx.redis.url())
    producer.put(kind, jobs)
    connection = ctx.redis.connection()
    start_file = os.path.join(directory, benchjobs.STARTS_FILE)
    launch = Launch(workers, ctx.redis.url(), directory, env={"BENCH_STARTS_FILE": start_file})

    def starts() -> list[tuple[float, int, int, float]]:
        if kind == "quiet":
            return benchjobs.read_start_file(start_file)
        return benchjobs.read_starts(connection)

    # For the cap: the records read so far, and when every worker had started a job.
    worker_field = 2 if contender.jobs_run_in == "child" else 1
    seen: set[int] = set()
    all_started: list[float] = []
    counted = [0, 0]  # the quiet jobs' file: bytes read, whole lines in them

    def started_so_far() -> int:
        if kind != "quiet":
            return connection.llen(benchjobs.STARTS)
        try:
            with open(start_file, "rb") as file:
                file.seek(counted[0])
                chunk = file.read()
        except FileNotFoundError:
            return 0
        whole = chunk.rfind(b"\n") + 1
        counted[0] += whole
        counted[1] += chunk.count(b"\n", 0, whole)
        return counted[1]

    def finished() -> bool:
        started = started_so_far()
        if started >= jobs:
            return True
        if not max_window:
            return False
        if not all_started and started:
            seen.update(record[worker_field] for record in starts())
            if len(seen) >= workers:
                all_started.append(time.monotonic())
        return bool(all_started) and time.monotonic() - all_started[0] >= max_window

    with running(ctx, contender, launch) as run:
        wait_until(finished, max(60.0, jobs / 20), 0.01, f"{jobs} jobs to start")
        capped = started_so_far() < jobs
        if not capped:
            wait_until(lambda: producer.completed() >= jobs, 30, 0.01, f"{jobs} jobs to complete")
        launched_at = time.time() - (time.monotonic() - run.launched_at)
        stopping_at = time.time()
    # A job child forked just as the contender is killed can still start its job once its
    # worker is gone (re-parented, so with another ppid): what started after the stop began
    # does not count.
    records = [r for r in starts() if r[0] <= stopping_at]
    result = throughput_rate(records, contender.jobs_run_in, launched_at)
    if not result["jobs_per_s"]:
        raise RuntimeError(f"no steady window: {result}")
    return {**result, "capped": capped, "failed": producer.failed()}


def throughput_rate(
    records: Sequence[tuple[float, int, int, float]], jobs_run_in: str, launched_at: float
) -> dict[str, Any]:
    """Jobs per second once every worker has started: from the time the last worker started its
    first job to the last job's start, counting the jobs started after that first one."""
    worker_of = (lambda r: r[2]) if jobs_run_in == "child" else (lambda r: r[1])
    first: dict[int, float] = {}
    for record in records:
        worker = worker_of(record)
        first[worker] = min(first.get(worker, record[0]), record[0])
    starts = sorted(r[0] for r in records)
    all_running = max(first.values())
    last = starts[-1]
    counted = sum(1 for t in starts if t > all_running)
    window = last - all_running
    return {
        "jobs": len(records),
        "workers_seen": len(first),
        "jobs_per_s": counted / window if window > 0 and counted else None,
        "window_s": window,
        "jobs_in_window": counted,
        # Including start-up: from launching the contender to the last job's start.
        "first_start_after_launch_s": starts[0] - launched_at,
        "all_workers_busy_after_launch_s": all_running - launched_at,
        "jobs_per_s_with_startup": len(records) / (last - launched_at),
    }


# --- 1b. CPU per job ---------------------------------------------------------------------------------


def cpu_per_job(
    ctx: Context,
    names: Sequence[str],
    jobs: dict[str, int],
    rounds: int,
    floor_iterations: int,
) -> dict[str, Any]:
    """One worker of each contender on N queued no-op jobs: the CPU time (user + system) of
    every process of the contender, with the children it reaped, and of redis-server, per job,
    over the jobs completed between the first and the last tenth; and the page faults of the
    contender's processes. ``jobs``: N by where the contender runs a job (``"child"``,
    ``"worker"``). Each round also takes the fork floor's CPU (fork_floor.py), so a job's CPU
    with a child per job is set against a floor measured in the same minutes."""
    runs = []
    floors = []
    for round_index in range(rounds):
        floors.append(fork_floor_round(ctx, floor_iterations, round_index, "cpu"))
        for name in rotated(names, round_index):
            contender = CONTENDERS[name]
            count = jobs[contender.jobs_run_in]
            directory = ctx.processes.new_directory(f"cpu-{name}")
            result = attempt(
                ctx, directory, functools.partial(_cpu_run, ctx, contender, count, directory)
            )
            runs.append({"round": round_index + 1, "contender": name, **result})
            if "total_ms" in result:
                log(
                    f"  cpu  round {round_index + 1}/{rounds}  {name:<24} {result['total_ms']:.3f}"
                    f" ms a job ({result['contender_ms']:.3f} + redis {result['redis_ms']:.3f})"
                )
    params = {"jobs": dict(jobs), "rounds": rounds, "floor_iterations": floor_iterations}
    return {"params": params, "runs": runs, "fork_floor": floors}


def _tree_usage(directory: str, top: Sequence[int]) -> tuple[float, int]:
    """CPU seconds and minor page faults of every process of a contender, with those of the
    children each has reaped (a job child forked and reaped between two readings counts in its
    parent's; one alive at both counts in its own)."""
    pids = set(processes_in(directory)) | set(top)
    pids |= set(descendants(pids))
    seconds, faults = 0.0, 0
    for pid in pids:
        fields = read_stat(pid)
        if fields is None:
            continue
        seconds += sum(int(f) for f in fields[11:15]) / CLOCK_TICKS  # utime stime cutime cstime
        faults += int(fields[7]) + int(fields[8])  # minflt cminflt
    return seconds, faults


def _cpu_run(ctx: Context, contender: Contender, jobs: int, directory: str) -> dict[str, Any]:
    ctx.redis.flush()
    producer = Producer(contender.family, ctx.redis.url())
    producer.put("noop", jobs)
    launch = Launch(1, ctx.redis.url(), directory)
    assert ctx.redis.process is not None
    redis_pid = ctx.redis.process.pid
    first, last = jobs // 10, jobs - jobs // 10
    with running(ctx, contender, launch) as run:
        wait_until(lambda: producer.completed() >= first, max(60.0, jobs / 20), 0.002,
                   f"{first} jobs to complete")  # fmt: skip
        done0, (cpu0, faults0), redis0 = producer.completed(), _tree_usage(directory, run.top), \
            cpu_seconds(redis_pid)  # fmt: skip
        wait_until(lambda: producer.completed() >= last, max(60.0, jobs / 20), 0.002,
                   f"{last} jobs to complete")  # fmt: skip
        done1, (cpu1, faults1), redis1 = producer.completed(), _tree_usage(directory, run.top), \
            cpu_seconds(redis_pid)  # fmt: skip
    counted = done1 - done0
    if counted < 1:
        raise RuntimeError(f"no job completed between the two readings (at {done0} of {jobs}): "
                           "too few jobs for the batches the contender completes in")  # fmt: skip
    contender_ms = (cpu1 - cpu0) * 1000 / counted
    redis_ms = (redis1 - redis0) * 1000 / counted
    return {
        "jobs": counted,
        "contender_ms": contender_ms,
        "redis_ms": redis_ms,
        "total_ms": contender_ms + redis_ms,
        "faults": (faults1 - faults0) / counted,
    }


# --- 2. pickup latency ------------------------------------------------------------------------------


def pickup(
    ctx: Context,
    names: Sequence[str],
    puts: int,
    workers: int,
    intervals: Sequence[str],
    gap_ms: tuple[float, float],
    rounds: int,
    skip_slow_default: bool = False,
) -> dict[str, Any]:
    """On an idle pool, single puts at random gaps; latency = the job function's start minus the
    time just before the put was sent. ``intervals``: "default" (each contender's own) and/or
    seconds. rq blocks on Redis instead of polling: it runs once, under "default"."""
    runs = []
    for round_index in range(rounds):
        for setting in intervals:
            for name in rotated(names, round_index):
                contender = CONTENDERS[name]
                if setting != "default" and not contender.polls:
                    continue
                interval = None if setting == "default" else float(setting)
                effective = contender.default_interval if interval is None else interval
                record: dict[str, Any] = {
                    "round": round_index + 1,
                    "contender": name,
                    "interval": setting,
                    "interval_s": effective,
                    "workers": workers,
                }
                if skip_slow_default and setting == "default" and (effective or 0) > 10:
                    runs.append({**record, "skipped": f"default interval {effective:g}s (--quick)"})
                    continue
                directory = ctx.processes.new_directory(f"pickup-{name}-{setting}")
                seed = ctx.seed * 1000 + round_index
                result = attempt(
                    ctx,
                    directory,
                    functools.partial(
                        _pickup_run,
                        ctx,
                        contender,
                        workers,
                        interval,
                        puts,
                        gap_ms,
                        seed,
                        directory,
                    ),
                )
                runs.append({**record, **result})
                if "p50_ms" in result:
                    log(
                        f"  pickup      round {round_index + 1}/{rounds}  interval {setting:<8}"
                        f"{name:<28} p50 {result['p50_ms']:8.2f} ms  p95 {result['p95_ms']:8.2f} ms"
                    )
    return {
        "params": {
            "puts": puts,
            "workers": workers,
            "intervals": list(intervals),
            "gap_ms": list(gap_ms),
            "rounds": rounds,
        },
        "runs": runs,
    }


def _pickup_run(
    ctx: Context,
    contender: Contender,
    workers: int,
    interval: Optional[float],
    puts: int,
    gap_ms: tuple[float, float],
    seed: int,
    directory: str,
) -> dict[str, Any]:
    ctx.redis.flush()
    producer = Producer(contender.family, ctx.redis.url())
    connection = ctx.redis.connection()
    launch = Launch(workers, ctx.redis.url(), directory, interval=interval)
    rng = random.Random(seed)
    with running(ctx, contender, launch) as run:
        run.wait_ready(workers, 60)
        time.sleep(0.2)
        for _ in range(puts):
            time.sleep(rng.uniform(*gap_ms) / 1000)
            producer.put("noop", 1, stamped=True)
        poll_interval = interval or contender.default_interval or 0
        wait_until(
            lambda: connection.llen(benchjobs.STARTS) >= puts,
            poll_interval + 30,
            0.01,
            f"{puts} jobs to start",
        )
    latencies = sorted((r[0] - r[3]) * 1000 for r in benchjobs.read_starts(connection))
    return {
        "n": len(latencies),
        "p50_ms": percentile(latencies, 0.50),
        "p95_ms": percentile(latencies, 0.95),
        "p99_ms": percentile(latencies, 0.99),
        "max_ms": latencies[-1],
        "mean_ms": sum(latencies) / len(latencies),
        "latencies_ms": [round(v, 3) for v in latencies],
        "seed": seed,
    }


# --- 3. start-up ------------------------------------------------------------------------------------


def startup(
    ctx: Context, names: Sequence[str], workers: int, import_cost: float, rounds: int
) -> dict[str, Any]:
    """From launching the contender to all its workers waiting for jobs (their idle titles), for
    an application whose import costs ``import_cost`` seconds of CPU."""
    runs = []
    for round_index in range(rounds):
        for name in rotated(names, round_index):
            contender = CONTENDERS[name]
            directory = ctx.processes.new_directory(f"startup-{name}")
            result = attempt(
                ctx,
                directory,
                functools.partial(_startup_run, ctx, contender, workers, import_cost, directory),
            )
            runs.append({"round": round_index + 1, "contender": name, "workers": workers, **result})
            if "all_ready_s" in result:
                log(
                    f"  start-up    round {round_index + 1}/{rounds}  {name:<28} "
                    f"{result['all_ready_s']:6.2f} s to {workers} workers waiting"
                )
    return {
        "params": {"workers": workers, "import_cost_s": import_cost, "rounds": rounds},
        "runs": runs,
    }


def _startup_run(
    ctx: Context, contender: Contender, workers: int, import_cost: float, directory: str
) -> dict[str, Any]:
    ctx.redis.flush()
    launch = Launch(
        workers,
        ctx.redis.url(),
        directory,
        preload=["benchheavy", "benchjobs"],
        env={"BENCH_IMPORT_COST": str(import_cost)},
    )
    with running(ctx, contender, launch) as run:
        # Polled every 10 ms: the cores are busy starting the workers; the harness keeps out.
        run.wait_ready(1, 120, 0.01)
        first_at = time.monotonic()
        run.wait_ready(workers, 120, 0.01)
        all_at = time.monotonic()
    return {"first_ready_s": first_at - run.launched_at, "all_ready_s": all_at - run.launched_at}


# --- 4. memory --------------------------------------------------------------------------------------


def memory(
    ctx: Context,
    names: Sequence[str],
    workers: int,
    ballast_mb: int,
    jobs_per_worker: int,
    rounds: int,
) -> dict[str, Any]:
    """An application holding ``ballast_mb`` MB of Python objects; every worker runs at least
    ``jobs_per_worker`` jobs (the first job in each process makes a full collection); then the
    PSS of every process of the contender is summed (/proc/<pid>/smaps_rollup)."""
    runs = []
    for round_index in range(rounds):
        for name in rotated(names, round_index):
            contender = CONTENDERS[name]
            directory = ctx.processes.new_directory(f"memory-{name}")
            result = attempt(
                ctx,
                directory,
                functools.partial(
                    _memory_run, ctx, contender, workers, ballast_mb, jobs_per_worker, directory
                ),
            )
            runs.append({"round": round_index + 1, "contender": name, "workers": workers, **result})
            if "total_pss_mb" in result:
                log(
                    f"  memory      round {round_index + 1}/{rounds}  {name:<28} "
                    f"PSS {result['total_pss_mb']:7.1f} MB = "
                    f"{result['pss_over_manager_rss']:5.2f}x the manager's RSS"
                )
    return {
        "params": {
            "workers": workers,
            "ballast_mb": ballast_mb,
            "jobs_per_worker": jobs_per_worker,
            "rounds": rounds,
        },
        "runs": runs,
    }


def _memory_run(
    ctx: Context,
    contender: Contender,
    workers: int,
    ballast_mb: int,
    jobs_per_worker: int,
    directory: str,
) -> dict[str, Any]:
    ctx.redis.flush()
    producer = Producer(contender.family, ctx.redis.url())
    connection = ctx.redis.connection()
    launch = Launch(
        workers,
        ctx.redis.url(),
        directory,
        preload=["benchballast", "benchjobs"],
        # Polling every second: a worker that found the queue empty (qless-py's and reqless's
        # sleep a minute by default) picks up the jobs put to even out the counts soon.
        interval=1.0 if contender.polls else None,
        env={"BENCH_BALLAST_MB": str(ballast_mb)},
    )
    worker_of = 2 if contender.jobs_run_in == "child" else 1
    with running(ctx, contender, launch) as run:
        run.wait_ready(workers, 300)
        put = 0
        # In process, prefetch hands fast jobs out in batches, unevenly: put more until every
        # worker has run its share, checking after each batch.
        for batches in range(61):
            counts: dict[int, int] = {}
            for record in benchjobs.read_starts(connection):
                counts[record[worker_of]] = counts.get(record[worker_of], 0) + 1
            short = len(counts) < workers or min(counts.values()) < jobs_per_worker
            if not short:
                break
            if batches == 60:
                raise RuntimeError(f"not every worker ran {jobs_per_worker} jobs: {counts}")
            batch = workers * max(jobs_per_worker - min(counts.values(), default=0), 10)
            producer.put("collect", batch)
            put += batch
            wait_until(
                lambda put=put: producer.completed() >= put, 300, 0.02, f"{put} jobs to complete"
            )
        # Idle again (fork per job: the last job children have exited).
        run.wait_ready(workers, 30)
        time.sleep(0.3)
        run.wait_ready(workers, 30)
        processes = []
        for pid in run.tree():
            values = smaps_rollup(pid)
            processes.append(
                {
                    "pid": pid,
                    "title": title(pid)[:80],
                    "rss_mb": values.get("Rss", 0) / MB,
                    "pss_mb": values.get("Pss", 0) / MB,
                    "private_mb": (values.get("Private_Clean", 0) + values.get("Private_Dirty", 0))
                    / MB,
                }
            )
        manager = run.top[0]
    manager_rss = next(p["rss_mb"] for p in processes if p["pid"] == manager)
    total_pss = sum(p["pss_mb"] for p in processes)
    return {
        "jobs": put,
        "jobs_per_worker_min": min(counts.values()),
        "total_pss_mb": total_pss,
        "manager_rss_mb": manager_rss,
        "pss_over_manager_rss": total_pss / manager_rss,
        "manager_pid": manager,
        "processes": processes,
    }


# --- 5. respawn -------------------------------------------------------------------------------------


def respawn(
    ctx: Context,
    names: Sequence[str],
    workers: int,
    kills: int,
    rounds: int,
    min_age: float,
) -> dict[str, Any]:
    """SIGKILL an idle worker; time until its replacement waits for jobs (its idle title). Only
    workers older than ``min_age`` are killed: qless-pool treats a worker that dies within 5 s
    of its start as a crash loop and backs off before replacing it."""
    runs = []
    for round_index in range(rounds):
        for name in rotated(names, round_index):
            contender = CONTENDERS[name]
            directory = ctx.processes.new_directory(f"respawn-{name}")
            result = attempt(
                ctx,
                directory,
                functools.partial(_respawn_run, ctx, contender, workers, kills, min_age, directory),
            )
            runs.append({"round": round_index + 1, "contender": name, "workers": workers, **result})
            if "median_ms" in result:
                log(
                    f"  respawn     round {round_index + 1}/{rounds}  {name:<28} "
                    f"median {result['median_ms']:8.1f} ms over {len(result['times_ms'])} kills"
                )
    return {
        "params": {
            "workers": workers,
            "kills_per_round": kills,
            "rounds": rounds,
            "min_age_s": min_age,
        },
        "runs": runs,
    }


def _respawn_run(
    ctx: Context, contender: Contender, workers: int, kills: int, min_age: float, directory: str
) -> dict[str, Any]:
    ctx.redis.flush()
    launch = Launch(workers, ctx.redis.url(), directory)
    times = []
    with running(ctx, contender, launch) as run:
        run.wait_ready(workers, 60)
        for _ in range(kills):
            old_enough = wait_until(
                lambda: [p for p in run.ready() if age(p) >= min_age],
                min_age + 30,
                0.05,
                "a worker old enough to kill",
            )
            victim = max(old_enough, key=age)
            before = set(run.tree())
            started = time.perf_counter()
            os.kill(victim, signal.SIGKILL)
            wait_until(
                lambda before=before: run.new_ready(before),
                30,
                0.002,
                "a replacement",
            )
            times.append((time.perf_counter() - started) * 1000)
            wait_until(lambda victim=victim: not alive(victim), 10, 0.01, "the victim to go")
            run.wait_ready(workers, 30)
    return {
        "times_ms": times,
        "median_ms": percentile(times, 0.5),
        "min_ms": min(times),
        "max_ms": max(times),
    }


# --- 6. HUP -----------------------------------------------------------------------------------------


def hup(ctx: Context, names: Sequence[str], counts: Sequence[int], reps: int, rounds: int):
    """A pool with counts[0] workers gets a config with the other count and HUP, alternately;
    time until every new worker waits for jobs, and until every old one has exited."""
    runs = []
    for round_index in range(rounds):
        for name in rotated(names, round_index):
            contender = CONTENDERS[name]
            directory = ctx.processes.new_directory(f"hup-{name}")
            result = attempt(
                ctx, directory, functools.partial(_hup_run, ctx, contender, counts, reps, directory)
            )
            runs.append({"round": round_index + 1, "contender": name, **result})
            if "reloads" in result:
                middle = percentile([r["new_ready_ms"] for r in result["reloads"]], 0.5)
                log(
                    f"  HUP         round {round_index + 1}/{rounds}  {name:<28} "
                    f"median {middle:8.1f} ms to the new workers waiting"
                )
    return {"params": {"counts": list(counts), "reps": reps, "rounds": rounds}, "runs": runs}


def _hup_run(
    ctx: Context, contender: Contender, counts: Sequence[int], reps: int, directory: str
) -> dict[str, Any]:
    ctx.redis.flush()
    launch = Launch(counts[0], ctx.redis.url(), directory)
    config = os.path.join(directory, "qless-pool.yml")
    reloads = []
    with running(ctx, contender, launch) as run:
        run.wait_ready(counts[0], 60)
        current = counts[0]
        for _ in range(reps):
            new = counts[1] if current == counts[0] else counts[0]
            with open(config, "w") as file:
                file.write(f"{launch.queue}: {new}\n")
            old = set(run.tree()) - set(run.top)
            started = time.perf_counter()
            os.kill(run.top[0], signal.SIGHUP)
            wait_until(
                lambda old=old, new=new: len(run.new_ready(old)) >= new,
                30,
                0.002,
                f"{new} new workers",
            )
            new_ready = time.perf_counter() - started
            wait_until(
                lambda old=old: not any(alive(p) for p in old), 30, 0.002, "the old workers to exit"
            )
            old_gone = time.perf_counter() - started
            reloads.append(
                {
                    "from": current,
                    "to": new,
                    "new_ready_ms": new_ready * 1000,
                    "old_gone_ms": old_gone * 1000,
                }
            )
            current = new
    return {"reloads": reloads}


# --- 7. idle CPU --------------------------------------------------------------------------------------


def task_cpu_seconds(pid: int) -> float:
    """CPU time of every thread of ``pid`` so far, in seconds (nanosecond schedstat)."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as file:
                total += int(file.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return total / 1e9


def idle_cpu(
    ctx: Context, names: Sequence[str], workers: int, seconds: float, redis_binary: str
) -> dict[str, Any]:
    """Every contender idle with ``workers`` workers, side by side for ``seconds``, each against a
    redis-server of its own: the CPU its manager (the process that was started), its workers
    and its redis-server used meanwhile."""
    servers: dict[str, RedisServer] = {}
    stack = contextlib.ExitStack()
    runs = []
    with stack:
        started: dict[str, Running] = {}
        for name in names:
            server = stack.enter_context(RedisServer(redis_binary))
            servers[name] = server
            directory = ctx.processes.new_directory(f"idle-{name}")
            launch = Launch(workers, server.url(), directory)
            started[name] = stack.enter_context(running(ctx, CONTENDERS[name], launch))
        for run in started.values():
            run.wait_ready(workers, 60)
        time.sleep(2.0)
        before = {}
        for name, run in started.items():
            tree = run.tree()
            before[name] = (
                {pid: task_cpu_seconds(pid) for pid in tree},
                task_cpu_seconds(servers[name].process.pid),
            )
        began = time.monotonic()
        time.sleep(seconds)
        elapsed = time.monotonic() - began
        for name, run in started.items():
            tree = run.tree()
            cpu_before, redis_before = before[name]
            manager = run.top[0]
            used = {pid: task_cpu_seconds(pid) - cpu_before.get(pid, 0.0) for pid in tree}
            manager_cpu = used.get(manager, 0.0)
            worker_cpu = sum(v for pid, v in used.items() if pid != manager)
            redis_cpu = task_cpu_seconds(servers[name].process.pid) - redis_before
            runs.append(
                {
                    "contender": name,
                    "workers": workers,
                    "seconds": elapsed,
                    "manager_cpu_ms": manager_cpu * 1000,
                    "manager_cpu_percent": manager_cpu / elapsed * 100,
                    "workers_cpu_ms": worker_cpu * 1000,
                    "workers_cpu_percent": worker_cpu / elapsed * 100,
                    "redis_cpu_ms": redis_cpu * 1000,
                    "processes": len(tree),
                    "new_processes": len([p for p in tree if p not in cpu_before]),
                }
            )
            log(
                f"  idle CPU    {name:<28} manager {manager_cpu * 1000:7.1f} ms, workers "
                f"{worker_cpu * 1000:7.1f} ms, redis {redis_cpu * 1000:7.1f} ms in {elapsed:.0f} s"
            )
    return {"params": {"workers": workers, "seconds": seconds}, "runs": runs}


# --- 8. the fork floor --------------------------------------------------------------------------------


def fork_floor(ctx: Context, iterations: int, rounds: int) -> dict[str, Any]:
    """fork + exit + wait in a process the size of a qless-pool worker (fork_floor.py)."""
    runs = [fork_floor_round(ctx, iterations, round_index) for round_index in range(rounds)]
    return {"params": {"iterations": iterations, "rounds": rounds}, "runs": runs}


def fork_floor_round(
    ctx: Context, iterations: int, round_index: int, beside: str = ""
) -> dict[str, Any]:
    """One round of the fork floor (``beside``: the scenario it is taken in, for the directory)."""
    directory = ctx.processes.new_directory(f"{beside}-fork-floor" if beside else "fork-floor")
    result = attempt(ctx, directory, functools.partial(_fork_floor_run, ctx, iterations, directory))
    return {"round": round_index + 1, **result}


def _fork_floor_run(ctx: Context, iterations: int, directory: str) -> dict[str, Any]:
    ctx.redis.flush()
    command = [sys.executable, str(BENCH_DIR / "fork_floor.py"), ctx.redis.url(), str(iterations)]
    output = subprocess.run(
        command, cwd=directory, capture_output=True, text=True, timeout=300, check=True
    ).stdout
    result = json.loads(output.strip().splitlines()[-1])
    log(
        f"  fork floor  fork+exit+wait {result['bare_ms']['median']:.3f} ms, with a Redis "
        f"command {result['with_command_ms']['median']:.3f} ms (median of {iterations})"
    )
    return result


# --- 9. reload: new code without a stop ------------------------------------------------------------


RELOAD_METHODS = ("reload", "stop-and-start")


def reload(
    ctx: Context, names: Sequence[str], workers: int, import_cost: float, gap_ms: float,
    rounds: int,
) -> dict[str, Any]:  # fmt: skip
    """A pool of ``workers`` on a steady stream of jobs (one every ``gap_ms``), with an
    application whose import costs ``import_cost`` seconds of CPU, gets new code: by
    ``qless-pool reload``, and by the anchor every user has, a stop (QUIT, wait) and a start.
    Measured: the time until the new code serves every slot, the longest wait from put to start
    of the jobs put meanwhile, and the memory peak (the PSS of every process of the pool)."""
    runs = []
    for round_index in range(rounds):
        for name in names:
            for method in rotated(RELOAD_METHODS, round_index):
                directory = ctx.processes.new_directory(f"reload-{method}-{name}")
                result = attempt(ctx, directory, functools.partial(
                    _reload_run, ctx, CONTENDERS[name], method, workers, import_cost, gap_ms,
                    directory,
                ))  # fmt: skip
                runs.append({"round": round_index + 1, "contender": name, "method": method,
                             **result})  # fmt: skip
                if "serving_s" in result:
                    log(
                        f"  reload      round {round_index + 1}/{rounds}  {method:<15} "
                        f"{result['serving_s']:6.2f} s to serving, longest wait "
                        f"{result['max_wait_ms']:7.1f} ms, peak PSS {result['peak_pss_mb']:6.1f} MB"
                    )
    return {
        "params": {"workers": workers, "import_cost_s": import_cost, "gap_ms": gap_ms,
                   "rounds": rounds},
        "runs": runs,
    }  # fmt: skip


def _reload_run(
    ctx: Context, contender: Contender, method: str, workers: int, import_cost: float,
    gap_ms: float, directory: str,
) -> dict[str, Any]:  # fmt: skip
    import threading

    ctx.redis.flush()
    producer = Producer(contender.family, ctx.redis.url())
    connection = ctx.redis.connection()
    launch = Launch(workers, ctx.redis.url(), directory, preload=["benchheavy", "benchjobs"],
                    env={"BENCH_IMPORT_COST": str(import_cost)})  # fmt: skip
    stop = threading.Event()
    put = [0]

    def produce() -> None:
        while not stop.wait(gap_ms / 1000):
            producer.put("noop", 1, stamped=True)
            put[0] += 1

    with running(ctx, contender, launch) as run:
        run.wait_ready(workers, 120)
        idle_pss = _pss(run.top)
        peak = [idle_pss]

        def watch_memory() -> None:
            while not stop.wait(0.1):
                peak[0] = max(peak[0], _pss(run.top))

        threads = [threading.Thread(target=produce), threading.Thread(target=watch_memory)]
        for thread in threads:
            thread.start()
        try:
            time.sleep(1.0)  # the stream, before
            started = time.perf_counter()
            if method == "reload":
                command = [sys.executable, "-m", "qless_pool", "reload", "--pid", str(run.top[0])]
                done = subprocess.run(command, cwd=directory, capture_output=True, text=True,
                                      timeout=300)  # fmt: skip
                if done.returncode:
                    raise RuntimeError(f"qless-pool reload: {done.stderr.strip()}")
            else:
                os.kill(run.top[0], signal.SIGQUIT)
                run.processes[0].wait(timeout=120)
                again = ctx.processes.launch(contender.commands(launch)[0], directory,
                                             contender.environment(launch))  # fmt: skip
                run.processes.append(again)
                run.top = [again.pid]
                run.wait_ready(workers, 120, 0.01)
            serving = time.perf_counter() - started
            time.sleep(1.0)  # and after
        finally:
            stop.set()
            for thread in threads:
                thread.join()
        wait_until(lambda: connection.llen(benchjobs.STARTS) >= put[0], 60, 0.01,
                   f"{put[0]} jobs to start")  # fmt: skip
    waits = sorted((r[0] - r[3]) * 1000 for r in benchjobs.read_starts(connection))
    return {
        "serving_s": serving,
        "jobs": len(waits),
        "max_wait_ms": waits[-1],
        "p50_wait_ms": percentile(waits, 0.5),
        "p99_wait_ms": percentile(waits, 0.99),
        "idle_pss_mb": idle_pss,
        "peak_pss_mb": peak[0],
    }


def _pss(tops: Sequence[int]) -> float:
    """The PSS of every process of the pool, in MB."""
    return sum(smaps_rollup(pid).get("Pss", 0) for pid in descendants(tops)) / MB
