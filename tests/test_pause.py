"""USR2 and CONT, whatever else is going on: workers starting after a HUP, signals that arrive
together (Unix keeps no order between two pending signals), a pause in force when a worker
starts. And TTIN/TTOU, which would stop the manager, are ignored."""

from __future__ import annotations

import os
import random
import signal
import time

from processes import stat, stays, wait_for
from workers import ANY_WORKER, PAUSED, WAITING, put, wait_state


def all_titles(pool, pattern, count):
    titles = list(pool.worker_titles().values())
    return len(titles) == count and all(pattern.match(text) for text in titles)


def test_usr2_then_cont_while_workers_start_leaves_none_paused(start_pool):
    pool = start_pool(config="foo: 3\n", expect={"foo": 3})
    rng = random.Random(4)
    for trial in range(1, 7):
        old = set(pool.workers())
        pool.send(signal.SIGHUP)
        pool.wait_log("HUP: reloading", count=trial)  # the new workers are starting now
        pool.send(signal.SIGUSR2)
        time.sleep(rng.uniform(0, 0.01))
        pool.send(signal.SIGCONT)
        wait_for(
            lambda old=old: all_titles(pool, WAITING, 3) and not set(pool.workers()) & old,
            message="3 new workers, none paused",
        )


def test_signals_sent_together_leave_the_pool_working(start_pool):
    pool = start_pool(config="foo: 2\n", expect={"foo": 2})
    for _ in range(10):
        pool.send(signal.SIGUSR2)
        pool.send(signal.SIGCONT)
    old = set(pool.workers())
    pool.send(signal.SIGHUP)
    wait_for(
        lambda: all_titles(pool, WAITING, 2) and not set(pool.workers()) & old,
        message="2 new workers waiting",
    )
    stays(lambda: all_titles(pool, WAITING, 2), 0.3, message="2 workers waiting, none paused")


def test_a_worker_started_during_a_pause_starts_paused_and_cont_resumes_it(start_pool, client):
    pool = start_pool(config="foo: 2\n", expect={"foo": 2})
    pool.send(signal.SIGUSR2)
    wait_for(lambda: all_titles(pool, PAUSED, 2), message="2 paused workers")
    old = set(pool.workers())
    pool.send(signal.SIGHUP)
    wait_for(
        lambda: all_titles(pool, PAUSED, 2) and not set(pool.workers()) & old,
        message="2 new workers, paused",
    )
    jid = put(client, "foo", "Noop")
    # Paused: nothing taken, though a put wakes a waiting worker at once.
    stays(lambda: client.jobs[jid].state == "waiting", 0.5, message="the job left waiting")
    pool.send(signal.SIGCONT)
    wait_state(client, jid, "complete")
    wait_for(lambda: all_titles(pool, WAITING, 2), message="2 workers waiting")


def test_ttin_and_ttou_do_not_stop_the_manager_or_its_workers(start_pool):
    pool = start_pool(config="foo: 2\n", expect={"foo": 2})
    for signum in (signal.SIGTTIN, signal.SIGTTOU):
        pool.send(signum)
        for worker in pool.workers():
            os.kill(worker, signum)
    time.sleep(0.2)
    assert stat(pool.pid)[0] != "T"
    assert all(stat(worker)[0] != "T" for worker in pool.workers())
    # It still reaps and replaces a worker, and TERM still stops it.
    victim = pool.workers()[0]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: victim not in pool.workers() and len(pool.workers()) == 2)
    wait_for(lambda: all(ANY_WORKER.match(t) for t in pool.worker_titles().values()))
    pool.send(signal.SIGTERM)
    pool.process.wait(timeout=5)
    assert pool.process.returncode == 0
