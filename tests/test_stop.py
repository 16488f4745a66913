"""A status that tells the truth, and qless-pool stop: a pool in the foreground is found without
a pidfile; Redis unreachable from the workers, a rejected reload and workers in backoff are said;
stop waits until the pool is gone; a closed pipe is no traceback."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess

import pytest
from commands import SCRIPT, one_line, qless_pool
from processes import alive, wait_for
from redis_server import RedisServer
from workers import put, runs, wait_state


def command(pool, *args, timeout=60):
    """``qless-pool ARGS`` in the pool's directory, with no pidfile or pid named."""
    return subprocess.run(
        [SCRIPT, *args], capture_output=True, text=True, timeout=timeout, cwd=pool.directory
    )


def status_json(pool) -> dict:
    result = command(pool, "status", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


# --- finding the pool -----------------------------------------------------------------------------


def test_a_pool_in_the_foreground_is_found_by_the_directory_it_was_started_in(start_pool):
    pool = start_pool(config="foo: 1\n", expect={"foo": 1})
    assert not (pool.directory / "tmp").exists()  # no pidfile
    assert status_json(pool)["manager"]["pid"] == pool.pid
    assert command(pool, "status", "--check").returncode == 0
    elsewhere = subprocess.run([SCRIPT, "status"], capture_output=True, text=True, cwd="/")
    assert elsewhere.returncode == 3
    assert one_line(elsewhere) == (
        "qless-pool status: no pool is running here: no pidfile tmp/pids/qless-pool.pid, and "
        "no pool of this user was started in / (give -p FILE or --pid PID)"
    )


def test_two_pools_started_in_one_directory_ask_for_a_pid(start_pool):
    first = start_pool(config="foo: 1\n", expect={"foo": 1})
    second = start_pool(config="foo: 1\n")
    wait_for(lambda: len(second.workers()) == 1, message="the second pool's worker")
    result = command(first, "status")
    assert result.returncode == 2  # not 3, "no pool": a monitor must not start another
    assert command(first, "status", "--check").returncode == 2
    pids = sorted([first.pid, second.pid])
    assert one_line(result) == (
        f"qless-pool status: 2 pools were started in {first.directory} "
        f"({pids[0]}, {pids[1]}): give --pid"
    )


# --- what status says -----------------------------------------------------------------------------


def test_workers_that_cannot_reach_redis_fail_the_check(start_pool):
    server = RedisServer().start()
    try:
        pool = start_pool(url=server.url(), config="foo: 2\n", expect={"foo": 2})
        assert command(pool, "status", "--check").returncode == 0
        server.stop()
        wait_for(lambda: command(pool, "status", "--check").returncode == 1,
                 message="the check to fail")  # fmt: skip
        snapshot = status_json(pool)
        [problem] = snapshot["problems"]
        assert problem.startswith("Redis unreachable from 2 of 2 workers for ")
        assert "connecting to" in problem
        assert all(w["redis_down_since"] for w in snapshot["workers"])
        text = command(pool, "status").stdout.splitlines()
        assert text[1].startswith("health: NOT OK: Redis unreachable from 2 of 2 workers")
        server.start()
        wait_for(lambda: command(pool, "status", "--check").returncode == 0,
                 message="the check to pass again")  # fmt: skip
        assert status_json(pool)["problems"] == []
    finally:
        server.remove()


def test_a_rejected_reload_is_a_warning_that_does_not_fail_the_check(start_pool):
    pool = start_pool(config="foo: 1\n", expect={"foo": 1})
    (pool.directory / "qless-pool.yml").write_text("foo: [\n")
    pool.send(signal.SIGHUP)
    pool.wait_log("keeping the current config and workers")
    snapshot = wait_for(lambda: (s := status_json(pool))["warnings"] and s)
    [warning] = snapshot["warnings"]
    assert re.match(
        r"the reload at \d\d:\d\d:\d\d was rejected, the pool runs the config it had: "
        r"qless-pool.yml: not valid YAML: ", warning
    )  # fmt: skip
    assert snapshot["healthy"] is True and snapshot["problems"] == []
    assert snapshot["manager"]["last_reload"]["ok"] is False
    assert (
        command(pool, "status").stdout.splitlines()[1].startswith("health: ok, but the reload at ")
    )
    assert command(pool, "status", "--check").returncode == 0
    # A reload that works clears it.
    (pool.directory / "qless-pool.yml").write_text("foo: 1\n")
    pool.send(signal.SIGHUP)
    wait_for(lambda: status_json(pool)["warnings"] == [], message="the warning to go")


def test_a_stopped_manager_is_not_healthy_and_stop_says_why_it_waits(start_pool):
    pool = start_pool(config="foo: 1\n", expect={"foo": 1})
    pool.send(signal.SIGSTOP)
    try:
        assert command(pool, "status", "--check").returncode == 1
        [problem] = status_json(pool)["problems"]
        assert problem == "the manager is stopped (SIGSTOP or a debugger): send it CONT"
        result = command(pool, "stop", "--timeout", "0.3")
        assert result.returncode == 1
        assert f"stopped by SIGSTOP or a debugger: {pool.pid} (send them CONT)" in result.stderr
    finally:
        pool.send(signal.SIGCONT)
    wait_for(lambda: not alive(pool.pid), message="the QUIT sent to take effect once continued")


@pytest.mark.parametrize("value", ["-1", "0", "nan", "inf", "x"])
def test_status_watch_takes_a_sane_interval(start_pool, value):
    pool = start_pool(config="foo: 1\n", expect={"foo": 1})
    result = command(pool, "status", "--watch", value)
    assert result.returncode == 2
    assert f"argument --watch: seconds from 0.1 to 3,600: '{value}'" in result.stderr
    assert "Traceback" not in result.stderr


def test_status_into_a_closed_pipe_is_no_traceback(start_pool):
    pool = start_pool(config="foo: 30\n", expect={"foo": 30})
    reader = subprocess.Popen(
        [SCRIPT, "status", "--watch", "0.1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        cwd=pool.directory,
    )  # fmt: skip
    reader.stdout.readline()
    reader.stdout.close()
    assert reader.wait(timeout=30) == 141
    assert reader.stderr.read() == b""


def test_a_daemon_whose_redis_is_unreachable_says_so_at_start(make_project):
    project = make_project({"qless-pool.yml": "foo: 1\n"})
    dead = f"unix://{project}/no-redis.sock"
    result = qless_pool(project, "-d", "-R", dead, "-i", "0.2")
    try:
        assert result.returncode == 0, result.stderr
        assert re.fullmatch(
            rf"qless-pool: started as a daemon, pid \d+; but Redis at {re.escape(dead)} is "
            r"unreachable now \(.*\): the workers wait for it\n", result.stderr
        )  # fmt: skip
    finally:
        stopped = qless_pool(project, "stop", "--now")
        assert stopped.returncode == 0, stopped.stderr


# --- stop -----------------------------------------------------------------------------------------


def test_stop_waits_for_the_running_job_then_the_pool_is_gone(start_pool, client, redis_conn):
    pool = start_pool(config="foo: 2\n", expect={"foo": 2})
    tree = [pool.pid, *pool.workers()]
    jid = put(client, "foo", "Sleep", {"seconds": 1.5})
    wait_for(lambda: runs(redis_conn), message="the job to start")
    result = command(pool, "stop")
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(rf"stopped pool {pool.pid} after its jobs in \d+\.\ds\n", result.stdout)
    assert not any(alive(pid) for pid in tree)
    assert client.jobs[jid].state == "complete"  # finished, not handed back
    assert pool.process.wait(timeout=10) == 0
    again = command(pool, "stop")
    assert again.returncode == 3
    assert one_line(again).startswith("qless-pool stop: no pool is running here: ")


def test_stop_now_hands_the_running_job_back(start_pool, client, redis_conn):
    pool = start_pool(config="foo: 1\n", expect={"foo": 1})
    jid = put(client, "foo", "Sleep", {"seconds": 60})
    wait_for(lambda: runs(redis_conn), message="the job to start")
    result = command(pool, "stop", "--now", "--json", "--pid", str(pool.pid))
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert (answer["pid"], answer["stopped"]) == (pool.pid, True)
    assert answer["seconds"] < 10
    job = client.jobs[jid]
    assert job.state == "waiting"  # handed back: TERM's children, INT's immediate stop
    assert job.failure["group"] == "foo-DirtyExit"


def test_stop_gives_up_after_its_timeout_and_says_what_is_left(start_pool, client, redis_conn):
    pool = start_pool(config="foo: 1\n", expect={"foo": 1})
    [worker] = pool.workers()
    put(client, "foo", "Sleep", {"seconds": 60})
    wait_for(lambda: runs(redis_conn), message="the job to start")
    result = command(pool, "stop", "--timeout", "0.5")
    assert result.returncode == 1
    line = one_line(result)
    assert line.startswith(f"qless-pool stop: pool {pool.pid} is still running after 0.5s: ")
    assert str(worker) in line and "qless-pool stop --now" in line
    assert command(pool, "stop", "--now").returncode == 0


def test_stop_finds_a_daemon_by_its_pidfile(make_project, redis_url):
    project = make_project({"qless-pool.yml": "foo: 1\n"})
    started = qless_pool(project, "-d", "-R", redis_url, "-i", "0.2")
    assert started.returncode == 0, started.stderr
    pid = int((project / "tmp/pids/qless-pool.pid").read_text())
    result = qless_pool(project, "stop", "-p", "tmp/pids/qless-pool.pid")
    assert result.returncode == 0, result.stderr
    assert not alive(pid)
    assert not (project / "tmp/pids/qless-pool.pid").exists()


# --- what a worker counts and says ----------------------------------------------------------------


def test_a_job_handed_back_at_a_graceful_timeout_is_not_a_job_done(start_pool, client, redis_conn):
    pool = start_pool("--graceful-timeout", "0.5", config="foo: 1\n", expect={"foo": 1})
    done = put(client, "foo", "Noop")
    wait_state(client, done, "complete")
    put(client, "foo", "Sleep", {"seconds": 60})
    wait_for(lambda: len(runs(redis_conn)) == 2, message="the second job to start")
    [worker] = pool.workers()
    pool.send(signal.SIGQUIT)
    assert pool.process.wait(timeout=20) == 0
    assert f"[{worker}] INFO: worker vm-{worker} exiting after 1 job(s)" in pool.log_text().replace(
        os.uname().nodename, "vm"
    )


def test_the_recycling_line_comes_after_the_last_jobs_completed_line(start_pool, client):
    pool = start_pool("--max-jobs", "2", "--log-level", "DEBUG", config="foo: 1\n",
                      expect={"foo": 1})  # fmt: skip
    [worker] = pool.workers()
    jids = [put(client, "foo", "Noop") for _ in range(2)]
    for jid in jids:
        wait_state(client, jid, "complete")
    pool.wait_log("recycling: it ran 2 jobs (--max-jobs)")
    lines = [line for line in pool.log_text().splitlines() if f"[{worker}]" in line]
    last_completed = max(i for i, line in enumerate(lines) if f"{jids[1]}" in line
                         and "completed" in line)  # fmt: skip
    recycling = next(i for i, line in enumerate(lines) if "recycling:" in line)
    assert last_completed < recycling < len(lines)
    assert "exiting after 2 job(s)" in lines[recycling + 1]
