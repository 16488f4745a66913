"""The standby job child: forked ahead, waiting for its job; a job starts with a pipe write."""

from __future__ import annotations

import os
import signal
import time

from processes import alive, children, title, wait_for
from test_worker import PROCESSING, READY, put, runs, wait_state


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
    assert runs(redis_conn)[0]["pid"] == standby
    # And the next standby is forked while it runs.
    assert wait_for(worker.standby) not in (standby, None)


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


def client_names(redis_conn) -> list[str]:
    return [entry.get("name", "") for entry in redis_conn.client_list()]


def test_a_job_that_never_touches_redis_opens_no_connection(start_worker, client, redis_conn):
    worker = start_worker(["foo"])
    quiet = put(client, "foo", "Quiet", {"seconds": 1.0})
    wait_state(client, quiet, "running")
    child = wait_for(worker.job_child)
    time.sleep(0.3)  # well into the job
    assert f"qless-pool-job-{child}" not in client_names(redis_conn)
    assert not any(name.startswith("qless-pool-job-") for name in client_names(redis_conn))
    wait_state(client, quiet, "complete")  # the worker parent completed it
    # A job that uses Redis connects, named after its child, and only then.
    busy = put(client, "foo", "Sleep", {"seconds": 1.0})
    wait_state(client, busy, "running")
    child = wait_for(worker.job_child)
    wait_for(lambda: f"qless-pool-job-{child}" in client_names(redis_conn))
    wait_state(client, busy, "complete")
    assert children(worker.pid)  # the standby is there for the next one
