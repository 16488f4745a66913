"""Watching and steering a running pool: qless-pool status, recycling, the graceful timeout,
Prometheus metrics. Real pools, real jobs."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
from pools import free_port, scrape
from processes import alive, children, stays, title, wait_for
from workers import WAITING, put, runs, state, wait_state

SCRIPT = os.path.join(os.path.dirname(sys.executable), "qless-pool")


def status(pool, *args, timeout=30, env=None):
    return subprocess.run(
        [SCRIPT, "status", "--pid", str(pool.pid), *args],
        capture_output=True, text=True, timeout=timeout, cwd=pool.directory,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


def status_json(pool, env=None) -> dict:
    result = status(pool, "--json", env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


# --- qless-pool status ----------------------------------------------------------------------------


def test_status_shows_the_manager_groups_workers_and_queues(start_pool, client):
    pool = start_pool(
        "-E", "production", config='foo: 1\nproduction:\n  "bar,foo": 2\n', expect=None
    )
    pool.wait_for_workers({"foo": 1, "bar,foo": 2})
    jid = put(client, "bar", "Sleep", {"seconds": 30})
    done = [put(client, "foo", "Noop") for _ in range(3)]
    failed = put(client, "foo", "Fail")
    for finished in [*done, failed]:
        wait_state(client, finished, "complete", "failed")
    wait_state(client, jid, "running")
    later = put(client, "bar", "Noop", delay=600)
    snapshot = wait_for(
        lambda: (s := status_json(pool)) and any(w["job"] for w in s["workers"]) and s
    )
    manager = snapshot["manager"]
    assert manager["pid"] == pool.pid
    assert (manager["appname"], manager["config"], manager["environment"]) == (
        "testapp", "qless-pool.yml", "production",
    )  # fmt: skip
    assert snapshot["groups"] == [
        {"queues": ["foo"], "desired": 1, "live": 1, "backoff_until": None},
        {"queues": ["bar", "foo"], "desired": 2, "live": 2, "backoff_until": None},
    ]
    # The workers are the manager's children, as ps shows them.
    workers = {w["pid"]: w for w in snapshot["workers"]}
    assert sorted(workers) == sorted(pool.workers())
    busy = next(w for w in workers.values() if w["job"])
    assert busy["state"] == "processing"
    assert busy["job"]["jid"] == jid
    assert (busy["job"]["klass"], busy["job"]["queue"]) == ("testjobs.Sleep", "bar")
    assert busy["job"]["running_for"] >= 0
    assert title(busy["job_child"]).startswith("qless-") and "Processing bar" in title(
        busy["job_child"]
    )
    assert {w["state"] for w in workers.values() if w is not busy} == {"waiting"}
    assert sum(w["jobs_done"] for w in workers.values()) == 4
    assert all(w["rss_bytes"] > 1 << 20 for w in workers.values())
    assert snapshot["healthy"] is True and snapshot["problems"] == []
    assert snapshot["queues"]["bar"]["running"] == 1
    assert snapshot["queues"]["bar"]["scheduled"] == 1
    assert snapshot["queues"]["foo"]["failed"] == {"foo-ValueError": 1}
    client.jobs[later].cancel()
    # The text: the same, for a terminal.
    text = status(pool)
    assert text.returncode == 0
    assert f"qless-pool-manager[testapp] pid {pool.pid}" in text.stdout
    assert re.search(r"^bar,foo\s+2/2$", text.stdout, re.MULTILINE)
    assert re.search(
        rf"^{busy['pid']}\s+bar,foo\s+processing\s+\d+\s+\d+M\s+{jid}", text.stdout, re.M
    )
    assert re.search(r"^foo\s+0\s+0\s+0\s+0\s+0\s+0\s+foo-ValueError 1$", text.stdout, re.M)


def test_check_exit_codes(start_pool, client, tmp_path):
    pool = start_pool(config="foo: 1\n", expect={"foo": 1})
    assert status(pool, "--check").returncode == 0
    assert status(pool, "--check").stdout == ""
    jid = put(client, "foo", "Sleep", {"seconds": 30})
    wait_state(client, jid, "running")
    pool.send(signal.SIGQUIT)  # stopping: waits for the job
    wait_for(lambda: status(pool, "--check").returncode == 1, message="check says 1 (stopping)")
    client.jobs[jid].cancel()  # the job child is killed; the pool ends
    pool.process.wait(timeout=15)
    assert status(pool, "--check").returncode == 3  # no pool any more
    # A stale pidfile, and none at all.
    (tmp_path / "stale.pid").write_text(f"{pool.pid}\n")
    for args in (["-p", str(tmp_path / "stale.pid")], ["-p", str(tmp_path / "none.pid")]):
        result = subprocess.run(
            [SCRIPT, "status", "--check", *args], capture_output=True, text=True, timeout=30
        )
        assert (result.returncode, result.stdout, result.stderr) == (3, "", "")
    result = subprocess.run(
        [SCRIPT, "status", "-p", str(tmp_path / "none.pid")], capture_output=True, text=True
    )
    assert result.returncode == 3 and "no pool is running" in result.stderr


def test_check_says_1_while_a_group_is_short(start_pool):
    pool = start_pool("-m", "poolapp", config="foo: 1\n", env={"POOLAPP_HOOK_FAILS": "1"})
    pool.wait_log("backing off")
    assert status(pool, "--check").returncode == 1
    snapshot = status_json(pool)
    assert snapshot["healthy"] is False
    assert any("foo: 0 of 1 workers" in problem for problem in snapshot["problems"])


def test_watch_refreshes_until_ctrl_c(start_pool):
    pool = start_pool(config="foo: 1\n", expect={"foo": 1})
    screen = pool.directory / "watch.out"
    with open(screen, "w") as out:
        process = subprocess.Popen(
            [SCRIPT, "status", "--pid", str(pool.pid), "--watch", "0.2"],
            stdout=out, text=True, cwd=pool.directory,
        )  # fmt: skip
    try:
        clears = lambda: screen.read_text().count("\x1b[H\x1b[2J")  # noqa: E731
        wait_for(lambda: clears() >= 3, message="three refreshes")
        process.send_signal(signal.SIGINT)
        process.wait(timeout=10)
    finally:
        process.kill()
    assert process.returncode == 0
    assert screen.read_text().count(f"pid {pool.pid}") >= 3


def test_the_state_is_private_and_removed_at_exit(start_pool):
    pool = start_pool(config="foo: 1\n", expect={"foo": 1})
    root = os.environ.get("QLESS_POOL_RUNTIME_DIR", "/dev/shm")
    directory = os.path.join(root, f"qless-pool-{os.getuid()}", str(pool.pid))
    wait_for(lambda: os.path.exists(os.path.join(directory, "manager.json")))
    assert os.stat(directory).st_mode & 0o777 == 0o700
    for name in os.listdir(directory):
        assert os.stat(os.path.join(directory, name)).st_mode & 0o077 == 0, name
    pool.send(signal.SIGQUIT)
    pool.process.wait(timeout=15)
    assert not os.path.exists(directory)


def replacements(pool, old: int) -> list[int]:
    """Waiting workers other than ``old`` that the manager says it spawned (not ``old``'s standby
    child, adopted by the manager for the moment it takes to die, which still has the worker's
    title if it was forked a moment before)."""
    spawned = {int(pid) for pid in re.findall(r"spawned worker (\d+) for", pool.log_text())}
    return [
        pid
        for pid, text in pool.worker_titles().items()
        if pid != old and pid in spawned and WAITING.match(text)
    ]


def test_a_pool_whose_state_directory_is_removed_makes_it_again(
    start_pool, client, redis_conn, tmp_path
):
    # systemd-logind's RemoveIPC (the pool's user has no session left), a tmpfs cleaner.
    runtime = tmp_path / "run"
    runtime.mkdir()
    env = {"QLESS_POOL_RUNTIME_DIR": str(runtime)}
    pool = start_pool(config="foo: 1\n", env=env, expect={"foo": 1})
    base = runtime / f"qless-pool-{os.getuid()}"
    wait_for(lambda: (base / str(pool.pid) / "manager.json").exists())
    shutil.rmtree(base)
    # Made again within a second: status works again.
    wait_for(lambda: status(pool, env=env).returncode == 0, message="status to work again")
    pool.wait_log("was removed under it; making it again")
    [old] = pool.workers()
    os.kill(old, signal.SIGKILL)
    [new] = wait_for(lambda: replacements(pool, old), message="a new worker")
    jid = put(client, "foo", "Noop")
    wait_state(client, jid, "complete")
    assert runs(redis_conn)[-1]["ppid"] == new
    snapshot = wait_for(
        lambda: (s := status_json(pool, env)) and s["workers"][0]["jobs_done"] == 1 and s
    )
    assert [(w["pid"], w["state"]) for w in snapshot["workers"]] == [(new, "waiting")]
    assert snapshot["healthy"] is True
    assert "cannot write the pool's state" not in pool.log_text()


def test_a_pool_whose_state_directory_cannot_be_made_again_runs_jobs_without_it(
    start_pool, client, redis_conn, tmp_path
):
    runtime = tmp_path / "run"
    runtime.mkdir()
    env = {"QLESS_POOL_RUNTIME_DIR": str(runtime)}
    port = free_port()
    pool = start_pool("--metrics-port", str(port), config="foo: 1\n", env=env, expect={"foo": 1})
    base = runtime / f"qless-pool-{os.getuid()}"
    directory = base / str(pool.pid)
    wait_for(lambda: (directory / "manager.json").exists())
    scrape(port)  # the metrics helper is up
    # Gone, with the metrics' directory beside it, and files in the way of making them again.
    [multiproc] = base.glob("metrics-*")
    shutil.rmtree(base)
    base.mkdir(mode=0o700)
    directory.write_text("")
    multiproc.write_text("")
    [old] = pool.workers()
    os.kill(old, signal.SIGKILL)
    [helper] = [p for p in children(pool.pid) if title(p).startswith("qless-pool-metrics")]
    os.kill(helper, signal.SIGKILL)  # its replacement starts without the directory
    # Its replacement starts, and runs jobs, without a record and without counting them.
    [new] = wait_for(lambda: replacements(pool, old), message="a new worker")
    jids = [put(client, "foo", "Noop") for _ in range(2)]
    for jid in jids:
        wait_state(client, jid, "complete")
    assert [run["ppid"] for run in runs(redis_conn)] == [new, new]
    log = pool.log_text()
    assert log.count(f"[{new}] WARNING: no record for qless-pool status: ") == 1
    assert log.count(f"[{new}] WARNING: cannot count jobs for the metrics: ") == 1
    # The manager says so once, not on every turn of its loop.
    pool.wait_log("cannot write the pool's state (for qless-pool status): ")
    # A turn or two more (TICK is 1 s): it must not say it again.
    stays(lambda: pool.log_text().count("cannot write the pool's state") == 1, 1.5)
    log = pool.log_text()
    assert log.count("was removed under it") == 1
    for args in ((), ("--check",)):
        result = status(pool, *args, env=env)
        assert result.returncode == 1  # a pool, in a state nobody can tell
    assert result.stderr == ""  # --check says nothing
    assert f"pool {pool.pid} is running, but its state is not in {directory}: " in (
        status(pool, env=env).stderr
    )
    # Still served (but the job counts, and the workers that manager.json would list).
    samples = wait_for(lambda: scrape(port), message="a new metrics helper")
    assert 'qless_pool_workers{state="waiting"}' in samples
    assert not any(name.startswith("qless_pool_jobs_total") for name in samples)
    assert pool.log_text().count("no job metrics until it is back") == 1


# --- recycling ------------------------------------------------------------------------------------


def test_a_worker_is_recycled_after_max_jobs(start_pool, client, redis_conn):
    pool = start_pool("--max-jobs", "3", config="foo: 1\n", expect={"foo": 1})
    [first] = pool.workers()
    jids = [put(client, "foo", "Noop") for _ in range(7)]
    for jid in jids:
        wait_state(client, jid, "complete")
    workers = [run["ppid"] for run in runs(redis_conn)]
    assert workers[:3] == [first] * 3 and workers[3] != first  # 3 jobs each, then replaced
    assert len(set(workers)) == 3
    pool.wait_log("recycling: it ran 3 jobs (--max-jobs)", count=2)
    log = pool.log_text()
    assert "died" not in log and "backing off" not in log  # a recycle is not a failure
    assert status_json(pool)["manager"]["restarts"]["recycled"] >= 2


def test_max_jobs_jitter_spreads_the_restarts(start_pool, client, redis_conn):
    pool = start_pool("--max-jobs", "2", "--max-jobs-jitter", "3", config="foo: 1\n")
    pool.wait_for_workers({"foo": 1})
    jids = [put(client, "foo", "Noop") for _ in range(40)]
    for jid in jids:
        wait_state(client, jid, "complete")
    per_worker = {}
    for run in runs(redis_conn):
        per_worker[run["ppid"]] = per_worker.get(run["ppid"], 0) + 1
    full = list(per_worker.values())[:-1]  # the last worker has not reached its limit
    assert all(2 <= n <= 5 for n in full), full
    assert len(set(full)) > 1  # not all the same


def test_a_worker_above_max_memory_is_recycled(start_pool, client):
    # Every worker parent holds more than 5 MB: each recycles after its first job.
    pool = start_pool("--max-memory", "5", config="foo: 1\n", expect={"foo": 1})
    jids = [put(client, "foo", "Noop") for _ in range(2)]
    for jid in jids:
        wait_state(client, jid, "complete")
    pool.wait_log("is above --max-memory 5 MB")


def test_a_job_child_above_max_memory_is_killed_and_handed_back(start_pool, client):
    pool = start_pool("--max-memory", "200", config="foo: 1\n", expect={"foo": 1})
    jid = put(client, "foo", "Hog", {"mb": 400, "seconds": 30}, retries=1)
    # Killed on each attempt (about a second in), handed back once, then out of retries.
    wait_state(client, jid, "failed", timeout=20)
    failure = client.jobs[jid].failure
    assert failure["group"] == "foo-DirtyExit"
    assert "its own memory" in failure["message"]
    assert "went above --max-memory 200 MB" in failure["message"]
    assert pool.log_text().count("went above --max-memory 200 MB (job") == 2
    assert pool.workers()  # the worker parent itself is fine


# --- the shutdown deadline ------------------------------------------------------------------------


@pytest.mark.parametrize("fork_per_job", [True, False], ids=["fork", "in-process"])
def test_graceful_timeout_cuts_a_stuck_job_short_on_quit(
    start_pool, client, redis_conn, fork_per_job
):
    args = ["--graceful-timeout", "1"] + ([] if fork_per_job else ["--no-fork-per-job"])
    pool = start_pool(*args, config="foo: 1\n", expect={"foo": 1})
    jid = put(client, "foo", "Sleep", {"seconds": 60}, retries=3)
    wait_for(lambda: runs(redis_conn), message="the job to start")  # not only popped
    sent = time.monotonic()
    pool.send(signal.SIGQUIT)
    assert pool.process.wait(timeout=15) == 0
    took = time.monotonic() - sent
    assert 0.9 <= took < 10
    job = client.jobs[jid]
    assert (job.state, job.retries_left) == ("waiting", 2)
    assert job.failure["group"] == "foo-DirtyExit"
    assert "after the worker was told to stop (--graceful-timeout)" in job.failure["message"]


def test_without_graceful_timeout_quit_waits_for_the_job(start_pool, client):
    pool = start_pool(config="foo: 1\n", expect={"foo": 1})
    jid = put(client, "foo", "Sleep", {"seconds": 2})
    wait_state(client, jid, "running")
    pool.send(signal.SIGQUIT)
    assert pool.process.wait(timeout=15) == 0
    assert state(client, jid) == "complete"


# --- Prometheus metrics ---------------------------------------------------------------------------


def test_metrics_after_real_jobs(start_pool, client):
    port = free_port()
    pool = start_pool(
        "--metrics-port", str(port), "--max-jobs", "4", config='foo: 2\n"bar,foo": 1\n'
    )
    pool.wait_for_workers({"foo": 2, "bar,foo": 1})
    ok = [put(client, "foo", "Noop") for _ in range(10)]
    failing = [put(client, "bar", "Fail") for _ in range(2)]
    exiting = put(client, "bar", "Exit", retries=1)
    for jid in [*ok, *failing, exiting]:
        wait_state(client, jid, "complete", "failed")
    slow = put(client, "bar", "Sleep", {"seconds": 30})
    wait_state(client, slow, "running")
    waiting = put(client, "foo", "Noop", delay=600)

    def settled(samples):
        # The worker gauge is read from each worker's own record, written at its next turn.
        return (
            samples.get('qless_pool_jobs_total{outcome="completed",queue="foo"}') == 10
            and samples.get('qless_pool_workers{state="processing"}') == 1
            and samples.get('qless_pool_workers{state="waiting"}') == 2
        )

    last = {}

    def scraped_and_settled():
        last.update(scrape(port))
        return settled(last) and dict(last)

    try:
        samples = wait_for(scraped_and_settled, message="the metrics to settle")
    except AssertionError as error:
        workers = {k: v for k, v in last.items() if k.startswith("qless_pool_workers")}
        raise AssertionError(f"{error}; last scrape: {workers}") from None
    # The Exit job was handed back once, then failed out of retries.
    assert samples['qless_pool_jobs_total{outcome="failed",queue="bar"}'] == 3
    # qless's failed jobs by group, as qless counts them.
    groups = json.loads(client("failed"))
    assert sum(groups.values()) == 3
    failed = {k: v for k, v in samples.items() if k.startswith("qless_pool_failed_jobs{")}
    assert failed == {f'qless_pool_failed_jobs{{group="{g}"}}': n for g, n in groups.items()}
    assert samples['qless_pool_jobs_total{outcome="retried",queue="bar"}'] == 1
    assert samples['qless_pool_job_duration_seconds_count{queue="foo"}'] == 10
    assert samples['qless_pool_job_duration_seconds_bucket{le="+Inf",queue="foo"}'] == 10
    assert samples['qless_pool_workers{state="processing"}'] == 1
    assert samples['qless_pool_workers{state="waiting"}'] == 2
    assert samples['qless_pool_queue_jobs{queue="bar",state="running"}'] == 1
    assert samples['qless_pool_queue_jobs{queue="foo",state="scheduled"}'] == 1
    # 13 jobs with --max-jobs 4: workers were recycled, and their counts were kept.
    assert samples['qless_pool_worker_restarts_total{reason="recycled"}'] >= 2
    assert samples['qless_pool_worker_restarts_total{reason="died"}'] == 0
    helpers = [p for p in children(pool.pid) if title(p).startswith("qless-pool-metrics")]
    assert len(helpers) == 1
    client.jobs[waiting].cancel()
    # The helper dies with the manager.
    pool.process.kill()
    pool.process.wait(timeout=10)
    wait_for(lambda: not alive(helpers[0]), timeout=2, message="the metrics helper to die")


def test_an_idle_connection_does_not_stop_the_scrapes_and_is_dropped(start_pool):
    import socket

    port = free_port()
    pool = start_pool("--metrics-port", str(port), config="foo: 1\n", expect={"foo": 1})
    scrape(port)  # the helper is up
    with socket.create_connection(("127.0.0.1", port), timeout=10) as idle:  # says nothing
        connected = time.monotonic()
        for _ in range(3):
            started = time.monotonic()
            assert scrape(port, timeout=5)['qless_pool_workers{state="waiting"}'] == 1
            assert time.monotonic() - started < 5
        # Dropped after the helper's timeout (10 s), not held (with a thread) for ever.
        idle.settimeout(20)
        assert idle.recv(1) == b""
        assert 9 < time.monotonic() - connected < 20
    assert pool.process.poll() is None


def test_a_multiprocess_file_that_cannot_be_read_is_left_out(start_pool, client, tmp_path):
    import struct

    runtime = tmp_path / "run"
    runtime.mkdir()
    port = free_port()
    pool = start_pool(
        "--metrics-port", str(port), config="foo: 1\n",
        env={"QLESS_POOL_RUNTIME_DIR": str(runtime)}, expect={"foo": 1},
    )  # fmt: skip
    scrape(port)  # the helper is up
    [multiproc] = (runtime / f"qless-pool-{os.getuid()}").glob("metrics-*")
    # Files prometheus_client cannot read (it claims 100 bytes, then an entry of 500): one of a
    # live process (the manager's pid), one of an exited one (folding reads it), the archive.
    broken = struct.pack("<iii4s", 100, 0, 500, b"junk")
    gone = subprocess.Popen(["true"])
    gone.wait()
    for name in (f"counter_{pool.pid}.db", f"counter_{gone.pid}.db", "histogram_archive.db"):
        (multiproc / name).write_bytes(broken)
    jids = [put(client, "foo", "Noop") for _ in range(2)]
    for jid in jids:
        wait_state(client, jid, "complete")
    completed = 'qless_pool_jobs_total{outcome="completed",queue="foo"}'
    wait_for(lambda: scrape(port).get(completed) == 2, message="the jobs counted")
    assert scrape(port)[completed] == 2  # and again
    log = pool.log_text()
    assert log.count(f"leaving {multiproc}/counter_{pool.pid}.db out of the job metrics: ") == 1
    assert log.count(f"counter_{gone.pid}.db cannot be read") == 1
    assert log.count(f"leaving {multiproc}/histogram_archive.db out of the job metrics: ") == 1
    assert (multiproc / f"counter_{gone.pid}.db.broken").exists()


def test_metrics_without_the_extra_is_refused(tmp_path):
    (tmp_path / "qless-pool.yml").write_text("foo: 1\n")
    script = (
        "import sys; sys.modules['prometheus_client'] = None; "
        "from qless_pool.__main__ import main; "
        "sys.exit(main(['--metrics-port', '9999', '--dry-run']))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert result.stderr == (
        "qless-pool: --metrics-port needs prometheus_client: pip install 'qless-pool[metrics]'\n"
    )


def test_a_metrics_port_in_use_fails_the_start(tmp_path, redis_url):
    import socket

    (tmp_path / "qless-pool.yml").write_text("foo: 1\n")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = subprocess.run(
            [SCRIPT, "-R", redis_url, "--metrics-port", str(port)],
            cwd=tmp_path, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
    assert result.returncode == 69
    assert f"cannot serve metrics on 127.0.0.1:{port}: Address already in use" in result.stderr
