"""Jobs in the worker process: popped several at a time, held, heartbeated, given back."""

from __future__ import annotations

import re
import signal
import time

from processes import wait_for
from workers import history_events, put, runs, state, wait_state

from qless_pool.client import connect
from qless_pool.worker.reservation import BATCH_SECONDS, MAX_PREFETCH, Prefetch


def batches(log: str) -> list[int]:
    return [int(n) for n in re.findall(r"popped (\d+) job\(s\)", log)]


def test_the_batch_grows_while_jobs_are_fast_and_drops_for_a_slow_one(
    start_worker, client, redis_conn
):
    fast = [put(client, "foo", "Noop") for _ in range(200)]
    worker = start_worker(["foo"], fork_per_job=False)
    for jid in fast:
        wait_state(client, jid, "complete")
    grown = batches(worker.log_text())
    assert grown[:4] == [1, 2, 4, 8] and max(grown) == MAX_PREFETCH
    slow = put(client, "foo", "Sleep", {"seconds": 1.2})
    wait_state(client, slow, "running")  # popped alone: the ones after come in later pops
    after = [put(client, "foo", "Noop") for _ in range(3)]
    for jid in [slow, *after]:
        wait_state(client, jid, "complete")
    # The slow job came in a batch of its own; the next pop asks for one job only.
    asked = [int(n) for n in re.findall(r"asked for (\d+)\)", worker.log_text())]
    assert 1 in asked[len(grown) :]


def test_the_adaptive_size():
    prefetch = Prefetch()
    sizes = []
    for _ in range(8):
        prefetch.popped(prefetch.size)
        for _ in range(prefetch.size):
            prefetch.ran(0.001)
        sizes.append(prefetch.size)
    assert sizes == [2, 4, 8, 16, 32, 32, 32, 32]
    prefetch.popped(32)
    prefetch.ran(0.2)  # 32 jobs of 0.2 s would keep the last one waiting 6 s
    assert prefetch.size == int(BATCH_SECONDS / 0.2)
    prefetch.ran(1.5)
    assert prefetch.size == 1
    assert Prefetch(5).size == 5


def test_held_jobs_are_heartbeated_and_never_taken_away(start_worker, client, redis_url):
    client.config["heartbeat"] = 1
    client.config["grace-period"] = 0
    jids = [put(client, "foo", "Sleep", {"seconds": 0.6}) for _ in range(3)]
    start_worker(["foo"], fork_per_job=False, prefetch=3)
    wait_for(lambda: state(client, jids[-1]) == "running", message="the batch popped")
    thief = connect(redis_url, "thief")
    # The third job starts 1.2 s after the pop, past its 1 s lock: only heartbeats keep it ours.
    while any(state(client, jid) != "complete" for jid in jids):
        assert thief.queues["foo"].pop() is None
        time.sleep(0.05)
    for jid in jids:
        assert "timed-out" not in history_events(client, jid)
        assert history_events(client, jid).count("popped") == 1


def test_term_gives_held_jobs_back_without_losing_a_retry_and_none_runs_twice(
    start_worker, client, redis_conn
):
    first = put(client, "foo", "Sleep", {"seconds": 30, "once": True}, retries=3)
    held = [put(client, "foo", "Noop", retries=3) for _ in range(4)]
    worker = start_worker(["foo"], fork_per_job=False, prefetch=5)
    wait_for(lambda: all(state(client, jid) == "running" for jid in [first, *held]))
    wait_for(lambda: len(runs(redis_conn)) == 1, message="the first job to start")
    worker.send(signal.SIGTERM)
    assert worker.process.wait(timeout=10) == 0
    # The interrupted job is handed back with a retry spent; the held ones with none spent.
    assert (state(client, first), client.jobs[first].retries_left) == ("waiting", 2)
    for jid in held:
        job = client.jobs[jid]
        assert (job.state, job.retries_left, job.failure) == ("waiting", 3, {})
    assert "given back to its queue, not started" in worker.log_text()
    start_worker(["foo"], fork_per_job=False)
    for jid in [first, *held]:
        wait_state(client, jid, "complete")
    ran = [run["jid"] for run in runs(redis_conn)]
    assert sorted(ran) == sorted([first, first, *held])  # the held ones ran exactly once


def test_quit_runs_the_held_jobs_first(start_worker, client):
    first = put(client, "foo", "Sleep", {"seconds": 0.5})
    held = [put(client, "foo", "Noop") for _ in range(4)]
    later = None
    worker = start_worker(["foo"], fork_per_job=False, prefetch=5)
    wait_for(lambda: all(state(client, jid) == "running" for jid in [first, *held]))
    later = put(client, "foo", "Noop")
    worker.send(signal.SIGQUIT)
    assert worker.process.wait(timeout=10) == 0
    assert all(state(client, jid) == "complete" for jid in [first, *held])
    assert state(client, later) == "waiting"


def test_a_held_job_taken_away_is_not_run(start_worker, client, redis_conn):
    first = put(client, "foo", "Sleep", {"seconds": 1})
    moved = put(client, "foo", "Noop")
    worker = start_worker(["foo"], fork_per_job=False, prefetch=2)
    wait_for(lambda: state(client, moved) == "running", message="the batch popped")
    client.jobs[moved].move("elsewhere")
    wait_state(client, first, "complete")
    wait_for(lambda: "lost its lock before it ran" in worker.log_text())
    assert [run["jid"] for run in runs(redis_conn)] == [first]
    assert state(client, moved) == "waiting"


# --- the batched completes when Redis forgets its scripts or goes away ----------------------


def test_batched_completes_survive_redis_forgetting_its_scripts(start_worker, client, redis_conn):
    # The first job makes Redis lose the script before the batch's completes go: they are
    # refused with NOSCRIPT, so they did not run, and go again once the script is loaded.
    jids = [put(client, "foo", "FlushScripts"), *(put(client, "foo", "Noop") for _ in range(3))]
    worker = start_worker(["foo"], fork_per_job=False, prefetch=4)
    for jid in jids:
        wait_state(client, jid, "complete")
    assert sorted(run["jid"] for run in runs(redis_conn)) == sorted(jids)  # each ran once
    assert [history_events(client, jid).count("done") for jid in jids] == [1, 1, 1, 1]
    assert "refused" not in worker.log_text()


def test_batched_completes_and_held_jobs_ride_out_a_redis_restart(start_worker, own_redis):
    url = own_redis.url()
    client = connect(url, "test-producer")
    first = put(client, "foo", "Noop")
    slow = put(client, "foo", "Sleep", {"seconds": 1.0})
    last = put(client, "foo", "Noop")
    worker = start_worker(["foo"], url=url, fork_per_job=False, prefetch=3)
    # The slow job has started: the first one's complete is owed, the last job is held.
    wait_for(lambda: len(runs(client.redis)) == 2, message="the slow job to start")
    own_redis.stop()  # saves: what Redis had run by then survives
    own_redis.start()
    for jid in (first, slow, last):
        wait_state(client, jid, "complete", timeout=30)
    assert [history_events(client, jid).count("done") for jid in (first, slow, last)] == [1, 1, 1]
    assert sorted(run["jid"] for run in runs(client.redis)) == sorted([first, slow, last])
    assert worker.process.poll() is None  # rode it out
    # Each job's outcome is known, and said (logged once Redis has answered: wait for it).
    for jid in (first, slow, last):
        pattern = rf"job {jid} .*: (completed|qless refused complete)"
        wait_for(lambda: re.search(pattern, worker.log_text()), message=f"{jid}'s outcome said")  # noqa: B023
    assert "Redis is back after" in worker.log_text()
