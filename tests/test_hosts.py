"""Many hosts, one qless: pools on several hosts against one Redis.

Each "host" is a qless-pool process with an appname of its own; run as root, each also gets a
host name of its own (a UTS namespace, ``unshare --uts``), so that its workers are named as a
real second host's would be. Without root the pools share this machine's name, and only that
part of the checks is the same for both.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import time
from collections import Counter

import pytest
from pools import SCRIPT, PoolProcess, launch
from processes import kill_processes_in, kill_tree, reap_orphans, wait_for
from workers import TESTS, put, runs, wait_state


@functools.cache
def can_rename_hosts() -> bool:
    """Can this process start a command with a host name of its own?"""
    if os.geteuid() != 0:
        return False
    try:
        done = subprocess.run(
            ["unshare", "--uts", "hostname", "qless-pool-probe"], capture_output=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


@pytest.fixture
def start_host(redis_url, tmp_path):
    """Start a pool as a host named ``hostname`` would (when it can), in a directory of its own;
    returns (pool, the host name its workers see)."""
    started: list[PoolProcess] = []

    def start(appname: str, hostname: str, *args: str, config: str = "foo: 2\n"):
        directory = tmp_path / appname
        directory.mkdir()
        (directory / "qless-pool.yml").write_text(config)
        command = [SCRIPT, "-R", redis_url, "-I", str(TESTS), "-a", appname, "-i", "0.2", *args]
        if can_rename_hosts():
            # exec: the pool's manager is the process Popen started.
            command = ["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', hostname]
            command += [SCRIPT, "-R", redis_url, "-I", str(TESTS), "-a", appname, "-i", "0.2"]
            command += args
        else:
            hostname = os.uname().nodename
        pool = launch(command, directory, directory / "pool.log")
        started.append(pool)
        return pool, hostname

    yield start
    for pool in started:
        kill_tree(pool.pid)
    kill_processes_in(tmp_path)
    for pool in started:
        pool.process.wait(timeout=10)
        print(f"--- {pool.log} ---\n{pool.log_text()[-20000:]}")
    reap_orphans()


def popped_by(client, jids: list[str]) -> dict[str, list[str]]:
    """Each job's workers, in the order they popped it (qless's history)."""
    found = {}
    for start in range(0, len(jids), 500):
        for job in client.jobs.get(*jids[start : start + 500]):
            found[job.jid] = [e["worker"] for e in job.history if e["what"] == "popped"]
    return found


def test_two_pools_on_one_redis_run_every_job_exactly_once(start_host, client, redis_conn):
    # Host A runs a child per job, host B runs jobs in its workers: both kinds side by side.
    a, host_a = start_host("app-a", "qless-host-a")
    b, host_b = start_host("app-b", "qless-host-b", "--no-fork-per-job")
    workers_a = a.wait_for_workers({"foo": 2})
    workers_b = b.wait_for_workers({"foo": 2})
    jobs = 3000
    jids = [put(client, "foo", "Noop") for _ in range(jobs)]
    wait_for(lambda: redis_conn.zcard("ql:completed") == jobs, 120, 0.2, message="every job done")

    recorded = runs(redis_conn)
    assert Counter(Counter(run["jid"] for run in recorded).values()) == {1: jobs}  # once each
    assert {run["jid"] for run in recorded} == set(jids)
    # Which host ran each job: a child of one of A's workers, or one of B's workers itself.
    ran = {}
    for run in recorded:
        if run["ppid"] in workers_a:
            ran[run["jid"]] = ("A", f"{host_a}-{run['ppid']}")
        else:
            assert run["pid"] in workers_b, run
            ran[run["jid"]] = ("B", f"{host_b}-{run['pid']}")
    by_host = Counter(host for host, _ in ran.values())
    assert by_host["A"] > 0 and by_host["B"] > 0, by_host  # both hosts took work
    # qless knows each job's worker as <its host's name>-<pid of the worker that ran it>.
    assert popped_by(client, jids) == {jid: [ran[jid][1]] for jid in jids}
    if can_rename_hosts():
        assert (host_a, host_b) == ("qless-host-a", "qless-host-b")
    print(f"jobs run by host: {dict(by_host)}")

    for pool in (a, b):
        pool.send(signal.SIGQUIT)
    for pool in (a, b):
        assert pool.process.wait(timeout=30) == 0


def test_the_jobs_of_a_host_that_dies_are_taken_by_another_host(start_host, client, redis_conn):
    # The heartbeat decides how soon a dead worker's job is given out again: its lock expires
    # that long after the last heartbeat, and the next pop of its queue (by any host) takes
    # it (grace-period 0: at once, not after a courtesy lock_lost and 10 s more).
    client.config["heartbeat"] = 2
    client.config["grace-period"] = 0
    a, host_a = start_host("app-a", "qless-host-a")
    workers_a = a.wait_for_workers({"foo": 2})
    # Long on their first attempt, at once on the next.
    jids = [put(client, "foo", "Sleep", {"seconds": 60, "once": True}) for _ in range(2)]
    for jid in jids:
        wait_state(client, jid, "running")
    b, host_b = start_host("app-b", "qless-host-b")
    workers_b = b.wait_for_workers({"foo": 2})
    wait_for(lambda: len(runs(redis_conn)) == 2, message="both jobs started on host A")
    assert {run["ppid"] for run in runs(redis_conn)} == set(workers_a)

    # Host A dies: its manager, workers and jobs, all at once (the manager stopped first, so
    # that it neither reaps a worker nor forks a settler for it on its way out).
    os.kill(a.pid, signal.SIGSTOP)
    kill_tree(a.pid)
    died = time.monotonic()
    for jid in jids:
        wait_state(client, jid, "complete", timeout=30)
    taken_after = time.monotonic() - died

    popped = popped_by(client, jids)
    for jid in jids:
        first, then = popped[jid]
        assert first in {f"{host_a}-{pid}" for pid in workers_a}
        assert then in {f"{host_b}-{pid}" for pid in workers_b}
        assert "timed-out" in [e["what"] for e in client.jobs[jid].history]
    # Each job ran twice: on host A, cut off, then on host B as its second attempt (the lost
    # run used one of its retries).
    attempts = sorted((run["jid"], run["attempt"], run["ppid"]) for run in runs(redis_conn))
    assert [(jid, attempt) for jid, attempt, _ in attempts] == [
        (jid, attempt) for jid in sorted(jids) for attempt in (1, 2)
    ]
    assert {ppid for _, attempt, ppid in attempts if attempt == 2} <= set(workers_b)
    # Not before the lock expired (2 s after host A's last heartbeat, less than 2 s before it
    # died), and soon after (B's workers poll every 0.2 s here).
    assert 0.5 < taken_after < 10, taken_after
    print(f"host A's jobs completed by host B {taken_after:.1f}s after A died")
    assert json.loads(client("queues", "foo"))["running"] == 0
