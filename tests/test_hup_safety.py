"""A HUP never takes the pool down: whatever the file holds, the manager logs one line within a
second and keeps its config and workers; HUPs in a burst are one reload."""

from __future__ import annotations

import os
import signal
import time

import pytest
from commands import one_line, qless_pool
from processes import alive, wait_for
from workers import WAITING

ALIAS_BOMB = "\n".join(
    ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    + [f"a{n}: &a{n} [{', '.join([f'*a{n - 1}'] * 9)}]" for n in range(1, 10)]
)
HOSTILE = {
    "deep": "foo: 1\nbar: " + "[" * 1000 + "]" * 1000 + "\n",
    "alias-bomb": ALIAS_BOMB + "\n",
    "huge": "foo: 1\n" + "#" * (2 << 20) + "\n",
    "hundred-thousand-workers": "".join(f"q{i}: 1000\n" for i in range(100)),
}
EXPECTED = {
    "deep": "nested deeper than 8 levels",
    "alias-bomb": "holds more than 10,000 values (counting each value an alias repeats",
    "huge": "a config file may be at most 1,048,576 bytes",
    "hundred-thousand-workers": "asks for 100000 workers in all; a pool runs at most 1000",
}


@pytest.mark.parametrize("kind", list(HOSTILE))
def test_a_hostile_file_at_start_is_exit_78_and_one_line(project, kind):
    (project / "qless-pool.yml").write_text(HOSTILE[kind])
    for args in (["--dry-run"], []):
        started = time.monotonic()
        result = qless_pool(project, *args, timeout=10)
        assert time.monotonic() - started < 5
        assert result.returncode == 78
        line = one_line(result)
        assert line.startswith("qless-pool: config error: qless-pool.yml: ")
        assert EXPECTED[kind] in line


@pytest.mark.parametrize("kind", list(HOSTILE))
def test_a_hostile_file_on_hup_is_logged_and_the_pool_runs_on(start_pool, kind):
    pool = start_pool(config="foo: 2\n", expect={"foo": 2})
    workers = sorted(pool.workers())
    (pool.directory / "qless-pool.yml").write_text(HOSTILE[kind])
    pool.send(signal.SIGHUP)
    pool.wait_log("keeping the current config and workers", timeout=5)
    assert EXPECTED[kind] in pool.log_text()
    assert sorted(pool.workers()) == workers  # not restarted
    assert alive(pool.pid)
    # It still acts on signals at once: TERM stops it.
    pool.send(signal.SIGTERM)
    pool.process.wait(timeout=5)
    assert pool.process.returncode == 0


@pytest.mark.parametrize("text", ["", "foo: 0\nbar: 0\n"], ids=["empty", "all-zero"])
def test_a_hup_that_removes_every_worker_warns_naming_the_file(start_pool, text):
    pool = start_pool(config="foo: 1\n", expect={"foo": 1})
    (pool.directory / "qless-pool.yml").write_text(text)
    pool.send(signal.SIGHUP)
    pool.wait_log("asks for no workers at all")
    why = "it is empty" if not text else "every count is 0"
    assert (
        f"WARNING: HUP: qless-pool.yml asks for no workers at all ({why}): no job will run "
        "until it asks for some and the pool is sent HUP"
    ) in pool.log_text()
    wait_for(lambda: not pool.workers(), message="every worker to stop")


def test_a_burst_of_hups_is_one_reload(start_pool):
    pool = start_pool(config="foo: 5\n", expect={"foo": 5})
    first = set(pool.workers())
    most = 0
    for _ in range(20):
        pool.send(signal.SIGHUP)
        most = max(most, len(pool.workers()))
        time.sleep(0.06)

    def settled():
        nonlocal most
        workers = pool.workers()
        most = max(most, len(workers))
        titles = [WAITING.match(title) for title in pool.worker_titles().values()]
        return len(workers) == 5 and all(titles) and not (set(workers) & first)

    wait_for(settled, message="5 new workers")
    log = pool.log_text()
    assert log.count("HUP: reloading") == 1, log
    assert "(20 HUPs in a burst, one reload)" in log
    assert most <= 10  # the 5 being replaced, and their 5 replacements at most
    assert log.count("restarting every worker gracefully") == 1


def test_a_hup_after_the_burst_is_a_reload_of_its_own(start_pool):
    pool = start_pool(config="foo: 1\n", expect={"foo": 1})
    pool.send(signal.SIGHUP)
    pool.wait_log("HUP: reloading")
    pool.wait_for_workers({"foo": 1})
    (pool.directory / "qless-pool.yml").write_text("foo: 2\n")
    pool.send(signal.SIGHUP)
    pool.wait_log("HUP: reloading", count=2)
    pool.wait_for_workers({"foo": 2})


def test_the_manager_reads_no_file_that_is_a_fifo(start_pool):
    pool = start_pool(config="foo: 1\n", expect={"foo": 1})
    os.unlink(pool.directory / "qless-pool.yml")
    os.mkfifo(pool.directory / "qless-pool.yml")
    pool.send(signal.SIGHUP)
    pool.wait_log("cannot be read: not a regular file; keeping the current config", timeout=5)
    assert alive(pool.pid)
