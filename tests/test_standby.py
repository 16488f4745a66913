"""The standby job child: forked ahead, waiting for its job; a job starts with a pipe write."""

from __future__ import annotations

import os
import signal
import sys
import time

from processes import alive, title, wait_for
from workers import PROCESSING, READY, history_events, put, runs, state, wait_state

from qless_pool.client import connect
from qless_pool.worker.jobchild import ChildSetup, rehearsal, rehearse
from qless_pool.worker.running import JobClient


def test_the_standby_waits_titled_ready_and_runs_the_next_job(start_worker, client, redis_conn):
    before = int(time.time())
    worker = start_worker(["foo", "bar"])
    standby = wait_for(worker.standby, message="a standby child")
    match = READY.match(title(standby))
    assert match.group(1) == "foo,bar"
    assert before <= int(match.group(2)) <= time.time()
    assert os.getpgid(standby) == standby  # its own process group, as a job child
    jid = put(client, "bar", "Sleep", {"seconds": 30})
    wait_state(client, jid, "running")
    # The standby took the job: its title is now the job child's, and it is the one running it.
    assert wait_for(lambda: PROCESSING.match(title(standby))).group(1) == "bar"
    assert worker.job_child() == standby
    # The title is set before the job function runs and records itself: wait for the record.
    assert wait_for(lambda: runs(redis_conn), message="the job's record")[0]["pid"] == standby
    # And the next standby is forked while it runs (a moment after its start: STANDBY_DELAY).
    assert wait_for(worker.standby) not in (standby, None)


def test_each_job_of_a_stream_starts_in_the_standby_forked_while_the_last_one_ran(
    start_worker, client, redis_conn
):
    jids = [put(client, "foo", "Sleep", {"seconds": 1.0}) for _ in range(2)]  # waiting
    worker = start_worker(["foo"])
    wait_state(client, jids[0], "running")
    first = wait_for(worker.job_child, message="the first job's child")
    standby = wait_for(worker.standby, message="a standby while the first job runs")
    assert standby != first
    wait_state(client, jids[1], "complete")
    [second] = [r for r in runs(redis_conn) if r["jid"] == jids[1]]
    assert (second["pid"], second["ppid"]) == (standby, worker.pid)


def test_a_job_put_while_a_job_runs_starts_in_a_standby(start_worker, client, redis_conn):
    worker = start_worker(["foo"])
    wait_for(worker.standby)
    first = put(client, "foo", "Sleep", {"seconds": 2.0})  # popped by an idle worker
    wait_state(client, first, "running")
    running = wait_for(worker.job_child)
    standby = wait_for(worker.standby, message="a standby while the first job runs")
    assert standby != running
    second = put(client, "foo", "Noop")
    wait_state(client, second, "complete")
    [record] = [r for r in runs(redis_conn) if r["jid"] == second]
    assert record["pid"] == standby


def test_a_standby_that_dies_is_replaced(start_worker, client):
    worker = start_worker(["foo"])
    standby = wait_for(worker.standby)
    os.kill(standby, signal.SIGKILL)
    replacement = wait_for(lambda: worker.standby() not in (None, standby) and worker.standby())
    assert replacement != standby
    jid = put(client, "foo", "Noop")
    wait_state(client, jid, "complete")
    assert "the standby job child" in worker.log_text()


def test_the_standby_dies_with_its_worker(start_worker):
    worker = start_worker(["foo"])
    standby = wait_for(worker.standby)
    os.kill(worker.pid, signal.SIGKILL)
    wait_for(lambda: not alive(standby), timeout=2, message="the standby to die with its worker")


def client_ids(redis_conn) -> set[int]:
    return {entry["id"] for entry in redis_conn.client_list()}


def test_a_job_that_never_touches_redis_opens_no_connection(start_worker, client, redis_conn):
    worker = start_worker(["foo"])
    quiet = put(client, "foo", "Quiet", {"seconds": 1.0})
    wait_state(client, quiet, "running")
    wait_for(worker.job_child)
    before = client_ids(redis_conn)  # the worker's own, the tests', while the job runs

    def completed_with_no_new_connection():
        assert client_ids(redis_conn) <= before  # (one of another test may close meanwhile)
        return state(client, quiet) == "complete"  # completed by the worker parent

    wait_for(completed_with_no_new_connection, message="the job to complete")
    # A job that uses Redis connects (a connection of its own, gone with the child).
    busy = put(client, "foo", "Sleep", {"seconds": 1.0})
    wait_state(client, busy, "running")
    wait_for(worker.job_child)
    wait_for(lambda: len(client_ids(redis_conn) - before) == 1, message="the job's connection")
    wait_state(client, busy, "complete")
    wait_for(lambda: client_ids(redis_conn) <= before, message="the job's connection to close")


def test_a_job_that_completes_itself_is_completed_with_the_next_pop(
    start_worker, client, redis_conn
):
    start_worker(["foo"])
    jid = put(client, "foo", "Complete")  # job.complete(), and nothing else of Redis but a record
    wait_state(client, jid, "complete")
    assert history_events(client, jid).count("done") == 1
    # What it does after complete() sees the job completed, as qless would have answered.
    late = put(client, "foo", "CompleteThenFail")
    wait_state(client, late, "complete")
    assert client.jobs[late].failure == {}


def test_a_standbys_rehearsal_runs_and_sends_nothing_imports_nothing_leaves_nothing(
    redis_url, redis_conn, tmp_path, monkeypatch
):
    """What a standby does while it waits for its job, here in the test's process: it runs
    through (``rehearsal`` raises what fails; the standby's ``rehearse`` would swallow it), and
    nothing of it reaches Redis, sys.modules or the file system; the job's client is left as
    it was."""
    import testjobs  # noqa: F401 - a class the rehearsal finds loaded

    job_client = connect(redis_url, "rehearsal", client_class=JobClient, announce=False)
    setup = ChildSetup(parent_pid=os.getpid(), queues=("foo",), client=job_client, appname=None,
                       close_fds=(), parent_signals=())  # fmt: skip
    monkeypatch.chdir(tmp_path)
    clients = {c["id"] for c in redis_conn.client_list()}
    modules = set(sys.modules)
    for last_class in ("testjobs.Sleep", "nowhere_loaded.Job", "testjobs.missing", "", None):
        rehearsal(setup, last_class)
        rehearse(setup, last_class)
        assert job_client.jid is None and not job_client.settled
    assert set(sys.modules) == modules
    assert list(tmp_path.iterdir()) == []
    assert {c["id"] for c in redis_conn.client_list()} == clients  # no connection, no command
