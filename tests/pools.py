"""Starting a real ``qless-pool`` for a test, as operators run it, and looking at it: the manager's
title, its worker parents, its log; its metrics."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from processes import children, kill_processes_in, kill_tree, reap_orphans, title, wait_for
from workers import TESTS, WAITING

SCRIPT = os.path.join(os.path.dirname(sys.executable), "qless-pool")
MANAGER = re.compile(
    r"^qless-pool-manager(\[[^\]]*\])?: managing \[([0-9, ]*)\]( retiring \[([0-9, ]*)\])?$"
)
README_CONFIG = """\
foo: 1
bar: 2
"foo,bar,baz": 1

production:
  "foo,bar,baz": 4
"""


@dataclass
class PoolProcess:
    process: subprocess.Popen
    directory: Path
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def title(self) -> str:
        return title(self.pid)

    def managed(self) -> list[int]:
        """The pids the manager's title lists (the retiring ones too)."""
        match = MANAGER.match(self.title())
        assert match, self.title()
        listed = f"{match.group(2)}, {match.group(4) or ''}"
        return [int(pid) for pid in listed.split(", ") if pid]

    def retiring(self) -> list[int]:
        match = MANAGER.match(self.title())
        assert match, self.title()
        return [int(pid) for pid in (match.group(4) or "").split(", ") if pid]

    def workers(self) -> list[int]:
        """The worker parents (not the drain watcher or the metrics helper)."""
        return [pid for pid in children(self.pid) if not title(pid).startswith("qless-pool-")]

    def worker_titles(self) -> dict[int, str]:
        return {pid: title(pid) for pid in self.workers()}

    def waiting(self) -> dict[str, int]:
        """How many workers wait on each queue list."""
        counts: dict[str, int] = {}
        for text in self.worker_titles().values():
            match = WAITING.match(text)
            if match:
                counts[match.group(1)] = counts.get(match.group(1), 0) + 1
        return counts

    def wait_for_workers(self, expected: dict[str, int], timeout: float = 15.0) -> list[int]:
        wait_for(lambda: self.waiting() == expected, timeout, message=f"workers {expected}")
        wait_for(lambda: sorted(self.managed()) == sorted(self.workers()), message="the title")
        return self.workers()

    def send(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def log_text(self) -> str:
        return self.log.read_text()

    def wait_log(self, text: str, count: int = 1, timeout: float = 10.0) -> None:
        wait_for(lambda: self.log_text().count(text) >= count, timeout, message=repr(text))


def launch(command: list[str], directory: Path, log: Path, env=None) -> PoolProcess:
    """Start ``command`` (a pool) in ``directory`` and a session of its own, its output to
    ``log``."""
    with open(log, "w") as output:
        process = subprocess.Popen(
            command, cwd=directory, stdin=subprocess.DEVNULL, stdout=output,
            stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
    return PoolProcess(process, Path(directory), log)


@pytest.fixture
def start_pool(redis_url, tmp_path):
    started: list[PoolProcess] = []

    def start(
        *args: str,
        config: str = README_CONFIG,
        env: dict[str, str] | None = None,
        url: str | None = None,
        expect: dict[str, int] | None = None,
    ) -> PoolProcess:
        (tmp_path / "qless-pool.yml").write_text(config)
        log = tmp_path / f"pool{len(started)}.log"
        environ = {
            k: v for k, v in os.environ.items() if k not in ("QLESS_ENV", "RACK_ENV", "RAILS_ENV")
        }
        environ.update(env or {})
        command = [
            SCRIPT,
            "-R",
            url or redis_url,
            "-I",
            str(TESTS),
            "-a",
            "testapp",
            "-i",
            "0.2",
            *args,
        ]
        pool = launch(command, tmp_path, log, environ)
        started.append(pool)
        if expect is not None:
            pool.wait_for_workers(expect)
        return pool

    yield start
    for pool in started:
        kill_tree(pool.pid)
    kill_processes_in(tmp_path)  # workers and job children that outlived their manager
    for pool in started:
        pool.process.wait(timeout=10)
        print(f"--- {pool.log} ---\n{pool.log_text()}")
    reap_orphans()


def scrape(port: int, timeout: float = 10) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
