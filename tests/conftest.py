"""Shared fixtures: one private redis-server for the session, a clean database per test."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import redis
from commands import INVOKE_PROJECT
from processes import become_subreaper, kill_processes_in, reap_orphans
from redis_server import RedisServer, server_binary, server_version

from qless_pool.client import connect

# Orphans of the pools the tests start are re-parented to this process, so tests can reap them
# and find them for cleanup.
become_subreaper()

# A shell without job control starts a background command (`.ci/run &`) with SIGINT and SIGQUIT
# ignored, and every process the tests start would inherit that: the tests send both and
# expect what they do by default.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
if signal.getsignal(signal.SIGQUIT) is signal.SIG_IGN:
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)

# The fixtures that start real workers and pools, for every test module.
from pools import start_pool  # noqa: E402, F401
from workers import own_redis, start_worker  # noqa: E402, F401


def pytest_addoption(parser):
    group = parser.getgroup("qless-pool")
    group.addoption("--chaos-jobs", type=int, default=400, help="jobs in the chaos test")
    group.addoption(
        "--chaos-seconds", type=float, default=20.0, help="length of the chaos test's chaos"
    )


def pytest_report_header(config):
    binary = server_binary()
    return f"redis-server {server_version(binary)} ({binary})"


@pytest.fixture(scope="session")
def redis_server():
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.remove()


@pytest.fixture
def redis_url(redis_server):
    """The URL of an empty database on the session's server."""
    redis.Redis.from_url(redis_server.url()).flushall()
    return redis_server.url()


@pytest.fixture
def redis_conn(redis_url):
    connection = redis.Redis.from_url(redis_url, decode_responses=True)
    yield connection
    connection.close()


@pytest.fixture
def qless_client(redis_url):
    return connect(redis_url, worker_name="test-worker")


@pytest.fixture
def client(redis_url):
    """A qless client for the test's own puts and looks (not a worker)."""
    return connect(redis_url, worker_name="test-producer")


@pytest.fixture
def make_project(tmp_path):
    """``make_project({name: text})``: a working directory holding those files. Every process left
    in it is killed afterwards, and its logs are printed (pytest shows them when a test fails)."""

    def make(files: dict[str, str]) -> Path:
        for name, text in files.items():
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name).write_text(text)
        return tmp_path

    yield make
    kill_processes_in(tmp_path)
    reap_orphans()
    for log in sorted(tmp_path.rglob("*.log")):
        if log.is_symlink() or not log.is_file():  # a test's bad log file: a FIFO, a link
            continue
        print(f"--- {log.relative_to(tmp_path)} ---\n{log.read_text(errors='replace')[-20_000:]}")


@pytest.fixture
def project(make_project):
    """A working directory with a one-worker config. Modules that need another define their
    own, with ``make_project``."""
    return make_project({"qless-pool.yml": "foo: 1\n"})


@pytest.fixture
def invoke_project(make_project):
    """A project run by ``invoke``: its tasks.py chains qless_pool's tasks (commands.py)."""
    return make_project(INVOKE_PROJECT)


@pytest.fixture
def redis_with_password():
    """A redis-server of the test's own that asks for a password ("secretpw")."""
    server = RedisServer(password="secretpw").start()
    yield server
    server.remove()


PIDS_CGROUP = Path("/sys/fs/cgroup/pids")


@pytest.fixture
def pids_limit():
    """A pids cgroup (v1) the test can move a process into, to make its forks fail."""
    if not (PIDS_CGROUP / "cgroup.procs").exists() or not os.access(PIDS_CGROUP, os.W_OK):
        pytest.skip("no writable pids cgroup (v1) on this machine")
    group = PIDS_CGROUP / f"qless-pool-test-{os.getpid()}"
    group.mkdir()
    yield group
    for pid in (group / "cgroup.procs").read_text().split():
        (PIDS_CGROUP / "cgroup.procs").write_text(pid)  # back to the root group
    group.rmdir()
