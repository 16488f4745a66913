"""Prometheus metrics (the optional extra: ``pip install 'qless-pool[metrics]'``).

``--metrics-port PORT`` (and ``--metrics-address ADDR``, default 127.0.0.1): the manager binds
the port at start, and a helper process it forks serves ``/metrics`` on it. The manager itself
stays Redis-free and thread-free; the helper dies with it.

- ``qless_pool_jobs_total{queue, outcome}`` and ``qless_pool_job_duration_seconds{queue}``: counted
  by each worker parent for the jobs it runs (a job child's run is reported to its parent, so job
  children write nothing), in prometheus_client's multiprocess mode: every worker writes its own
  file and the helper adds them up at scrape time. The files of workers that have exited are
  folded into one file per metric type, so that recycled workers do not pile files up.
- ``qless_pool_workers{state}``, ``qless_pool_worker_restarts_total{reason}``,
  ``qless_pool_workers_wanted{queues}`` and ``qless_pool_scale_events_total{queues,
  direction}`` (a range group's steps): read from the pool's state files (state.py) at scrape
  time.
- ``qless_pool_queue_jobs{queue, state}``: qless's counts, read from Redis at scrape time, and
  ``qless_pool_failed_jobs{group}``: its failed jobs by failure group (every group in qless).

The helper gives each connection a thread (a client that sends nothing is dropped after
CLIENT_TIMEOUT, and holds up no other) and makes one scrape at a time. A multiprocess file it
cannot read is left out with a warning, not the whole scrape.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import json
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections import Counter as Tally
from collections.abc import Iterable, Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional

from .. import lifeline
from ..logs import logger

__all__ = ["JobMeter", "MetricsError", "bind", "discard", "prepare", "serve"]

log = logger.getChild("metrics")

MULTIPROC_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, float("inf"))
QUEUE_STATES = ("waiting", "running", "scheduled", "stalled", "depends", "recurring")
#: Seconds a scraper may take to send its request, or to read the answer.
CLIENT_TIMEOUT = 10.0
#: What prometheus_client maps of a new file (its _INITIAL_MMAP_SIZE): room for a few hundred
#: series, far more than a worker's job metrics.
FILE_ALLOCATION = 64 * 1024
WORKER_STATES = ("starting", "waiting", "processing", "paused", "stopping", "retiring", "unknown")


class MetricsError(Exception):
    """Metrics asked for and not possible (the extra is not installed, the port is taken)."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


def available() -> bool:
    # Not imported here: prometheus_client picks its mode when first imported, and that must
    # come after prepare().
    try:
        return importlib.util.find_spec("prometheus_client") is not None
    except ValueError:  # in sys.modules as None: blocked
        return False


def require() -> None:
    if not available():
        raise MetricsError(
            "--metrics-port needs prometheus_client: pip install 'qless-pool[metrics]'", 2
        )


def prepare(base: Optional[str] = None) -> str:
    """Make the multiprocess directory and point $PROMETHEUS_MULTIPROC_DIR at it (before the
    application is loaded: prometheus_client decides its mode when first imported). A directory
    the environment already names (the application's own) is used as it is."""
    if os.environ.get(MULTIPROC_VARIABLE):
        return os.environ[MULTIPROC_VARIABLE]
    from .state import private_base

    directory = tempfile.mkdtemp(prefix="metrics-", dir=base or private_base())
    os.environ[MULTIPROC_VARIABLE] = directory
    return directory


def discard(directory: str) -> None:
    """Remove the multiprocess directory, if prepare() made it."""
    from .state import private_base

    if os.path.dirname(directory) == private_base():
        shutil.rmtree(directory, ignore_errors=True)


def restore() -> None:
    """Make the multiprocess directory again if prepare() made it and it is gone."""
    from .state import private_base

    directory = os.environ.get(MULTIPROC_VARIABLE)
    if directory and os.path.dirname(directory) == private_base():
        with contextlib.suppress(FileExistsError):
            os.mkdir(directory, 0o700)


def bind(address: str, port: int) -> socket.socket:
    """The listening socket, bound by the manager at start so that a taken port fails it."""
    try:
        infos = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM)
        family, kind, proto, _, where = infos[0]
        listener = socket.socket(family, kind, proto)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(where)
        listener.listen(16)
    except OSError as error:
        raise MetricsError(
            f"cannot serve metrics on {address}:{port}: {error.strerror or error}", 69
        ) from None
    listener.set_inheritable(False)
    return listener


class JobMeter:
    """A worker parent's job counts (multiprocess mode: written to its own file)."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Histogram

        # Not registered: the application may have a registry of its own; the files are what
        # the helper reads.
        self.jobs = Counter(
            "qless_pool_jobs_total",
            "Jobs run by the pool's workers, by queue and outcome",
            ["queue", "outcome"],
            registry=None,
        )
        self.duration = Histogram(
            "qless_pool_job_duration_seconds",
            "How long the pool's jobs ran, by queue",
            ["queue"],
            buckets=BUCKETS,
            registry=None,
        )
        self._failed = False  # said so, until counting works again
        self._allocated = False

    def finished(self, queue: str, outcome: str, seconds: float) -> None:
        # Best effort: the multiprocess directory may be gone (removed with the pool's state
        # directory) or full; a job's count is not worth the worker.
        try:
            if not self._allocated:
                directory = os.environ[MULTIPROC_VARIABLE]
                for kind in ("counter", "histogram"):  # prometheus_client's names for them
                    allocate(os.path.join(directory, f"{kind}_{os.getpid()}.db"))
                self._allocated = True
            self.jobs.labels(queue, outcome).inc()
            self.duration.labels(queue).observe(seconds)
        except OSError as error:
            if not self._failed:
                log.warning("cannot count jobs for the metrics: %s", error)
                self._failed = True
        else:
            self._failed = False


def allocate(path: str) -> None:
    """Make sure ``path`` has blocks for all its bytes, at least FILE_ALLOCATION (raises OSError).

    prometheus_client maps its files after growing them with truncate, which allocates nothing:
    on a full tmpfs (Docker's /dev/shm is 64 MB) the first write through the map would kill the
    process with SIGBUS. Allocated first, the file is full size and the map never faults.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        if hasattr(os, "posix_fallocate"):  # not on macOS
            os.posix_fallocate(fd, 0, max(FILE_ALLOCATION, os.fstat(fd).st_size))
    except OSError:
        if os.fstat(fd).st_size == 0:  # an empty file would read as corrupt
            with contextlib.suppress(OSError):
                os.unlink(path)
        raise
    finally:
        os.close(fd)


# --- the helper process -------------------------------------------------------------------------


def serve(listener: socket.socket, pool_directory: str, redis_url: str) -> int:
    """The metrics helper's body: serve /metrics until the manager is gone (it dies with it)."""
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    registry.register(JobCollector(os.environ[MULTIPROC_VARIABLE]))
    registry.register(PoolCollector(pool_directory, redis_url))
    # One scrape at a time: two could fold the same exited worker's file twice.
    scraping = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        # A client that sends nothing (or reads nothing) is dropped after this long; it has a
        # thread of its own meanwhile, so it never holds up the next scrape.
        timeout = CLIENT_TIMEOUT

        def do_GET(self) -> None:
            if self.path.split("?")[0] != "/metrics":
                self.send_error(404)
                return
            with scraping:
                body = generate_latest(registry)
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("%s %s", self.address_string(), format % args)

    server = ThreadingHTTPServer(listener.getsockname()[:2], Handler, bind_and_activate=False)
    server.daemon_threads = True  # (its default): a stuck client never delays an exit
    server.socket.close()
    server.socket = listener
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    server.serve_forever()
    return 0


class JobCollector:
    """The workers' job counts, from their multiprocess files, read at scrape time.

    prometheus_client's MultiProcessCollector fails the whole scrape for one file it cannot
    read, and refuses a directory that is not there. Here a file that cannot be read (corrupt:
    a disk error, a process killed while it grew the file, a stray file) is left out, with a
    warning once; a directory that is gone (removed with the pool's state directory, until the
    manager makes it again) serves the other metrics meanwhile.
    """

    def __init__(self, directory: str):
        self.directory = directory
        self.missing = False  # said so
        self.unreadable: set[str] = set()  # said so
        self.fold_problem: Optional[str] = None  # said so

    def collect(self) -> Iterable[Any]:
        from prometheus_client.multiprocess import MultiProcessCollector

        if not os.path.isdir(self.directory):
            if not self.missing:
                log.warning("%s is gone: no job metrics until it is back", self.directory)
                self.missing = True
            return ()
        self.missing = False
        problem = fold_dead_processes(self.directory)
        if problem and problem != self.fold_problem:
            log.warning("%s", problem)
        self.fold_problem = problem
        files = glob.glob(os.path.join(self.directory, "*.db"))
        try:
            return MultiProcessCollector.merge(files, accumulate=True)
        except Exception:  # one of them: find it, leave it out
            return MultiProcessCollector.merge([f for f in files if self._readable(f)])

    def _readable(self, path: str) -> bool:
        problem = unreadable(path)
        if problem is None:
            self.unreadable.discard(path)
            return True
        if path not in self.unreadable and os.path.exists(path):
            log.warning("leaving %s out of the job metrics: %s", path, problem)
        self.unreadable.add(path)
        return False


def unreadable(path: str) -> Optional[str]:
    """Why prometheus_client cannot read the multiprocess file ``path``, or None if it can."""
    from prometheus_client.multiprocess import MultiProcessCollector

    try:
        MultiProcessCollector.merge([path], accumulate=True)
    except Exception as error:  # whatever a broken file makes it raise
        return f"{type(error).__name__}: {error}"
    return None


class PoolCollector:
    """The workers by state, the restarts, and the queues' counts, read at scrape time."""

    def __init__(self, pool_directory: str, redis_url: str):
        self.directory = pool_directory
        self.redis_url = redis_url
        self.client: Any = None

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        from .state import read_manager, read_worker, worker_state

        manager = read_manager(self.directory) or {}
        states: Tally[str] = Tally({state: 0 for state in WORKER_STATES})
        now = time.time()
        for worker in manager.get("workers", []):
            record = read_worker(os.path.join(self.directory, f"worker-{worker['pid']}"))
            retiring = worker.get("retiring")
            states["retiring" if retiring else worker_state(record, worker["started"], now)] += 1
        workers = GaugeMetricFamily(
            "qless_pool_workers", "The pool's worker parents, by state", labels=["state"]
        )
        for state, count in states.items():
            workers.add_metric([state], count)
        yield workers
        restarts = CounterMetricFamily(
            "qless_pool_worker_restarts",
            "Worker parents replaced, by reason: died, recycled, reload",
            labels=["reason"],
        )
        for reason, count in (manager.get("restarts") or {}).items():
            restarts.add_metric([reason], count)
        yield restarts
        yield from _scaling_metrics(manager)
        counts, groups = self._from_redis(manager)
        queues = GaugeMetricFamily(
            "qless_pool_queue_jobs", "qless's jobs of the pool's queues, by state",
            labels=["queue", "state"],
        )  # fmt: skip
        for queue, by_state in counts.items():
            for state in QUEUE_STATES:
                queues.add_metric([queue, state], by_state.get(state, 0))
        yield queues
        failed = GaugeMetricFamily(
            "qless_pool_failed_jobs", "qless's failed jobs, by failure group", labels=["group"]
        )
        for group, count in groups.items():
            failed.add_metric([group], count)
        yield failed

    def _from_redis(
        self, manager: dict[str, Any]
    ) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
        """The pool's queues' counts by state, and every failure group's count (in qless,
        groups are not per pool: a queue's jobs fail as ``<queue>-<Exception>`` by default)."""
        from .state import configured_queues

        names = configured_queues(manager)
        try:
            if self.client is None:
                from ..client import control_client

                self.client = control_client(self.redis_url, "metrics")
            counts = {name: json.loads(self.client("queues", name)) for name in names}
            return counts, dict(json.loads(self.client("failed")) or {})
        except Exception as error:  # Redis away: the other metrics are still worth serving
            log.warning("cannot read the queues and failed jobs: %s", error)
            self.client = None
            return {}, {}


def _scaling_metrics(manager: dict[str, Any]) -> Iterator[Any]:
    """Every group's wanted count (a range: what it wants now) and the range groups' scale
    events, from the manager's state."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    wanted = GaugeMetricFamily(
        "qless_pool_workers_wanted", "The workers the pool keeps for a queue list now (a range: "
        "where the scaler has it)", labels=["queues"],
    )  # fmt: skip
    events = CounterMetricFamily(
        "qless_pool_scale_events", "A range group's steps: up (workers added) and down (an idle "
        "worker retired)", labels=["queues", "direction"],
    )  # fmt: skip
    for group in manager.get("groups", []):
        queues = ",".join(group["queues"])
        wanted.add_metric([queues], group.get("desired", 0))
        scaling = group.get("scaling")
        if scaling:
            events.add_metric([queues, "up"], scaling.get("ups", 0))
            events.add_metric([queues, "down"], scaling.get("downs", 0))
    yield wanted
    yield events


def fold_dead_processes(directory: str, alive: Optional[Sequence[int]] = None) -> Optional[str]:
    """Fold the files of exited processes into ``<type>_archive.db``: their counts stay, and the
    number of files stays bounded however often workers are recycled.

    A file that cannot be read is renamed ``*.db.broken`` (kept to look at, no longer read) with
    a warning, whether it is an exited process's or the archive itself. If the archive cannot be
    written (a full tmpfs) the files stay as they are, to be folded at a later scrape, and the
    reason is returned (None: all folded).
    """
    from prometheus_client.mmap_dict import MmapedDict

    for path in glob.glob(os.path.join(directory, "*.db")):
        kind, _, rest = os.path.basename(path)[:-3].partition("_")
        if kind not in ("counter", "histogram") or not rest.isdigit():
            continue
        pid = int(rest)
        if (pid in alive) if alive is not None else lifeline.alive(pid):
            continue
        if _set_aside_if_broken(path):
            continue
        archive_path = os.path.join(directory, f"{kind}_archive.db")
        if os.path.exists(archive_path):
            _set_aside_if_broken(archive_path)  # then a new archive, from here on
        try:
            allocate(archive_path)
            archive = MmapedDict(archive_path)
        except OSError as error:
            return f"cannot fold the files of exited workers into {archive_path}: {error}"
        try:
            for key, value, timestamp, _ in MmapedDict.read_all_values_from_file(path):
                old, _ = archive.read_value(key)
                archive.write_value(key, old + value, timestamp)
        finally:
            archive.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    return None


def _set_aside_if_broken(path: str) -> bool:
    problem = unreadable(path)
    if problem is None:
        return False
    log.warning("%s cannot be read (%s); renamed %s.broken", path, problem, path)
    with contextlib.suppress(OSError):
        os.rename(path, f"{path}.broken")
    return True
