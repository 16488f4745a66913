"""The pool manager as operators run it: ``qless-pool`` as a real process, real signals, ``ps``."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from pools import MANAGER, SCRIPT
from processes import (
    alive,
    children,
    kill_processes_in,
    kill_tree,
    reap_orphans,
    title,
    wait_for,
)
from workers import (
    FORKED,
    PAUSED,
    PROCESSING,
    TESTS,
    WAITING,
    history_events,
    put,
    runs,
    wait_state,
)

PRODUCTION = {"foo": 1, "bar": 2, "foo,bar,baz": 4}
DEFAULT = {"foo": 1, "bar": 2, "foo,bar,baz": 1}


# --- the tree -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("args", "expected"), [(("-E", "production"), PRODUCTION), ((), DEFAULT)])
def test_the_seed_tree_with_the_readme_config(start_pool, args, expected):
    pool = start_pool(*args, expect=expected)
    workers = pool.workers()
    assert len(workers) == sum(expected.values())
    assert re.match(r"^qless-pool-manager\[testapp\]: managing \[", pool.title())
    assert sorted(pool.managed()) == workers
    for pid in workers:
        assert os.getpgid(pid) == pid  # each worker leads its own process group
        assert WAITING.match(title(pid))


def test_jobs_on_every_queue_are_completed_in_the_three_level_tree(start_pool, client):
    pool = start_pool("-E", "production", expect=PRODUCTION)
    jids = [put(client, queue, "Noop") for queue in ("foo", "bar", "baz") for _ in range(5)]
    for jid in jids:
        wait_state(client, jid, "complete")
    slow = put(client, "baz", "Sleep", {"seconds": 30})
    wait_state(client, slow, "running")

    # The three levels: manager -> worker "Forked <child> at ..." -> child "Processing baz ...".
    def running_slow():  # a worker whose title names the child running the slow job
        found = []
        for pid, text in pool.worker_titles().items():
            forked = FORKED.match(text)
            if forked and PROCESSING.match(title(int(forked.group(1)))):
                found.append((pid, forked))
        return found

    [(worker, forked)] = wait_for(running_slow, message="the worker running the slow job")
    child = int(forked.group(1))
    # The worker's children: the one running the job, and the standby forked for the next one.
    assert child in children(worker)
    assert [pid for pid in children(worker) if PROCESSING.match(title(pid))] == [child]
    # The child names itself a moment after the fork.
    assert wait_for(lambda: PROCESSING.match(title(child))).group(1) == "baz"
    assert sorted(pool.managed()) == pool.workers()  # the manager lists workers, not job children


def test_the_manager_never_talks_to_redis(start_pool, tmp_path):
    # Redis is not even there: the workers wait for it; the manager neither knows nor cares.
    pool = start_pool(url=f"unix://{tmp_path}/nothing.sock", config="foo: 2\n")
    wait_for(lambda: len(pool.workers()) == 2)
    wait_for(lambda: pool.log_text().count("Redis is unavailable") == 2)
    sockets = [
        os.readlink(f"/proc/{pool.pid}/fd/{fd}")
        for fd in os.listdir(f"/proc/{pool.pid}/fd")
        if os.readlink(f"/proc/{pool.pid}/fd/{fd}").startswith("socket:")
    ]
    assert sockets == []
    assert alive(pool.pid)


# --- HUP ------------------------------------------------------------------------------------------


def test_hup_reloads_the_counts_and_restarts_every_worker_gracefully(start_pool, client):
    pool = start_pool(config="foo: 1\nbar: 1\n", expect={"foo": 1, "bar": 1})
    old = pool.workers()
    jid = put(client, "foo", "Sleep", {"seconds": 3})
    wait_state(client, jid, "running")
    wait_for(lambda: any(FORKED.match(title(pid)) for pid in old), message="a busy worker")
    (pool.directory / "qless-pool.yml").write_text("foo: 2\nbaz: 1\n")
    pool.send(signal.SIGHUP)
    # The replacements start at once; the old foo worker finishes its job meanwhile, and the
    # manager's title lists it apart.
    wait_for(lambda: pool.waiting() == {"foo": 2, "baz": 1})
    [busy] = [pid for pid, text in zip(old, map(title, old)) if FORKED.match(text)]
    # Still finishing its job (3 s), once the idle old worker has exited (which, on a loaded
    # machine, may come after the new ones are up).
    wait_for(lambda: pool.retiring() == [busy], message="only the busy old worker retiring")
    assert sorted(pool.managed()) == sorted(pool.workers())
    wait_for(lambda: not any(alive(pid) for pid in old), message="the old workers to exit")
    assert state_of(client, jid) == "complete"
    assert history_events(client, jid).count("popped") == 1
    new = pool.wait_for_workers({"foo": 2, "baz": 1})
    assert len(new) == 3
    assert not set(new) & set(old)
    assert "HUP: config foo: 2, baz: 1; restarting every worker gracefully" in pool.log_text()


def state_of(client, jid):
    return client.jobs[jid].state


def test_hup_with_a_broken_file_changes_nothing(start_pool):
    pool = start_pool(config="foo: 2\n", expect={"foo": 2})
    before = pool.workers()
    (pool.directory / "qless-pool.yml").write_text("foo: -1\n")
    pool.send(signal.SIGHUP)
    pool.wait_log("keeping the current config and workers")
    assert (
        "qless-pool.yml: key 'foo': the worker count must not be negative (-1)" in pool.log_text()
    )
    pool.wait_for_workers({"foo": 2})
    assert pool.workers() == before
    (pool.directory / "qless-pool.yml").write_text("foo: 1\n")
    pool.send(signal.SIGHUP)  # a good file afterwards is taken as usual
    pool.wait_for_workers({"foo": 1})


# --- stopping -------------------------------------------------------------------------------------


def test_quit_waits_for_the_running_job_then_exits_with_nothing_left(start_pool, client):
    pool = start_pool(config="foo: 2\n", expect={"foo": 2})
    workers = pool.workers()
    jid = put(client, "foo", "Sleep", {"seconds": 1})
    wait_state(client, jid, "running")
    pool.send(signal.SIGQUIT)
    assert pool.process.wait(timeout=15) == 0
    assert state_of(client, jid) == "complete"
    assert not any(alive(pid) for pid in workers)


def test_int_exits_the_manager_at_once_while_the_worker_finishes_its_job(start_pool, client):
    pool = start_pool(config="foo: 1\n", expect={"foo": 1})
    [worker] = pool.workers()
    jid = put(client, "foo", "Sleep", {"seconds": 2})
    wait_state(client, jid, "running")
    pool.send(signal.SIGINT)
    assert pool.process.wait(timeout=5) == 0
    assert state_of(client, jid) == "running"
    wait_for(lambda: not alive(worker), message="the worker to finish and exit")
    assert state_of(client, jid) == "complete"


def test_ctrl_c_in_a_terminal_reaches_the_manager_only_and_stops_the_pool_once(start_pool):
    pool = start_pool(config="foo: 2\n", expect={"foo": 2})
    workers = pool.workers()
    os.killpg(pool.pid, signal.SIGINT)  # what a terminal does: the foreground process group
    assert pool.process.wait(timeout=5) == 0
    wait_for(lambda: not any(alive(pid) for pid in workers))
    log = pool.log_text()
    assert log.count("INT: stopping every worker after its current job") == 1
    assert log.count("QUIT: finishing the current job") == 2  # each worker, once, by QUIT
    assert "INT: stopping now" not in log  # no worker got the terminal's INT


@pytest.mark.parametrize(
    ("flag", "manager_waits", "job_completes"),
    [
        ("--term-immediate", False, False),
        (None, False, False),  # the default
        ("--term-graceful", False, True),
        ("--term-graceful-wait", True, True),
    ],
)
def test_term_in_each_mode(start_pool, client, flag, manager_waits, job_completes):
    pool = start_pool(*([flag] if flag else []), config="foo: 1\n", expect={"foo": 1})
    [worker] = pool.workers()
    jid = put(client, "foo", "Sleep", {"seconds": 1.5}, retries=3)
    wait_state(client, jid, "running")
    pool.send(signal.SIGTERM)
    assert pool.process.wait(timeout=15) == 0
    if manager_waits:
        assert state_of(client, jid) == "complete" and not alive(worker)
    else:
        assert alive(worker) or state_of(client, jid) != "running"
    wait_for(lambda: not alive(worker))
    if job_completes:
        wait_state(client, jid, "complete")
    else:  # killed and handed back for another attempt
        job = client.jobs[jid]
        assert (job.state, job.retries_left) == ("waiting", 2)


def test_int_during_a_quit_wait_stops_waiting(start_pool, client):
    pool = start_pool(config="foo: 1\n", expect={"foo": 1})
    jid = put(client, "foo", "Sleep", {"seconds": 30})
    wait_state(client, jid, "running")
    pool.send(signal.SIGQUIT)
    pool.wait_log("QUIT: stopping every worker")
    pool.send(signal.SIGINT)
    assert pool.process.wait(timeout=5) == 0
    assert state_of(client, jid) == "running"  # its worker is still finishing it


def test_term_during_a_quit_wait_stops_the_workers_now(start_pool, client):
    pool = start_pool(config="foo: 1\n", expect={"foo": 1})
    [worker] = pool.workers()
    jid = put(client, "foo", "Sleep", {"seconds": 30}, retries=3)
    wait_state(client, jid, "running")
    pool.send(signal.SIGQUIT)
    pool.wait_log("QUIT: stopping every worker")
    pool.send(signal.SIGTERM)
    assert pool.process.wait(timeout=5) == 0
    wait_for(lambda: not alive(worker))
    assert (state_of(client, jid), client.jobs[jid].retries_left) == ("waiting", 2)


# --- other signals --------------------------------------------------------------------------------


def test_winch_in_the_foreground_is_ignored(start_pool):
    pool = start_pool("--log-level", "debug", config="foo: 2\n", expect={"foo": 2})
    before = pool.workers()
    pool.send(signal.SIGWINCH)
    pool.wait_log("WINCH ignored: not running as a daemon")
    pool.send(signal.SIGUSR2)  # handled after the WINCH: once it is, the WINCH surely was too
    wait_for(lambda: all(PAUSED.match(t) for t in pool.worker_titles().values()))
    assert pool.workers() == before


def test_usr2_pauses_and_cont_resumes_every_worker(start_pool, client):
    pool = start_pool(config="foo: 1\nbar: 2\n", expect={"foo": 1, "bar": 2})
    workers = pool.workers()
    pool.send(signal.SIGUSR2)
    wait_for(lambda: all(PAUSED.match(t) for t in pool.worker_titles().values()), message="Paused")
    jid = put(client, "bar", "Noop")
    pool.send(signal.SIGCONT)
    pool.wait_for_workers({"foo": 1, "bar": 2})
    wait_state(client, jid, "complete")
    assert pool.workers() == workers  # forwarded, not restarted


def test_usr1_is_passed_on_and_kills_the_running_job(start_pool, client):
    pool = start_pool(config="foo: 1\n", expect={"foo": 1})
    [worker] = pool.workers()
    jid = put(client, "foo", "Sleep", {"seconds": 30, "once": True})
    wait_state(client, jid, "running")
    pool.send(signal.SIGUSR1)
    wait_state(client, jid, "complete")  # its second attempt does not sleep
    assert pool.workers() == [worker]


# --- keeping the counts ---------------------------------------------------------------------------


def blocked_signals(pid: int) -> int:
    with open(f"/proc/{pid}/status") as file:
        return int(next(line for line in file if line.startswith("SigBlk:")).split()[1], 16)


def test_workers_and_job_children_run_with_no_signal_blocked(start_pool, client, redis_conn):
    # The manager blocks its signals across each fork; nothing may stay blocked afterwards (a
    # blocked mask is inherited by everything a job runs, even across exec).
    pool = start_pool(config="foo: 1\n", expect={"foo": 1})
    [worker] = pool.workers()
    assert blocked_signals(worker) == 0
    jid = put(client, "foo", "SignalMask")
    wait_state(client, jid, "complete")
    assert runs(redis_conn)[0]["blocked"] == []


def test_a_worker_killed_with_9_is_replaced(start_pool):
    pool = start_pool(config="foo: 1\nbar: 1\n", expect={"foo": 1, "bar": 1})
    victim = next(pid for pid, t in pool.worker_titles().items() if t.endswith("Waiting for bar"))
    os.kill(victim, signal.SIGKILL)
    pool.wait_log(f"worker {victim} (bar) died: killed by SIGKILL")
    workers = pool.wait_for_workers({"foo": 1, "bar": 1})
    assert victim not in workers


def test_a_worker_whose_hook_fails_on_every_start_is_backed_off(start_pool, tmp_path):
    pool = start_pool(
        "-m",
        "poolapp",
        config="foo: 1\n",
        env={"POOLAPP_HOOK_FAILS": "1"},
    )
    # 1 s, 2 s, 4 s: the third failure in a row is logged before the fourth start.
    pool.wait_log("backing off: next start in 4s", timeout=15)
    log = pool.log_text()
    assert log.count("spawned worker") == 3
    assert "RuntimeError: the database is down" in log  # with the traceback
    assert "Traceback" in log
    assert alive(pool.pid)


def test_kill_9_of_the_manager_lets_the_workers_finish_their_jobs_and_exit(start_pool, client):
    pool = start_pool(config="foo: 2\n", expect={"foo": 2})
    workers = pool.workers()
    jid = put(client, "foo", "Sleep", {"seconds": 1.5})
    waiting = put(client, "foo", "Noop", delay=0)
    wait_state(client, jid, "running")
    wait_state(client, waiting, "complete")
    pool.process.kill()
    pool.process.wait(timeout=5)
    wait_for(lambda: not any(alive(pid) for pid in workers), timeout=15)
    assert state_of(client, jid) == "complete"


# --- preload and hooks ----------------------------------------------------------------------------


def test_preload_runs_once_in_the_manager_and_after_prefork_once_in_every_worker(
    start_pool, tmp_path
):
    hook_log = tmp_path / "hooks.log"
    pool = start_pool(
        "-m",
        "poolapp",
        "-E",
        "production",
        env={"POOLAPP_HOOK_LOG": str(hook_log)},
        expect=PRODUCTION,
    )
    lines = [line.split() for line in hook_log.read_text().splitlines()]
    workers = pool.workers()
    assert sorted(int(pid) for pid, *_ in lines) == workers  # once in every worker
    assert {(int(ppid), int(loaded_in)) for _, ppid, loaded_in, _ in lines} == {
        (pool.pid, pool.pid)
    }
    assert sorted(queues for *_, queues in lines) == sorted(
        ["foo", "bar", "bar", "foo,bar,baz", "foo,bar,baz", "foo,bar,baz", "foo,bar,baz"]
    )


def test_a_preload_that_fails_stops_the_start_with_its_traceback(start_pool):
    pool = start_pool("-m", "no_such_module_here")
    assert pool.process.wait(timeout=10) == 1
    assert "preloading no_such_module_here failed" in pool.log_text()
    assert "ModuleNotFoundError" in pool.log_text()


def memory(pid: int, *fields: str) -> int:
    """The sum of ``fields`` of /proc/<pid>/smaps_rollup, in bytes."""
    total = 0
    with open(f"/proc/{pid}/smaps_rollup") as file:
        for line in file:
            if line.split(":")[0] in fields:
                total += int(line.split()[1]) * 1024
    return total


def unique_memory(pid: int) -> int:
    """USS: the memory only this process holds."""
    return memory(pid, "Private_Clean", "Private_Dirty")


def test_preloaded_memory_stays_shared_between_workers(start_pool, client, tmp_path, redis_conn):
    hook_log = tmp_path / "hooks.log"
    pool = start_pool(
        "-m",
        "poolapp:build_ballast",
        config="foo: 4\n",
        # A full collection in every worker: without gc.freeze it would touch (and so copy)
        # every preloaded object.
        env={
            "POOLAPP_BALLAST_MB": "100",
            "POOLAPP_COLLECT": "1",
            "POOLAPP_HOOK_LOG": str(hook_log),
        },
        expect={"foo": 4},
    )
    manager_rss = memory(pool.pid, "Rss")
    assert manager_rss > 80 * 1024 * 1024  # the ballast is there
    # Jobs long enough that a busy worker leaves the next ones to the others: each runs some.
    jids = [put(client, "foo", "Sleep", {"seconds": 0.3}) for _ in range(12)]
    for jid in jids:
        wait_state(client, jid, "complete")
    workers = pool.workers()
    assert len(workers) == 4
    assert {run["ppid"] for run in runs(redis_conn)} == set(workers)
    added = sum(unique_memory(pid) for pid in workers)
    print(f"manager RSS {manager_rss >> 20} MiB; 4 workers add {added >> 20} MiB of their own")
    assert added < 40 * 1024 * 1024  # far less than 4 x 100 MB


# --- the command line and run() -------------------------------------------------------------------


def test_help_lists_every_option():
    result = subprocess.run([SCRIPT, "--help"], capture_output=True, text=True, timeout=30)
    for option in (
        "--config", "--environment", "--appname", "--redis", "--preload", "--include",
        "--spawn-delay", "--interval", "--dry-run", "--reserver", "--no-fork-per-job",
        "--job-timeout", "--single-process-group", "--log-level", "--term-graceful-wait",
        "--term-graceful", "--term-immediate", "--version", "--daemon", "--pidfile",
        "--no-pidfile", "--stdout", "--stderr", "--nosync", "--lock",
    ):  # fmt: skip
        assert option in result.stdout, option


def test_spawn_delay_spaces_the_spawns(start_pool):
    pool = start_pool("-s", "0.3", config="foo: 3\n", expect={"foo": 3})
    stamps = [
        time.mktime(time.strptime(line[:19], "%Y-%m-%d %H:%M:%S")) + int(line[20:23]) / 1000
        for line in pool.log_text().splitlines()
        if "spawned worker" in line
    ]
    assert len(stamps) == 3
    assert all(b - a >= 0.25 for a, b in zip(stamps, stamps[1:])), stamps


def test_single_process_group_keeps_workers_in_the_managers_group(start_pool):
    pool = start_pool("--single-process-group", config="foo: 2\n", expect={"foo": 2})
    assert {os.getpgid(pid) for pid in pool.workers()} == {pool.pid}


def test_run_from_a_plain_script(redis_url, tmp_path, client):
    (tmp_path / "pool.yml").write_text("foo: 1\nproduction:\n  foo: 2\n")
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(TESTS)!r})
        import qless_pool
        sys.exit(qless_pool.run("pool.yml", "production", redis_url={redis_url!r},
                                preload_modules=["poolapp"], interval=0.2, appname="script"))
        """
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script], cwd=tmp_path, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for(lambda: len(children(process.pid)) == 2)
        assert MANAGER.match(title(process.pid)).group(1) == "[script]"
        jid = put(client, "foo", "Noop")
        wait_state(client, jid, "complete")
        process.send_signal(signal.SIGQUIT)
        assert process.wait(timeout=10) == 0
    finally:
        kill_tree(process.pid)
        kill_processes_in(tmp_path)
        process.wait(timeout=10)
        reap_orphans()


# --- one log line per job -------------------------------------------------------------------------


@pytest.mark.parametrize("fork_per_job", [True, False], ids=["fork", "in-process"])
def test_one_info_line_per_finished_job(start_pool, client, fork_per_job):
    args = [] if fork_per_job else ["--no-fork-per-job"]
    pool = start_pool(*args, config="foo: 1\n", expect={"foo": 1})
    done, failed = put(client, "foo", "Noop"), put(client, "foo", "Fail")
    wait_state(client, done, "complete")
    wait_state(client, failed, "failed")
    pool.wait_log(f"job {failed} (testjobs.Fail) from foo: failed (foo-ValueError) in ")
    log = pool.log_text()
    assert re.search(
        rf"INFO: job {done} \(testjobs\.Noop\) from foo: completed in \d+\.\d{{3}}s$", log, re.M
    )
    assert log.count(f"job {done} ") == 1


def test_log_level_warning_hides_the_job_lines(start_pool, client):
    pool = start_pool("--log-level", "warning", config="foo: 1\n")
    pool.wait_for_workers({"foo": 1})
    jid = put(client, "foo", "Noop")
    wait_state(client, jid, "complete")
    pool.send(signal.SIGQUIT)
    pool.process.wait(timeout=15)
    assert jid not in pool.log_text()
