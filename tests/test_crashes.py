"""A worker that dies with work in hand: its jobs are settled for it at once (will.py), by a
helper of the manager, never left to their locks' expiry; and a job that crashes its worker is
the job's failure, not a failed start of the worker."""

from __future__ import annotations

import os
import signal
from collections import Counter

import pytest
from processes import alive, wait_for
from workers import put, runs, wait_state

#: Far longer than any wait below: a job handed back by its lock's expiry would fail the test.
HEARTBEAT = "120"


@pytest.fixture
def long_locks(redis_conn):
    redis_conn.hset("ql:config", "heartbeat", HEARTBEAT)


def failure_group(client, jid):
    job = client.jobs[jid]
    return job.failure.get("group") if job and job.failure else None


def test_a_job_that_kills_its_worker_in_process_is_retried_at_once(
    start_pool, client, redis_conn, long_locks
):
    pool = start_pool("--no-fork-per-job", config="foo: 1\n", expect={"foo": 1})
    first = pool.workers()[0]
    jid = put(client, "foo", "ExitOnce")
    wait_state(client, jid, "complete", timeout=15)
    attempts = [run["attempt"] for run in runs(redis_conn) if run["jid"] == jid]
    assert attempts == [1, 2]
    log = pool.log_text()
    assert f"worker {first} (foo) died: exit status 3" in log
    assert "backing off" not in log  # a job's crash is not a failed start
    assert "handed back with retry (4 retries left): the worker process running it" in log


def test_a_job_that_always_kills_its_worker_fails_once_its_retries_are_spent(
    start_pool, client, long_locks
):
    pool = start_pool("--no-fork-per-job", config="foo: 1\n", expect={"foo": 1})
    jid = client.queues["foo"].put("testjobs.Exit", {}, retries=2)
    wait_state(client, jid, "failed", timeout=20)
    assert failure_group(client, jid) == "foo-DirtyExit"
    assert "exited with status 3" in client.jobs[jid].failure["message"]
    pool.wait_for_workers({"foo": 1})
    assert "backing off" not in pool.log_text()


def test_jobs_that_finished_do_not_run_again_when_a_later_job_kills_the_worker(
    start_pool, client, redis_conn, long_locks
):
    """Their completes were owed, to go with the next pop: the helper sends them."""
    queue = client.queues["foo"]
    done = [queue.put("testjobs.Noop", {}, priority=10) for _ in range(5)]
    crash = queue.put("testjobs.ExitOnce", {}, priority=5)
    pool = start_pool("--no-fork-per-job", "--prefetch", "10", config="foo: 1\n")
    for jid in [*done, crash]:
        wait_state(client, jid, "complete", timeout=15)
    counts = Counter(run["jid"] for run in runs(redis_conn))
    assert {jid: counts[jid] for jid in done} == dict.fromkeys(done, 1)
    assert counts[crash] == 2
    log = pool.log_text()
    assert log.count("completed in") >= 5
    assert "qless-pool-settler" in log


@pytest.mark.parametrize("fork_per_job", [True, False], ids=["fork", "in-process"])
def test_a_killed_worker_s_running_job_is_retried_and_its_held_jobs_given_back(
    start_pool, client, redis_conn, long_locks, fork_per_job
):
    queue = client.queues["foo"]
    # The first runs (and is killed); the two after it are held (in process: put before the
    # pool starts, all three come in its first pop) or wait.
    jids = [
        queue.put("testjobs.Sleep", {"seconds": 30, "once": True}, priority=10),
        queue.put("testjobs.Noop", {}, priority=5),
        queue.put("testjobs.Noop", {}, priority=5),
    ]
    args = [] if fork_per_job else ["--no-fork-per-job", "--prefetch", "3"]
    pool = start_pool(*args, config="foo: 1\n")
    wait_for(lambda: len(runs(redis_conn)) >= 1, message="a job to start")
    [worker] = pool.workers()
    os.kill(worker, signal.SIGKILL)
    for jid in jids:
        wait_state(client, jid, "complete", timeout=20)
    first = runs(redis_conn)[0]["jid"]
    held = [jid for jid in jids if jid != first]
    counts = Counter(run["jid"] for run in runs(redis_conn))
    assert counts[first] == 2  # it ran, and ran again
    assert all(counts[jid] == 1 for jid in held)  # given back unstarted: run once
    log = pool.log_text()
    assert f"job {first} (testjobs.Sleep) from foo handed back with retry (4 retries left)" in log
    assert "backing off" not in log
    if not fork_per_job:  # held, so given back by the settler (no retry spent)
        assert all(f"job {jid} (testjobs.Noop) from foo: given back to its queue" in log
                   for jid in held)  # fmt: skip


def test_a_worker_that_ends_on_an_error_leaves_its_will_to_the_settler(
    start_pool, client, redis_conn, long_locks
):
    """What it owed (the completes of the jobs before) is sent, not truncated away on exit."""
    queue = client.queues["foo"]
    done = [queue.put("testjobs.Noop", {}, priority=10) for _ in range(3)]
    crash = queue.put("testjobs.RaiseBase", {}, priority=5)
    pool = start_pool("--no-fork-per-job", "--prefetch", "10", config="foo: 1\n")
    for jid in [*done, crash]:
        wait_state(client, jid, "complete", timeout=15)
    counts = Counter(run["jid"] for run in runs(redis_conn))
    assert {jid: counts[jid] for jid in done} == dict.fromkeys(done, 1)
    assert counts[crash] == 2
    log = pool.log_text()
    assert "the worker is exiting on an error: the manager's settler settles its jobs" in log
    assert "Redis is unreachable" not in log


def test_what_a_job_in_process_started_dies_with_its_killed_worker(
    start_pool, client, redis_conn, long_locks
):
    pool = start_pool("--no-fork-per-job", config="foo: 1\n", expect={"foo": 1})
    [worker] = pool.workers()
    put(client, "foo", "SpawnAndHang")
    wait_for(lambda: runs(redis_conn), message="the job to start")
    background = runs(redis_conn)[0]["background"]
    assert alive(background)
    os.kill(worker, signal.SIGKILL)
    wait_for(lambda: not alive(background), timeout=5, message="the job's background process")


def test_a_manager_that_cannot_fork_a_worker_backs_off_and_runs_on(start_pool, pids_limit):
    pool = start_pool(config="foo: 1\n", expect={"foo": 1})
    (pids_limit / "pids.max").write_text("1")  # the manager alone: no new child
    (pids_limit / "cgroup.procs").write_text(str(pool.pid))
    [worker] = pool.workers()
    os.kill(worker, signal.SIGKILL)
    pool.wait_log("cannot fork a worker for foo")
    pool.wait_log("backing off")
    assert alive(pool.pid)
    (pids_limit / "pids.max").write_text("max")
    pool.wait_for_workers({"foo": 1}, timeout=20)
