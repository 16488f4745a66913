"""The worker when things go wrong around a running job: Redis away or refusing writes, a
fork that fails, a job that cannot be saved, swallows its interruption, or is cut short after
it completed; and a stopping worker that must wait without burning a core."""

from __future__ import annotations

import os
import signal
import time

import pytest
from processes import alive, wait_for
from workers import history_events, put, runs, state, wait_state

from qless_pool.client import connect


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of ``pid`` so far (None once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuWatch:
    """Samples a process's CPU time while the test waits for something else."""

    def __init__(self, pid: int):
        self.pid = pid
        self.first = (time.monotonic(), cpu_seconds(pid))
        self.last = self.first

    def sample(self) -> None:
        used = cpu_seconds(self.pid)
        if used is not None:
            self.last = (time.monotonic(), used)

    def busy_share(self) -> tuple[float, float]:
        """Seconds watched, and the share of them the process spent on a CPU."""
        elapsed = self.last[0] - self.first[0]
        return elapsed, (self.last[1] - self.first[1]) / max(elapsed, 1e-9)


# --- waiting without spinning ---------------------------------------------------------------------


def test_a_quit_worker_waits_for_its_running_job_without_spinning(start_worker, client):
    jid = put(client, "foo", "Sleep", {"seconds": 3})
    worker = start_worker(["foo"])
    wait_state(client, jid, "running")
    wait_for(worker.job_child)
    worker.send(signal.SIGQUIT)
    wait_for(lambda: "QUIT" in worker.log_text())
    watch = CpuWatch(worker.pid)

    def finished() -> bool:
        watch.sample()
        return state(client, jid) == "complete"

    wait_for(finished, 10, message="the job to finish")
    elapsed, share = watch.busy_share()
    assert elapsed > 1.5
    assert share < 0.25, f"the stopping worker used {share:.0%} of a CPU while it waited"


def test_a_worker_rides_out_an_outage_with_a_job_running_without_spinning(start_worker, own_redis):
    url = own_redis.url()
    client = connect(url, "test-producer")
    client.config["heartbeat"] = 3  # a heartbeat every second: several fall in the outage
    jid = put(client, "foo", "Quiet", {"seconds": 4})
    worker = start_worker(["foo"], url=url)
    wait_state(client, jid, "running")
    child = wait_for(worker.job_child)
    own_redis.stop()
    wait_for(lambda: "Redis is unavailable" in worker.log_text(), message="the outage")
    watch = CpuWatch(worker.pid)

    def child_done() -> bool:
        watch.sample()
        return not alive(child)

    wait_for(child_done, 10, message="the job child to finish during the outage")
    elapsed, share = watch.busy_share()
    own_redis.start()
    wait_state(client, jid, "complete", timeout=30)
    assert elapsed > 1.5
    assert share < 0.25, f"the worker used {share:.0%} of a CPU during the outage"


# --- Redis refusing writes ------------------------------------------------------------------------


def test_a_failover_to_a_read_only_replica_during_a_job_neither_kills_nor_loses_it(
    start_worker, own_redis
):
    url = own_redis.url()
    client = connect(url, "test-producer")
    client.config["heartbeat"] = 6  # a heartbeat every 2 s
    jid = put(client, "foo", "Quiet", {"seconds": 5})
    worker = start_worker(["foo"], url=url)
    wait_state(client, jid, "running")
    wait_for(worker.job_child)
    # A replica of a master that does not answer: it keeps its data and refuses every write.
    client.redis.execute_command("REPLICAOF", "127.0.0.1", "1")
    wait_for(lambda: "Redis is unavailable" in worker.log_text(), message="the heartbeat refused")
    client.redis.execute_command("REPLICAOF", "NO", "ONE")
    wait_state(client, jid, "complete", timeout=30)
    log = worker.log_text()
    assert "killing job child" not in log
    assert history_events(client, jid).count("popped") == 1


def test_redis_out_of_memory_is_ridden_out_like_an_outage(start_worker, own_redis):
    url = own_redis.url()
    client = connect(url, "test-producer")
    worker = start_worker(["foo"], url=url)
    client.redis.config_set("maxmemory", 1)  # every write refused with OOM
    wait_for(lambda: "Redis is unavailable" in worker.log_text(), message="the OOM refusal")
    assert alive(worker.pid)
    client.redis.config_set("maxmemory", 0)
    jid = put(client, "foo", "Noop")
    wait_state(client, jid, "complete", timeout=30)
    assert worker.log_text().count("Redis is unavailable") == 1


# --- a fork that fails ----------------------------------------------------------------------------


def test_a_fork_that_fails_gives_the_job_back_and_the_worker_carries_on(
    start_worker, client, pids_limit
):
    worker = start_worker(["foo"])
    (pids_limit / "pids.max").write_text("1")  # the worker itself, no child
    (pids_limit / "cgroup.procs").write_text(str(worker.pid))
    first = put(client, "foo", "Noop")  # runs in the standby forked before the limit
    wait_state(client, first, "complete")
    wait_for(lambda: "could not fork a standby" in worker.log_text(), message="a failed fork")
    second = put(client, "foo", "Noop")
    wait_for(lambda: "could not fork a child for" in worker.log_text(), message="a failed fork")
    wait_state(client, second, "waiting")  # given back (after the line), not failed, nothing spent
    assert client.jobs[second].retries_left == client.jobs[second].original_retries
    (pids_limit / "pids.max").write_text("max")
    wait_state(client, second, "complete", timeout=20)
    worker.send(signal.SIGQUIT)  # its signals were not left blocked by the failed fork
    worker.wait_gone()


# --- data that cannot be saved --------------------------------------------------------------------


@pytest.mark.parametrize("fork_per_job", [True, False], ids=["child", "in-process"])
def test_job_data_that_cannot_be_saved_fails_the_job_not_the_worker(
    start_worker, client, fork_per_job
):
    returned = put(client, "foo", "Unsaveable")
    raised = put(client, "foo", "Unsaveable", {"raise": True})
    start_worker(["foo"], fork_per_job=fork_per_job)
    wait_state(client, returned, "failed")
    wait_state(client, raised, "failed")
    failure = client.jobs[returned].failure
    assert failure["group"] == "foo-BadJobData"
    assert "returned, but its data cannot be saved as JSON" in failure["message"]
    failure = client.jobs[raised].failure
    assert failure["group"] == "foo-KeyError"  # as the job function's exception would have
    assert "raised with unsaveable data" in failure["message"]
    after = put(client, "foo", "Noop")
    wait_state(client, after, "complete")


# --- complete(), then cut short -------------------------------------------------------------------


@pytest.mark.parametrize("fork_per_job", [True, False], ids=["child", "in-process"])
def test_a_job_that_completed_and_then_ran_past_its_timeout_stays_complete(
    start_worker, client, fork_per_job
):
    jid = put(client, "foo", "CompleteThenSleep", {"seconds": 30})
    worker = start_worker(["foo"], fork_per_job=fork_per_job, job_timeout=1)
    wait_state(client, jid, "complete", timeout=15)
    assert "called complete() and then its run was cut short" in worker.log_text()
    assert "failed" not in history_events(client, jid)


def test_a_job_child_killed_after_complete_leaves_its_job_complete(start_worker, client):
    jid = put(client, "foo", "CompleteThenSleep", {"seconds": 30})
    worker = start_worker(["foo"])
    wait_for(lambda: client.redis.llen("test:runs") == 1, message="the job to start")
    child = wait_for(worker.job_child)
    os.kill(child, signal.SIGKILL)
    wait_state(client, jid, "complete")
    assert history_events(client, jid).count("popped") == 1


# --- in the worker process ------------------------------------------------------------------------


def test_a_slow_job_in_process_holds_up_neither_the_completes_nor_the_locks_of_its_batch(
    start_worker, client
):
    client.config["heartbeat"] = 2
    client.config["grace-period"] = 0
    fast = put(client, "foo", "Noop")
    slow = put(client, "foo", "Sleep", {"seconds": 5})
    later = [put(client, "foo", "Noop") for _ in range(2)]
    holder = start_worker(["foo"], fork_per_job=False, prefetch=4)
    # The slow job runs; the fast one is completed meanwhile, by the worker's keeper thread.
    wait_state(client, fast, "complete", timeout=4)
    assert state(client, slow) == "running"
    # Another worker would take the jobs held behind the slow one, were their locks let go.
    other = start_worker(["foo"])
    for jid in [slow, *later]:
        wait_state(client, jid, "complete", timeout=20)
    done = [run["jid"] for run in runs(client.redis)]
    assert sorted(done) == sorted([fast, slow, *later])  # each ran once
    assert {run["pid"] for run in runs(client.redis)} == {holder.pid}
    assert "refused" not in holder.log_text() + other.log_text()


def test_quit_during_an_outage_does_not_wait_for_redis_to_run_held_jobs(start_worker, own_redis):
    url = own_redis.url()
    client = connect(url, "test-producer")
    client.config["heartbeat"] = 2
    client.config["grace-period"] = 0
    jids = [put(client, "foo", "Quiet", {"seconds": 1}) for _ in range(3)]
    worker = start_worker(["foo"], url=url, fork_per_job=False, prefetch=3)
    wait_for(lambda: all(state(client, jid) == "running" for jid in jids), message="the batch")
    own_redis.stop()  # saves: the jobs, popped and held, survive
    worker.send(signal.SIGQUIT)
    worker.wait_gone(timeout=20)
    assert "is left held: Redis is unreachable" in worker.log_text()
    own_redis.start()
    # Nothing is lost: their locks expire and another worker runs them.
    start_worker(["foo"], url=url)
    for jid in jids:
        wait_state(client, jid, "complete", timeout=30)


def test_a_job_that_swallows_its_interruptions_cannot_keep_the_worker(start_worker, client):
    jid = put(client, "foo", "Swallow")
    worker = start_worker(["foo"], fork_per_job=False, kill_grace=0.3)
    wait_state(client, jid, "running")
    wait_for(lambda: client.redis.llen("test:runs") == 1, message="the job to start")
    worker.send(signal.SIGTERM)
    assert worker.process.wait(timeout=15) == 70
    assert client.redis.llen("test:swallowed") >= 2  # interrupted, and again
    assert "swallowed 2 interruptions" in worker.log_text()


# --- a long report --------------------------------------------------------------------------------


def test_a_long_failure_made_during_an_outage_is_replayed_whole(start_worker, own_redis):
    url = own_redis.url()
    client = connect(url, "test-producer")
    jid = put(client, "foo", "FailLater", {"seconds": 1.5, "size": 60000})
    worker = start_worker(["foo"], url=url)
    wait_state(client, jid, "running")
    child = wait_for(worker.job_child)
    # The job records its start in Redis first: stop Redis only after that, or the job fails
    # on its record (a ConnectionError) rather than on its own error.
    wait_for(lambda: len(runs(client.redis)) == 1, message="the job to record its start")
    own_redis.stop()
    wait_for(lambda: not alive(child), message="the job to fail while Redis is down")
    own_redis.start()
    wait_state(client, jid, "failed", timeout=30)
    failure = client.jobs[jid].failure
    assert failure["group"] == "foo-ValueError"
    assert "y" * 60000 in failure["message"]


def test_a_job_that_moved_itself_is_not_killed_for_it(start_worker, client):
    jid = put(client, "foo", "MoveThenWork", {"to": "elsewhere", "seconds": 1})
    worker = start_worker(["foo"])
    wait_for(lambda: any(r.get("finished") for r in runs(client.redis)), 15, message="its end")
    assert state(client, jid) == "waiting" and client.jobs[jid].queue_name == "elsewhere"
    assert "killing job child" not in worker.log_text()
