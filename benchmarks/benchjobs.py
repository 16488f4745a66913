"""The job code every contender runs: the same functions, called the way each framework calls jobs.

Each job writes one record as it starts, with one Redis command on the connection the framework
gave it::

    RPUSH bench:starts "<time.time()> <pid> <ppid> <put time>"

so throughput, pickup latency and who ran what are read back from Redis afterwards. The *quiet*
jobs (``Quiet``) make no Redis command of their own: each appends the same record to the file
``$BENCH_STARTS_FILE`` names (the harness puts it in the contender's directory) instead. qless
(qless-pool, qless-py-worker, the floor) and reqless jobs complete themselves: qless-py's and
reqless's workers do not complete a job whose function returned (qless-pool would, but then the
job code would differ). rq jobs just return; rq records the result.

reqless hands a job its data as the JSON string it was put with; qless-py as the decoded object.
"""

from __future__ import annotations

import gc
import json
import os
import time

STARTS = "bench:starts"


def mark(connection, put_time: float = 0.0) -> None:
    """Record that a job started, now, in this process."""
    connection.rpush(STARTS, f"{time.time():.6f} {os.getpid()} {os.getppid()} {put_time:.6f}")


def put_time(data) -> float:
    """The time the harness put the job, if it said (pickup latency); else 0."""
    if isinstance(data, str):  # reqless
        data = json.loads(data) if data else {}
    if isinstance(data, dict):
        return float(data.get("t", 0.0))
    return 0.0


#: The quiet jobs' records: the file's name in the contender's directory (the harness passes its
#: whole path in $BENCH_STARTS_FILE: qless-py's workers run jobs in a directory of their own).
STARTS_FILE = "starts.log"
_starts_file: dict[int, int] = {}  # pid -> fd: a forked child opens its own


def mark_quietly(put_time: float = 0.0) -> None:
    """Record that a job started without a Redis command: one line appended to STARTS_FILE."""
    pid = os.getpid()
    fd = _starts_file.get(pid)
    if fd is None:
        _starts_file.clear()
        path = os.environ.get("BENCH_STARTS_FILE", STARTS_FILE)
        fd = _starts_file[pid] = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.write(fd, f"{time.time():.6f} {pid} {os.getppid()} {put_time:.6f}\n".encode())


_collected_in: set[int] = set()


def collect_once() -> None:
    """A full collection, once per process: what a long-running worker does sooner or later, and
    what copies every preloaded object that is not frozen (its GC header is written)."""
    if os.getpid() not in _collected_in:
        _collected_in.add(os.getpid())
        gc.collect()


# --- qless-py, qless-pool, reqless ----------------------------------------------------------------


class NoOp:
    """Does nothing but record its start."""

    @staticmethod
    def process(job) -> None:
        mark(job.client.redis, put_time(job.data))
        job.complete()


class Quiet:
    """Records its start in a file, not in Redis: a job that makes no Redis command of its own
    (its complete() is qless's, as for NoOp)."""

    @staticmethod
    def process(job) -> None:
        mark_quietly(put_time(job.data))
        job.complete()


class Collect:
    """The memory scenario's job: a full collection on the first job a process runs."""

    @staticmethod
    def process(job) -> None:
        collect_once()
        mark(job.client.redis, put_time(job.data))
        job.complete()


# --- rq ---------------------------------------------------------------------------------------------


def rq_noop(t: float = 0.0) -> None:
    from rq import get_current_job

    mark(get_current_job().connection, t)


def rq_collect(t: float = 0.0) -> None:
    from rq import get_current_job

    collect_once()
    mark(get_current_job().connection, t)


def read_starts(connection) -> list[tuple[float, int, int, float]]:
    """Every record, as (start time, pid, ppid, put time)."""
    return [_record(line) for line in connection.lrange(STARTS, 0, -1)]


def read_start_file(path: str) -> list[tuple[float, int, int, float]]:
    """Every whole record of a quiet jobs' STARTS_FILE (the last line may be half written)."""
    try:
        with open(path) as file:
            lines = file.read().split("\n")[:-1]
    except FileNotFoundError:
        return []
    return [_record(line) for line in lines]


def _record(line: str) -> tuple[float, int, int, float]:
    started, pid, ppid, put = line.split()
    return float(started), int(pid), int(ppid), float(put)
