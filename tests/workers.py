"""Starting a real worker process for a test, and looking at what it did: its title, its log,
the jobs it ran (test:runs), a job's state and history."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from processes import alive, children, kill_tree, reap_orphans, title, wait_for
from redis_server import RedisServer

from qless_pool.proctitle import PREFIX

TESTS = Path(__file__).resolve().parent
WORKER_MAIN = str(TESTS / "worker_main.py")
VERSION = re.escape(PREFIX.split("-", 1)[1])
WAITING = re.compile(rf"^qless-{VERSION}: Waiting for (\S+)$")
FORKED = re.compile(rf"^qless-{VERSION}: Forked (\d+) at (\d+)$")
PROCESSING = re.compile(rf"^qless-{VERSION}: Processing (\S+) since (\d+)$")
PAUSED = re.compile(rf"^qless-{VERSION}: Paused$")
READY = re.compile(rf"^qless-{VERSION}: Ready for (\S+) since (\d+)$")
ANY_WORKER = re.compile(rf"^qless-{VERSION}: (Waiting|Forked|Processing|Paused)")


def python_path(*directories) -> str:
    """``directories``, then the caller's $PYTHONPATH: a subprocess imports the qless_pool this
    test process does (a working copy's, not an editable install's)."""
    return os.pathsep.join([*map(str, directories), *filter(None, [os.environ.get("PYTHONPATH")])])


@dataclass
class WorkerProcess:
    process: subprocess.Popen
    pid: int
    log: Path

    def title(self) -> str:
        return title(self.pid)

    def job_child(self) -> int | None:
        """The child running a job (not the standby, forked ahead and waiting for one)."""
        found = [pid for pid in children(self.pid) if PROCESSING.match(title(pid))]
        return found[0] if found else None

    def standby(self) -> int | None:
        found = [pid for pid in children(self.pid) if READY.match(title(pid))]
        return found[0] if found else None

    def log_text(self) -> str:
        return self.log.read_text()

    def send(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def wait_gone(self, timeout: float = 10.0) -> None:
        wait_for(lambda: not alive(self.pid), timeout, message=f"worker {self.pid} to exit")


@pytest.fixture
def start_worker(redis_url, tmp_path):
    started: list[WorkerProcess] = []

    def start(queues, ready=True, url=None, **options) -> WorkerProcess:
        options = {"queues": queues, "redis_url": url or redis_url, "interval": 0.2, **options}
        log = tmp_path / f"worker{len(started)}.log"
        orphanable = options.get("orphanable", False)
        env = {**os.environ, "PYTHONPATH": python_path(TESTS)}
        with open(log, "w") as log_file:
            process = subprocess.Popen(
                [sys.executable, WORKER_MAIN, json.dumps(options)],
                stdout=subprocess.PIPE if orphanable else log_file,
                stderr=log_file,
                env=env,
                start_new_session=True,
                text=True,
            )
        pid = int(process.stdout.readline()) if orphanable else process.pid
        worker = WorkerProcess(process, pid, log)
        started.append(worker)
        if ready:
            wait_for(lambda: ANY_WORKER.match(worker.title()), message="the worker to start")
        return worker

    yield start
    for worker in started:
        kill_tree(worker.process.pid)
        kill_tree(worker.pid)
        worker.process.wait(timeout=10)
        print(f"--- {worker.log} ---\n{worker.log_text()}")
    reap_orphans()


def runs(redis_conn) -> list[dict]:
    return [json.loads(item) for item in redis_conn.lrange("test:runs", 0, -1)]


def state(client, jid) -> str | None:
    job = client.jobs[jid]
    return job.state if job else None


def wait_state(client, jid, *states, timeout=10.0):
    try:
        return wait_for(lambda: state(client, jid) in states and state(client, jid), timeout)
    except AssertionError:
        raise AssertionError(
            f"timed out after {timeout}s waiting for job {jid} to be {' or '.join(states)} "
            f"(is {state(client, jid)})"
        ) from None


def put(client, queue, klass, data=None, **options) -> str:
    return client.queues[queue].put(f"testjobs.{klass}", data or {}, **options)


def history_events(client, jid) -> list[str]:
    return [entry["what"] for entry in client.jobs[jid].history]


@pytest.fixture
def own_redis():
    """A Redis of the test's own that keeps its data across a restart (RDB at shutdown)."""
    server = RedisServer(persistent=True).start()
    yield server
    server.remove()
