"""Drain mode: run until the queues are empty, summarise, exit 0 or 1."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from processes import (
    alive,
    children,
    title,
    wait_for,
)
from workers import put, runs, wait_state

TESTS = Path(__file__).resolve().parent
SCRIPT = os.path.join(os.path.dirname(sys.executable), "qless-pool")


@pytest.fixture
def project(make_project):
    return make_project({"qless-pool.yml": "foo: 2\nbar: 1\n"})


def drain(project, redis_url, *args, timeout=60):
    return subprocess.run(
        [SCRIPT, "-R", redis_url, "-I", str(TESTS), "-i", "0.2", "--drain", *args],
        cwd=project, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def test_drain_runs_every_job_then_exits_0_with_a_summary(project, redis_url, client):
    jids = [put(client, queue, "Noop") for queue in ("foo", "bar") for _ in range(10)]
    other = put(client, "elsewhere", "Noop")  # not a configured queue: not waited for
    result = drain(project, redis_url)
    assert result.returncode == 0, result.stderr
    summary = [
        line for line in result.stdout.splitlines() if line.startswith("qless-pool: drained")
    ]
    assert len(summary) == 1
    assert summary[0].startswith("qless-pool: drained foo,bar: 20 completed, 0 failed in ")
    assert all(client.jobs[jid].state == "complete" for jid in jids)
    assert client.jobs[other].state == "waiting"
    assert "manager exiting" in result.stderr


def test_drain_exits_1_when_a_job_failed(project, redis_url, client):
    put(client, "foo", "Noop")
    failing = put(client, "bar", "Fail")
    result = drain(project, redis_url)
    assert result.returncode == 1
    assert "qless-pool: drained foo,bar: 1 completed, 1 failed in " in result.stdout
    assert client.jobs[failing].state == "failed"


def test_a_job_handed_back_until_out_of_retries_counts_as_failed(project, redis_url, client):
    put(client, "foo", "Exit", retries=1)  # dies twice: retried, then failed by retry
    result = drain(project, redis_url)
    assert result.returncode == 1
    assert "0 completed, 1 failed" in result.stdout


def test_drain_waits_for_follow_up_jobs(project, redis_url, client, redis_conn):
    put(client, "foo", "Chain", {"left": 4})
    result = drain(project, redis_url)
    assert result.returncode == 0, result.stderr
    assert len(runs(redis_conn)) == 5
    assert "5 completed, 0 failed" in result.stdout


def test_drain_waits_for_a_job_scheduled_within_the_interval(project, redis_url, client):
    jid = put(client, "foo", "Noop", delay=1)
    result = drain(project, redis_url, "-i", "2")
    assert result.returncode == 0, result.stderr
    assert client.jobs[jid].state == "complete"


def test_drain_on_empty_queues_stops_at_once(project, redis_url):
    result = drain(project, redis_url, timeout=20)
    assert result.returncode == 0, result.stderr
    assert "0 completed, 0 failed" in result.stdout


def test_a_signal_stops_a_draining_pool_and_its_watcher(project, redis_url, client):
    jid = put(client, "foo", "Sleep", {"seconds": 30})
    output = project / "pool.out"
    with open(output, "w") as out:
        process = subprocess.Popen(
            [SCRIPT, "-R", redis_url, "-I", str(TESTS), "-i", "0.2", "--drain"],
            cwd=project, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    [watcher] = wait_for(
        lambda: [pid for pid in children(process.pid) if title(pid).startswith("qless-pool-drain")]
    )
    assert title(watcher) == f"qless-pool-drain[{project.name}]: watching foo,bar"
    wait_state(client, jid, "running")
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=10) == 0  # the worker finishes its job on its own
    wait_for(lambda: not alive(watcher), message="the drain watcher to be stopped too")
    assert "drained" not in output.read_text()  # stopped, not drained


def test_a_queue_with_no_worker_is_not_waited_for_and_its_jobs_are_warned_about(
    project, redis_url, client
):
    (project / "qless-pool.yml").write_text('foo: 1\nbar: 0\n"bar,foo": 0\n')
    done = put(client, "foo", "Noop")
    stuck = [put(client, "bar", "Noop") for _ in range(3)]
    result = drain(project, redis_url, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "qless-pool: drained foo: 1 completed, 0 failed" in result.stdout
    assert client.jobs[done].state == "complete"
    assert all(client.jobs[jid].state == "waiting" for jid in stuck)
    warnings = [line for line in result.stderr.splitlines() if "no worker" in line]
    assert len(warnings) == 1
    assert "queue bar has 3 job(s) but no worker (its count is 0)" in warnings[0]


def test_a_drain_of_a_config_with_no_workers_says_so(project, redis_url):
    (project / "qless-pool.yml").write_text("foo: 0\n")
    result = drain(project, redis_url, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "qless-pool: drained no queues (no workers configured): 0 completed" in result.stdout
