"""A Redis that stalls (accepts connections, never answers) never keeps the pool from stopping:
QUIT, TERM and INT take effect within 5 s, in the workers and the drain watcher alike."""

from __future__ import annotations

import os
import signal
import socket
import time

import pytest
from processes import alive, children, descendants, title, wait_for
from redis_proxy import WatchingProxy
from redis_server import RedisServer
from workers import put, wait_state

from qless_pool.client import connect

#: The issue's bound: a stop takes effect within this, however Redis behaves.
STOP_WITHIN = 5.0


class StallingRedis:
    """A Redis of the test's own, behind a proxy that sees who waits for an answer; ``stall()``
    makes every command wait (CLIENT PAUSE, sent around the proxy)."""

    def __init__(self) -> None:
        self.server = RedisServer().start()
        self.proxy = WatchingProxy(self.server.socket, self.server.directory)

    def url(self) -> str:
        return self.proxy.url()

    def stall(self, seconds: float = 60) -> None:
        pause = int(seconds * 1000)
        connect(self.server.url()).redis.execute_command("CLIENT", "PAUSE", pause, "ALL")

    def wait_stuck(self, pids) -> None:
        """Until each of ``pids`` waits for an answer."""
        wait_for(lambda: set(pids) <= self.proxy.waiting(), message=f"{pids} stuck in a call")

    def remove(self) -> None:
        self.proxy.close()
        self.server.remove()


@pytest.fixture
def stalling_redis():
    redis = StallingRedis()
    yield redis
    redis.remove()


def timed_stop(pool, signum) -> float:
    """Send ``signum`` to the manager; how long until no process of the pool is left."""
    tree = [pool.pid, *descendants(pool.pid)]
    sent = time.monotonic()
    pool.send(signum)
    pool.process.wait(timeout=30)
    wait_for(lambda: not any(alive(pid) for pid in tree), timeout=30, message="the pool to end")
    return time.monotonic() - sent


@pytest.mark.parametrize(
    "signum", [signal.SIGQUIT, signal.SIGTERM, signal.SIGINT], ids=["QUIT", "TERM", "INT"]
)
def test_the_pool_stops_within_5s_while_redis_stalls(start_pool, stalling_redis, signum):
    url = stalling_redis.url()
    pool = start_pool(url=url, config="foo: 2\nbar: 1\n", expect={"foo": 2, "bar": 1})
    stalling_redis.stall()
    stalling_redis.wait_stuck(pool.workers())  # each polls every 0.2 s
    took = timed_stop(pool, signum)
    print(f"{signal.Signals(signum).name} took {took:.2f}s with Redis stalled")
    assert took < STOP_WITHIN


def test_term_with_a_job_running_while_redis_stalls(start_pool, stalling_redis):
    url = stalling_redis.url()
    client = connect(url, "test-producer")
    pool = start_pool(url=url, config="foo: 1\n", expect={"foo": 1})
    jid = put(client, "foo", "Sleep", {"seconds": 60})
    wait_state(client, jid, "running")
    stalling_redis.stall()  # the worker meets it when TERM makes it hand the job back
    took = timed_stop(pool, signal.SIGTERM)
    print(f"TERM took {took:.2f}s with a job running and Redis stalled")
    assert took < STOP_WITHIN
    assert "Redis is unreachable, so its lock will expire" in pool.log_text()


def test_a_drain_stops_within_5s_while_redis_stalls(start_pool, stalling_redis):
    url = stalling_redis.url()
    client = connect(url, "test-producer")
    put(client, "foo", "Sleep", {"seconds": 60})
    pool = start_pool("--drain", url=url, config="foo: 1\n")
    wait_for(lambda: len(descendants(pool.pid)) >= 3, message="the drain watcher and a job")
    stalling_redis.stall()
    [watcher] = [pid for pid in children(pool.pid) if title(pid).startswith("qless-pool-drain")]
    stalling_redis.wait_stuck([watcher])  # it looks every 0.2 s
    took = timed_stop(pool, signal.SIGTERM)
    print(f"TERM of a drain took {took:.2f}s with Redis stalled")
    assert took < STOP_WITHIN


@pytest.fixture
def black_hole(tmp_path):
    """A unix socket that accepts connections (the kernel's backlog) and never answers."""
    path = str(tmp_path / "black-hole.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(128)
    yield f"unix://{path}?db=0"
    listener.close()


def test_a_worker_on_a_redis_that_never_answers_quits_within_5s(start_worker, black_hole):
    worker = start_worker(["foo"], url=black_hole, ready=False, interval=5)
    wait_for(lambda: "Redis is unavailable" in worker.log_text(), message="the outage")
    sent = time.monotonic()
    worker.send(signal.SIGQUIT)
    assert worker.process.wait(timeout=30) == 0
    took = time.monotonic() - sent
    print(f"QUIT took {took:.2f}s against a Redis that never answers")
    assert took < STOP_WITHIN
    assert os.path.exists(black_hole[len("unix://") : -len("?db=0")])
