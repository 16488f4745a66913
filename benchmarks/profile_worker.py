"""Where a worker's time per job goes: one worker, in this process, on N queued no-op jobs.

    python benchmarks/profile_worker.py qless-pool-inproc [--jobs 5000] [--top 25]
    python benchmarks/profile_worker.py qless-py-worker
    python benchmarks/profile_worker.py qless-pool-fork --timeline
    python benchmarks/profile_worker.py qless-pool-fork --child-profile
    python benchmarks/profile_worker.py rq-fork --cpu

The worker runs here against a private redis-server, under cProfile (the default), so the
numbers are slower than a real run but comparable with each other:

- qless-pool-inproc, qless-pool-fork: ``qless_pool.worker.Worker(...).work()``
- qless-py-worker: qless-py's own ``SerialWorker(...).run()`` (what each of qless-py-worker's
  processes runs), after ``qless_pool.patch_qless()``
- reqless-py-worker: reqless's ``SerialWorker(...).run()``

``--timeline`` (fork per job) profiles nothing: it timestamps each job's way through the worker
parent and its child (CLOCK_MONOTONIC is shared by all processes) and prints the median of each
step. ``--child-profile`` runs cProfile inside every job child and adds the children up.
``--cpu`` profiles nothing either: it reads the CPU time (user and system) and the page faults
of the worker and of every child it forked and reaped (``getrusage``), and redis-server's CPU
time, per job. With a fork per job most of that is the kernel's (fork, copy-on-write faults,
exit), which cProfile does not see; when every core is busy, CPU per job is what sets the rate.
``rq-fork`` and ``rq-simple`` run rq's own ``Worker(...).work(burst=True)`` here.

This is a measuring tool: it wraps a few qless_pool functions in this process to take its
readings; qless-pool itself is not changed.
"""

from __future__ import annotations

import argparse
import atexit
import cProfile
import gc
import glob
import io
import json
import logging
import os
import pstats
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import benchjobs
from contenders import Producer
from harness import RedisServer, cpu_seconds, median, percentile

WATCHER = """
import os, signal, sys, time, redis
url, count, pid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
connection = redis.Redis.from_url(url)
while connection.zcard("ql:completed") < count:
    time.sleep(0.02)
os.kill(pid, signal.SIGQUIT)
"""


def watch(url: str, count: int) -> subprocess.Popen:
    """A process that sends us QUIT once ``count`` jobs have completed."""
    return subprocess.Popen([sys.executable, "-c", WATCHER, url, str(count), str(os.getpid())])


def make_worker(contender: str, url: str):
    if contender.startswith("qless-pool"):
        from qless_pool import logs
        from qless_pool.worker import Worker

        logs.configure("WARNING")
        worker = Worker(["bench"], url, fork_per_job=contender == "qless-pool-fork")
        # As in a pool: the manager preloaded the application and froze what it had loaded
        # (qless_pool.hooks.preload) before forking this worker.
        gc.freeze()
        return worker.work
    if contender == "qless-py-worker":
        import qless
        from qless.workers.serial import SerialWorker

        import qless_pool

        qless_pool.patch_qless()
        worker = SerialWorker(["bench"], qless.Client(url), interval=1)
        return worker.run
    if contender == "reqless-py-worker":
        import reqless
        from reqless.workers.serial import SerialWorker

        worker = SerialWorker(["bench"], reqless.Client(url), interval=1)
        return worker.run
    if contender == "floor-fork":
        import floor_fork_worker

        return lambda: floor_fork_worker.work(url, "bench")
    if contender in ("rq-fork", "rq-simple"):
        import redis
        from rq import SimpleWorker
        from rq import Worker as RqWorker

        cls = SimpleWorker if contender == "rq-simple" else RqWorker
        worker = cls(["bench"], connection=redis.Redis.from_url(url))
        logging.getLogger("rq.worker").setLevel(logging.WARNING)  # rq logs 2 lines a job
        return lambda: worker.work(burst=True, logging_level="WARNING")
    raise SystemExit(f"unknown contender {contender}")


def cpu_report(before: tuple, after: tuple, jobs: int) -> str:
    """CPU and page faults per job: the worker, its reaped children, redis-server."""
    (self0, children0, redis0), (self1, children1, redis1) = before, after
    lines = [f"{'per job':<28} {'user ms':>8} {'system ms':>10} {'faults':>8}"]
    total = redis1 - redis0
    for name, start, end in (("worker", self0, self1), ("its children", children0, children1)):
        user, system = (end.ru_utime - start.ru_utime), (end.ru_stime - start.ru_stime)
        total += user + system
        faults = end.ru_minflt - start.ru_minflt
        lines.append(
            f"{name:<28} {user / jobs * 1000:8.3f} {system / jobs * 1000:10.3f} "
            f"{faults / jobs:8.1f}"
        )
    lines.append(f"{'redis-server (user+system)':<28} {(redis1 - redis0) / jobs * 1000:19.3f}")
    lines.append(f"{'all of it':<28} {total / jobs * 1000:19.3f} ms a job ({jobs} jobs)")
    return "\n".join(lines)


def cpu_readings(redis_pid: int) -> tuple:
    return (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
        cpu_seconds(redis_pid),
    )


def instrument_timeline(directory: str) -> str:
    """Timestamp each step of a fork-per-job worker; returns the file the readings go to."""
    import qless_pool.worker as module
    import qless_pool.worker.jobchild as jobchild

    path = os.path.join(directory, "timeline")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)

    def note(*fields: object) -> None:
        os.write(fd, (" ".join(str(f) for f in fields) + "\n").encode())

    start = jobchild.Children.start
    finish_job = module.Worker._finish_job
    run_job = jobchild.run_job

    def _start(self, popped, *args, **kwargs):
        before = time.monotonic()
        child = start(self, popped, *args, **kwargs)
        note("fork", popped.job["jid"], before, time.monotonic())
        return child

    def _run_job(client, job, *args, **kwargs):
        started = time.monotonic()
        try:
            return run_job(client, job, *args, **kwargs)
        finally:
            note("child", job["jid"], started, time.monotonic())

    def _finish_job(self, run, *args, **kwargs):  # run: a worker/outcome.py JobRun
        note("reaped", run.job["jid"], time.monotonic())
        return finish_job(self, run, *args, **kwargs)

    jobchild.Children.start = _start
    module.Worker._finish_job = _finish_job
    jobchild.run_job = _run_job
    return path


def instrument_child_profile(directory: str) -> None:
    import qless_pool.worker.jobchild as jobchild

    run_job = jobchild.run_job

    def _run_job(client, job, *args, **kwargs):
        profile = cProfile.Profile()
        profile.enable()
        try:
            return run_job(client, job, *args, **kwargs)
        finally:
            profile.disable()
            profile.dump_stats(os.path.join(directory, f"child-{os.getpid()}.prof"))

    jobchild.run_job = _run_job


def timeline_report(path: str) -> str:
    forks, children, reaped = {}, {}, {}
    with open(path) as file:
        for line in file:
            kind, jid, *values = line.split()
            numbers = [float(v) for v in values]
            {"fork": forks, "child": children, "reaped": reaped}[kind][jid] = numbers
    order = sorted(forks, key=lambda jid: forks[jid][0])
    steps: dict[str, list[float]] = {
        "parent: hand the job to the standby (or fork)": [],
        "job handed over -> the child enters run_job": [],
        "child: run_job (Job.process, the job, complete)": [],
        "child leaves run_job -> parent has its report": [],
        "parent: report -> next job handed over": [],
        "whole cycle, job to next job": [],
    }
    names = list(steps)
    for this, following in zip(order, order[1:]):
        if this not in children or this not in reaped:
            continue
        fork_start, fork_end = forks[this]
        child_start, child_end = children[this]
        steps[names[0]].append(fork_end - fork_start)
        steps[names[1]].append(child_start - fork_start)
        steps[names[2]].append(child_end - child_start)
        steps[names[3]].append(reaped[this][0] - child_end)
        steps[names[4]].append(forks[following][0] - reaped[this][0])
        steps[names[5]].append(forks[following][0] - fork_start)
    lines = [f"{'step':<52} {'median ms':>10} {'p90 ms':>8}"]
    for name, values in steps.items():
        if values:
            lines.append(
                f"{name:<52} {median(values) * 1000:10.3f} {percentile(values, 0.9) * 1000:8.3f}"
            )
    lines.append(f"({len(steps[names[5]])} jobs)")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "contender",
        choices=[
            "qless-pool-inproc",
            "qless-pool-fork",
            "qless-py-worker",
            "reqless-py-worker",
            "rq-fork",
            "rq-simple",
            "floor-fork",
        ],
    )
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--sort", default="tottime", help="pstats sort key (default: tottime)")
    parser.add_argument("--timeline", action="store_true", help="fork per job: time each step")
    parser.add_argument("--child-profile", action="store_true", help="profile the job children")
    parser.add_argument(
        "--cpu", action="store_true", help="CPU and page faults per job, no profiler"
    )
    args = parser.parse_args()

    family = {"reqless-py-worker": "reqless", "rq-fork": "rq", "rq-simple": "rq"}.get(
        args.contender, "qless"
    )
    if family == "rq" and (args.timeline or args.child_profile):
        parser.error("--timeline and --child-profile are for qless-pool-fork")
    directory = tempfile.mkdtemp(prefix="qless-pool-profile-")
    atexit.register(shutil.rmtree, directory, True)  # the job children leave by os._exit
    with RedisServer() as server:
        Producer(family, server.url()).put("noop", args.jobs)
        work = make_worker(args.contender, server.url())
        timeline = instrument_timeline(directory) if args.timeline else None
        if args.child_profile:
            instrument_child_profile(directory)
        profiled = not (args.timeline or args.child_profile or args.cpu)
        profile = cProfile.Profile() if profiled else None
        # rq's burst worker stops by itself once the queue is empty.
        watcher = watch(server.url(), args.jobs) if family != "rq" else None
        readings = cpu_readings(server.process.pid)
        signal.signal(signal.SIGQUIT, signal.default_int_handler)  # qless-py's own handler below
        started = time.perf_counter()
        try:
            if profile:
                profile.enable()
            work()
        except KeyboardInterrupt:
            pass
        finally:
            if profile:
                profile.disable()
            elapsed = time.perf_counter() - started
            readings = (readings, cpu_readings(server.process.pid))
            if watcher is not None:
                watcher.kill()
                watcher.wait()
        done = server.connection().zcard("rq:finished:bench" if family == "rq" else "ql:completed")
        starts = sorted(r[0] for r in benchjobs.read_starts(server.connection()))
    print(
        json.dumps(
            {
                "contender": args.contender,
                "jobs": done,
                "seconds": round(elapsed, 3),
                # first job start to last (the worker may idle a while before it sees QUIT)
                "jobs_per_s": round((len(starts) - 1) / (starts[-1] - starts[0]), 1),
                "profiled": "timeline"
                if args.timeline
                else "children"
                if args.child_profile
                else "rusage"
                if args.cpu
                else "cProfile",
            }
        )
    )
    if timeline:
        print(timeline_report(timeline))
    if args.cpu:
        print(cpu_report(*readings, done))
    stats_source = None
    if profile:
        stats_source = [profile]
    elif args.child_profile:
        stats_source = sorted(glob.glob(os.path.join(directory, "child-*.prof")))
    if stats_source:
        output = io.StringIO()
        stats = pstats.Stats(*stats_source, stream=output)
        stats.files = [f"{len(stats_source)} profile(s)"]  # not one header line per child
        stats.strip_dirs().sort_stats(args.sort).print_stats(args.top)
        print(output.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
