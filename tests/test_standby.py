"""The standby job child: forked ahead, waiting for its job; a job starts with a pipe write."""

from __future__ import annotations

import os
import signal
import sys
import time

import qless
import redis
from processes import alive, stays, title, wait_for
from workers import PROCESSING, READY, history_events, put, runs, state, wait_state

from qless_pool.client import connect
from qless_pool.worker.jobchild import ChildSetup, rehearse
from qless_pool.worker.running import JobClient


def test_the_standby_waits_titled_ready_and_runs_the_next_job(start_worker, client, redis_conn):
    before = int(time.time())
    worker = start_worker(["foo", "bar"])
    standby = wait_for(worker.standby, message="a standby child")
    match = READY.match(title(standby))
    assert match.group(1) == "foo,bar"
    assert before <= int(match.group(2)) <= time.time()
    assert os.getpgid(standby) == standby  # its own process group, as a job child
    jid = put(client, "bar", "Sleep", {"seconds": 1.0})
    wait_state(client, jid, "running")
    # The standby took the job: its title is now the job child's, and it is the one running it.
    assert wait_for(lambda: PROCESSING.match(title(standby))).group(1) == "bar"
    assert worker.job_child() == standby
    # The title is set before the job function runs and records itself: wait for the record.
    assert wait_for(lambda: runs(redis_conn), message="the job's record")[0]["pid"] == standby
    # The job came after an idle spell: the next standby is forked once it is done, not while
    # its start needs the CPU.
    stays(lambda: worker.standby() is None, 0.5, message="no standby while the job runs")
    wait_state(client, jid, "complete")
    assert wait_for(worker.standby, message="the next standby") not in (standby, None)


def test_in_a_stream_the_next_standby_is_forked_while_the_job_runs(
    start_worker, client, redis_conn
):
    # Jobs waiting when the worker comes for them: each next standby is forked ahead.
    jids = [put(client, "foo", "Sleep", {"seconds": 1.0}) for _ in range(3)]
    worker = start_worker(["foo"])
    wait_state(client, jids[0], "running")
    first = wait_for(worker.job_child, message="the first job's child")
    assert wait_for(worker.standby, message="a standby while the first job runs") != first
    assert worker.job_child() == first  # still the first job
    for jid in jids:
        wait_state(client, jid, "complete")


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


def test_a_standbys_rehearsal_sends_nothing_imports_nothing_and_leaves_nothing(redis_url):
    """What a standby does while it waits for its job, here in the test's process: nothing
    of it reaches Redis or the file system, and the job's client is left as it was."""
    job_client = connect(redis_url, "rehearsal", client_class=JobClient, announce=False)
    setup = ChildSetup(parent_pid=os.getpid(), queues=("foo",), client=job_client, appname=None,
                       close_fds=(), parent_signals=())  # fmt: skip
    pool = job_client.redis.connection_pool
    for last_class in ("testjobs.Sleep", "nowhere_loaded.Job", "", None, "no-dots"):
        rehearse(setup, last_class)
        assert "nowhere_loaded" not in sys.modules
        assert job_client.jid is None and not job_client.settled
        assert pool._created_connections == 0  # no connection, so no command
    assert isinstance(job_client, qless.Client) and isinstance(pool, redis.ConnectionPool)
