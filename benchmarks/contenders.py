"""The contenders: how each one is started, how it is given jobs, and how to tell that one of its
workers is up and waiting for a job.

Every contender is started as its users start it, from its own command line, with the same job
code (benchjobs.py), against the same redis-server, with the same number of workers; where a
contender has a way to load the application once before forking its workers, it is used.
Logging is at WARNING where the contender logs more by default (qless-pool, rq; qless-py and
reqless log nothing below FATAL unless asked), so that no contender is measured writing logs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Optional

import redis
from harness import BENCH_DIR
from qless_py_worker import installed_script

PYTHON = sys.executable
QUEUE = "bench"

#: The idle title of each family's worker once it has looked for a job and is waiting.
POOL_READY = re.compile(r"^qless-[\w.+-]+: Waiting for ")
QLESS_PY_READY = re.compile(r"^qless-py-worker Sleeping for ")
REQLESS_READY = re.compile(r"^reqless-py-worker Sleeping for ")
RQ_READY = re.compile(r"^rq:worker:\S+: Listening on ")
FLOOR_LISTEN_READY = re.compile(r"^floor-listen: ready")


@dataclass
class Launch:
    """What a scenario asks of a contender."""

    workers: int
    url: str
    directory: str
    #: The application: module names, loaded before forking where the contender can.
    preload: Sequence[str] = ("benchjobs",)
    #: Seconds between polls of an idle worker; None: the contender's default.
    interval: Optional[float] = None
    env: dict[str, str] = field(default_factory=dict)
    queue: str = QUEUE


@dataclass(frozen=True)
class Contender:
    name: str
    family: str  # whose jobs it runs: "qless", "reqless" or "rq"
    summary: str
    #: Where a job runs: "worker" (in the worker process) or "child" (a process forked per job).
    jobs_run_in: str
    #: The title of a worker that is up and waiting for a job (None: it sets no title).
    ready: Optional[re.Pattern]
    #: Its default idle poll interval in seconds (None: it blocks on Redis and does not poll).
    default_interval: Optional[float]
    commands: Callable[[Launch], list[list[str]]]
    #: Extra environment for its processes.
    extra_env: Callable[[Launch], dict[str, str]] = lambda launch: {}
    #: Whether it takes an idle poll interval at all (rq blocks instead).
    polls: bool = True

    @property
    def requires(self) -> str:
        """The package it needs installed (the bench extra installs them all)."""
        return {"qless": "qless", "reqless": "reqless", "rq": "rq"}[self.family]

    def available(self) -> bool:
        return importlib.util.find_spec(self.requires) is not None

    def environment(self, launch: Launch) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("QLESS_URL", None)
        env.pop("REDIS_URL", None)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(BENCH_DIR), *filter(None, [env.get("PYTHONPATH")])]
        )
        env["BENCH_PRELOAD"] = ",".join(launch.preload)
        env.update(launch.env)
        env.update(self.extra_env(launch))
        return env


# --- command lines ----------------------------------------------------------------------------------


def _pool_options(launch: Launch, preload: Sequence[str], in_process: bool) -> list[str]:
    config = os.path.join(launch.directory, "qless-pool.yml")
    with open(config, "w") as file:
        file.write(f"{launch.queue}: {launch.workers}\n")
    options = ["-c", config, "-R", launch.url, "-a", "bench", "--log-level", "WARNING"]
    for module in preload:
        options += ["-m", module]
    if launch.interval is not None:
        options += ["-i", f"{launch.interval:g}"]
    if in_process:
        options.append("--no-fork-per-job")
    return options


def pool(in_process: bool) -> Callable[[Launch], list[list[str]]]:
    def commands(launch: Launch) -> list[list[str]]:
        return [[PYTHON, "-m", "qless_pool", *_pool_options(launch, launch.preload, in_process)]]

    return commands


def pool_without_freeze(in_process: bool) -> Callable[[Launch], list[list[str]]]:
    def commands(launch: Launch) -> list[list[str]]:
        script = str(BENCH_DIR / "pool_nofreeze.py")
        return [[PYTHON, script, *_pool_options(launch, launch.preload, in_process)]]

    return commands


def pool_without_preload(in_process: bool) -> Callable[[Launch], list[list[str]]]:
    def commands(launch: Launch) -> list[list[str]]:
        return [
            [PYTHON, "-m", "qless_pool", *_pool_options(launch, ["benchworkerload"], in_process)]
        ]

    return commands


def independent_workers(launch: Launch) -> list[list[str]]:
    script = str(BENCH_DIR / "independent_worker.py")
    interval = [f"{launch.interval:g}"] if launch.interval is not None else []
    return [[PYTHON, script, launch.url, launch.queue, *interval] for _ in range(launch.workers)]


def _worker_script_options(launch: Launch) -> list[str]:
    options = ["--host", launch.url, "-w", str(launch.workers), "-q", launch.queue]
    for module in launch.preload:
        options += ["-m", module]
    if launch.interval is not None:
        if launch.interval != int(launch.interval):
            raise ValueError("qless-py-worker and reqless-py-worker take whole seconds only")
        options += ["-i", str(int(launch.interval))]
    return options


def qless_py_worker(launch: Launch) -> list[list[str]]:
    return [[PYTHON, str(BENCH_DIR / "qless_py_worker.py"), *_worker_script_options(launch)]]


def reqless_py_worker(launch: Launch) -> list[list[str]]:
    script = installed_script("reqless", "reqless-py-worker")
    return [[PYTHON, script, *_worker_script_options(launch)]]


def rq_pool(worker_class: Optional[str]) -> Callable[[Launch], list[list[str]]]:
    def commands(launch: Launch) -> list[list[str]]:
        command = [PYTHON, "-m", "rq.cli", "worker-pool", "-u", launch.url]
        command += ["-n", str(launch.workers), "-q", "-c", "benchrq"]
        if worker_class:
            command += ["-w", worker_class]
        return [[*command, launch.queue]]

    return commands


def floor(launch: Launch) -> list[list[str]]:
    script = str(BENCH_DIR / "floor_worker.py")
    return [[PYTHON, script, launch.url, launch.queue] for _ in range(launch.workers)]


def floor_batch(launch: Launch) -> list[list[str]]:
    script = str(BENCH_DIR / "floor_batch_worker.py")
    return [[PYTHON, script, launch.url, launch.queue] for _ in range(launch.workers)]


def floor_fork(launch: Launch) -> list[list[str]]:
    script = str(BENCH_DIR / "floor_fork_worker.py")
    return [[PYTHON, script, launch.url, launch.queue] for _ in range(launch.workers)]


def floor_listen(fork: bool) -> Callable[[Launch], list[list[str]]]:
    def commands(launch: Launch) -> list[list[str]]:
        argv = [PYTHON, str(BENCH_DIR / "floor_listen_worker.py"), launch.url, launch.queue]
        return [argv + (["--fork"] if fork else []) for _ in range(launch.workers)]

    return commands


def _worker_load(launch: Launch) -> dict[str, str]:
    return {"BENCH_WORKER_LOAD": ",".join(launch.preload), "BENCH_PRELOAD": ""}


CONTENDERS: dict[str, Contender] = {
    c.name: c
    for c in [
        Contender(
            "qless-pool-fork",
            "qless",
            "qless-pool, a job child forked per job (the default); app preloaded (-m)",
            "child",
            POOL_READY,
            5.0,
            pool(in_process=False),
        ),
        Contender(
            "qless-pool-inproc",
            "qless",
            "qless-pool --no-fork-per-job (jobs run in the worker); app preloaded (-m)",
            "worker",
            POOL_READY,
            5.0,
            pool(in_process=True),
        ),
        Contender(
            "qless-py-worker",
            "qless",
            "qless-py 0.11.4's qless-py-worker (ForkingWorker of SerialWorkers, jobs in the "
            "worker); app imported first (-m); run through benchmarks/qless_py_worker.py "
            "(patch_qless)",
            "worker",
            QLESS_PY_READY,
            60.0,
            qless_py_worker,
        ),
        Contender(
            "reqless-py-worker",
            "reqless",
            "reqless's reqless-py-worker (ForkingWorker of SerialWorkers, jobs in the worker); "
            "app imported first (-m)",
            "worker",
            REQLESS_READY,
            60.0,
            reqless_py_worker,
        ),
        Contender(
            "rq-fork",
            "rq",
            "rq worker-pool with rq's default Worker (a work horse forked per job); app "
            "imported by the pool's parent (-c settings module)",
            "child",
            RQ_READY,
            None,
            rq_pool(None),
            polls=False,
        ),
        Contender(
            "rq-simple",
            "rq",
            "rq worker-pool -w rq.worker.SimpleWorker (jobs in the worker); app imported by the "
            "pool's parent (-c settings module)",
            "worker",
            RQ_READY,
            None,
            rq_pool("rq.worker.SimpleWorker"),
            polls=False,
        ),
        Contender(
            "floor",
            "qless",
            "N plain processes looping qless pop + complete, no framework (floor_worker.py)",
            "worker",
            None,
            None,
            floor,
            polls=False,
        ),
        Contender(
            "floor-batch",
            "qless",
            "N plain processes looping qless pop of up to 32 jobs with the last batch's "
            "completes in one call, each job with qless-py's Job.process; no framework "
            "(floor_batch_worker.py)",
            "worker",
            None,
            None,
            floor_batch,
            polls=False,
        ),
        Contender(
            "floor-fork",
            "qless",
            "N plain processes looping qless pop, fork, the job in the child (qless-py's "
            "Job.process, a connection of its own), wait; no framework (floor_fork_worker.py)",
            "child",
            None,
            None,
            floor_fork,
            polls=False,
        ),
        Contender(
            "floor-listen",
            "qless",
            "N plain processes listening on qless's ql:log, each put's job popped and run in "
            "the process with qless-py's Job.process; no framework (floor_listen_worker.py)",
            "worker",
            FLOOR_LISTEN_READY,
            None,
            floor_listen(fork=False),
            polls=False,
        ),
        Contender(
            "floor-listen-fork",
            "qless",
            "floor-listen with each job handed to a standby child forked ahead (over a pipe; "
            "its own connection), which runs it and exits (floor_listen_worker.py --fork)",
            "child",
            FLOOR_LISTEN_READY,
            None,
            floor_listen(fork=True),
            polls=False,
        ),
        Contender(
            "qless-pool-independent",
            "qless",
            "N qless-pool workers (qless_pool.worker.Worker) started as separate processes, "
            "each importing the app itself (independent_worker.py); no pool",
            "child",
            POOL_READY,
            5.0,
            independent_workers,
        ),
        Contender(
            "qless-pool-fork-nofreeze",
            "qless",
            "qless-pool, fork per job, app preloaded without gc.freeze (pool_nofreeze.py)",
            "child",
            POOL_READY,
            5.0,
            pool_without_freeze(in_process=False),
        ),
        Contender(
            "qless-pool-inproc-nofreeze",
            "qless",
            "qless-pool --no-fork-per-job, app preloaded without gc.freeze (pool_nofreeze.py)",
            "worker",
            POOL_READY,
            5.0,
            pool_without_freeze(in_process=True),
        ),
        Contender(
            "qless-pool-fork-nopreload",
            "qless",
            "qless-pool, fork per job, app loaded in each worker after the fork "
            "(an after_prefork hook, benchworkerload.py), not in the manager",
            "child",
            POOL_READY,
            5.0,
            pool_without_preload(in_process=False),
            extra_env=_worker_load,
        ),
        Contender(
            "qless-pool-inproc-nopreload",
            "qless",
            "qless-pool --no-fork-per-job, app loaded in each worker after the fork",
            "worker",
            POOL_READY,
            5.0,
            pool_without_preload(in_process=True),
            extra_env=_worker_load,
        ),
    ]
}


# --- giving them jobs ---------------------------------------------------------------------------------


class Producer:
    """Puts jobs the way a family's client would, but many at a time through one pipeline."""

    #: Job class names (qless, reqless) or function paths (rq) per job kind.
    KINDS: ClassVar[dict[str, dict[str, str]]] = {
        "qless": {
            "noop": "benchjobs.NoOp",
            "quiet": "benchjobs.Quiet",
            "collect": "benchjobs.Collect",
        },
        "reqless": {
            "noop": "benchjobs.NoOp",
            "quiet": "benchjobs.Quiet",
            "collect": "benchjobs.Collect",
        },
        "rq": {"noop": "benchjobs.rq_noop", "collect": "benchjobs.rq_collect"},
    }

    def __init__(self, family: str, url: str, queue: str = QUEUE):
        self.family = family
        self.queue = queue
        self.connection = redis.Redis.from_url(url, decode_responses=True)
        self._sha: Optional[str] = None
        if family == "qless":
            from qless_pool.client import fixed_script

            self._sha = self.connection.script_load(fixed_script())
        elif family == "reqless":
            import pkgutil

            script = pkgutil.get_data("reqless", "lua/qless.lua")
            assert script is not None
            self._sha = self.connection.script_load(script.decode())
        elif family == "rq":
            from rq import Queue

            self._rq_queue = Queue(queue, connection=redis.Redis.from_url(url))
        else:
            raise ValueError(family)

    def put(self, kind: str, count: int = 1, stamped: bool = False, batch: int = 500) -> None:
        """Put ``count`` jobs; ``stamped``: each carries the time it was put (pickup latency),
        and they go one at a time, each its own round trip."""
        target = self.KINDS[self.family][kind]
        if self.family == "rq":
            self._put_rq(target, count, stamped, batch)
            return
        done = 0
        while done < count:
            size = 1 if stamped else min(batch, count - done)
            pipe = self.connection.pipeline(transaction=False)
            for _ in range(size):
                data = json.dumps({"t": time.time()} if stamped else {})
                who = ["bench-producer"] if self.family == "reqless" else []
                args = [self.queue, uuid.uuid4().hex, target, data, 0, "priority", 0]
                args += ["tags", "[]", "retries", 5, "depends", "[]"]
                if self.family == "reqless":
                    args += ["throttles", "[]"]
                # qless-py 0.11.4: put QUEUE JID ...; reqless: put WORKER QUEUE JID ...
                pipe.evalsha(self._sha, 0, "put", repr(time.time()), *who, *args)
            pipe.execute()
            done += size

    def _put_rq(self, target: str, count: int, stamped: bool, batch: int) -> None:
        from rq import Queue

        if stamped:
            for _ in range(count):
                self._rq_queue.enqueue(target, time.time())
            return
        done = 0
        while done < count:
            size = min(batch, count - done)
            self._rq_queue.enqueue_many(
                [Queue.prepare_data(target, args=(0.0,)) for _ in range(size)]
            )
            done += size

    def completed(self) -> int:
        """How many jobs have completed (as the family's own bookkeeping says)."""
        if self.family == "rq":
            return self.connection.zcard(f"rq:finished:{self.queue}")
        return self.connection.zcard("ql:completed")

    def failed(self) -> int:
        if self.family == "rq":
            return self.connection.zcard(f"rq:failed:{self.queue}")
        groups = self.connection.smembers("ql:failures")
        return sum(self.connection.llen(f"ql:f:{group}") for group in groups)
