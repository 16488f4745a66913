"""No pool process outlives the one it serves: a job child dies with its worker parent, and what
a job leaves running in its process group dies with the job."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
from processes import alive, children, stat, title, wait_for
from workers import PROCESSING, history_events, put, runs, wait_state

from qless_pool import lifeline


def test_a_job_child_dies_with_its_worker_and_its_job_runs_exactly_once_more(
    start_pool, client, redis_conn, tmp_path
):
    # Long locks: the job is handed back at once by the settler (will.py), not by their expiry.
    client.config["heartbeat"] = 120
    lock = tmp_path / "pool.lock"
    pool = start_pool("--lock", str(lock), config="foo: 1\n", expect={"foo": 1})
    [worker] = pool.workers()
    jid = put(client, "foo", "Spawn", {"seconds": 300})
    wait_for(lambda: runs(redis_conn), message="the job to start")
    [job_child] = [pid for pid in children(worker) if PROCESSING.match(title(pid))]
    background = runs(redis_conn)[0]["background"]
    assert alive(background)

    os.kill(worker, signal.SIGKILL)
    killed_at = time.monotonic()
    wait_for(lambda: not alive(job_child), timeout=2, message="the job child to die")
    assert time.monotonic() - killed_at < 2
    # What the job started in its process group goes with it (the manager adopted the child).
    wait_for(lambda: not alive(background), timeout=2, message="the job's background process")

    # The settler hands it back with retry; the replacement worker takes it; it runs once
    # more, and only once.
    wait_state(client, jid, "complete", timeout=20)
    assert len(runs(redis_conn)) == 2
    events = history_events(client, jid)
    assert events.count("popped") == 2
    assert "timed-out" not in events
    assert "from foo handed back with retry (4 retries left): the worker process running it" in (
        pool.log_text()
    )

    pool.send(signal.SIGQUIT)
    assert pool.process.wait(timeout=15) == 0
    # Nothing of the pool holds the lock any more: a deploy waiting on it goes on.
    assert subprocess.run(["flock", "-w", "2", str(lock), "true"], timeout=10).returncode == 0
    log = pool.log_text()
    assert "Traceback" not in log and "BrokenPipe" not in log


def test_what_a_job_leaves_in_its_process_group_is_killed_when_it_ends(
    start_worker, client, redis_conn
):
    start_worker(["foo"])
    jid = put(client, "foo", "Spawn")
    wait_state(client, jid, "complete")
    background = runs(redis_conn)[0]["background"]
    wait_for(lambda: not alive(background), timeout=2, message="the background process to die")


def test_a_process_the_job_put_in_a_session_of_its_own_outlives_it(
    start_worker, client, redis_conn
):
    start_worker(["foo"])
    jid = put(client, "foo", "Spawn", {"setsid": True})
    wait_state(client, jid, "complete")
    [run] = runs(redis_conn)
    daemon = run["background"]
    try:
        # The job child is gone, and with it what was left in its process group: not the daemon.
        wait_for(lambda: stat(run["pid"]) is None, message="the job child to be reaped")
        assert alive(daemon)
    finally:
        os.kill(daemon, signal.SIGKILL)


@pytest.mark.parametrize("use_prctl", [True, False])
def test_die_with_parent(use_prctl):
    """With PR_SET_PDEATHSIG, and with the thread other platforms get instead."""
    read_end, write_end = os.pipe()
    middle = os.fork()
    if middle == 0:  # the parent-to-be-killed
        child = os.fork()
        if child == 0:
            lifeline.die_with_parent(os.getppid(), use_prctl=use_prctl)
            os.setpgid(0, 0)
            os.write(write_end, f"{os.getpid()}\n".encode())
            time.sleep(300)
            os._exit(0)
        time.sleep(300)
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        child = int(pipe.readline())
    try:
        assert stat(child)[1] == middle
        os.kill(middle, signal.SIGKILL)
        os.waitpid(middle, 0)
        # The test process is a subreaper: the child comes to us, and must die within a second.
        wait_for(lambda: not alive(child), timeout=1.5, message="the child to die")
    finally:
        for pid in (child, middle):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in (child,):
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
