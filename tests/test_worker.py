"""The worker, as a real process on a real Redis: reservation, forking, supervision, signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from processes import alive, kill_tree, stays, title, wait_for
from workers import (
    FORKED,
    PAUSED,
    PROCESSING,
    TESTS,
    WAITING,
    history_events,
    put,
    python_path,
    runs,
    state,
    wait_state,
)

from qless_pool.client import connect

# --- reserving ------------------------------------------------------------------------------------


def test_ordered_reservation_drains_the_first_queue_first(start_worker, client, redis_conn):
    bar = [put(client, "bar", "Noop") for _ in range(3)]  # older, but in the second queue
    foo = [put(client, "foo", "Noop") for _ in range(3)]
    start_worker(["foo", "bar"])
    wait_for(lambda: len(runs(redis_conn)) == 6, message="all six jobs to run")
    assert [run["jid"] for run in runs(redis_conn)] == foo + bar


@pytest.mark.parametrize("reserver", ["round-robin", "shuffled-round-robin"])
def test_round_robin_reservers_alternate_between_queues(start_worker, client, redis_conn, reserver):
    for _ in range(3):
        put(client, "foo", "Noop")
        put(client, "bar", "Noop")
    start_worker(["foo", "bar"], reserver=reserver)
    wait_for(lambda: len(runs(redis_conn)) == 6, message="all six jobs to run")
    queues = [run["queue"] for run in runs(redis_conn)]
    assert all(a != b for a, b in zip(queues, queues[1:])), queues


def test_unknown_reserver_is_refused():
    from qless_pool.worker import Worker

    with pytest.raises(ValueError, match="unknown reserver 'fastest'"):
        Worker(["foo"], reserver="fastest")


def test_worker_makes_the_run_mode_asked_for():
    from qless_pool.worker import ForkingWorker, InProcessWorker, Worker

    assert type(Worker(["foo"])) is ForkingWorker
    assert type(Worker(["foo"], fork_per_job=True)) is ForkingWorker
    assert type(Worker(["foo"], fork_per_job=False)) is InProcessWorker
    assert type(InProcessWorker(["foo"])) is InProcessWorker
    with pytest.raises(ValueError, match="ForkingWorker is the run mode fork_per_job=True"):
        ForkingWorker(["foo"], fork_per_job=False)


def test_a_put_wakes_an_idle_worker_at_once(start_worker, client, redis_conn):
    worker = start_worker(["foo", "bar"], interval=60)
    wait_for(lambda: WAITING.match(worker.title()))
    # Idle means subscribed to ql:log (confirmed before its last look at the queues).
    wait_for(lambda: dict(redis_conn.pubsub_numsub("ql:log")).get("ql:log") == 1)
    put_at = time.time()
    jid = put(client, "bar", "Noop")
    wait_state(client, jid, "complete", timeout=5)
    popped_at = next(e["when"] for e in client.jobs[jid].history if e["what"] == "popped")
    assert popped_at - put_at < 0.5  # not the 60 s poll


@pytest.mark.parametrize("fork_per_job", [True, False], ids=["fork", "inproc"])
def test_an_idle_worker_whose_subscription_is_cut_listens_again(
    start_worker, client, redis_conn, fork_per_job
):
    # Redis drops a subscriber (CLIENT KILL, its output buffer's limit): the worker reads the
    # pubsub connection itself, so it sees the close as a short outage and subscribes again.
    worker = start_worker(["foo"], interval=60, fork_per_job=fork_per_job)
    wait_for(lambda: dict(redis_conn.pubsub_numsub("ql:log")).get("ql:log") == 1)
    assert redis_conn.client_kill_filter(_type="pubsub") >= 1
    wait_for(lambda: dict(redis_conn.pubsub_numsub("ql:log")).get("ql:log") == 1, timeout=10)
    put_at = time.time()
    jid = put(client, "foo", "Noop")
    wait_state(client, jid, "complete", timeout=5)
    popped_at = next(e["when"] for e in client.jobs[jid].history if e["what"] == "popped")
    assert popped_at - put_at < 0.5  # heard, not the 60 s poll
    assert "Redis is back" in worker.log_text()


@pytest.mark.parametrize("fork_per_job", [True, False], ids=["fork", "inproc"])
def test_a_worker_on_resp3_hears_puts_and_news_of_its_held_jobs(
    start_worker, client, redis_url, redis_conn, fork_per_job
):
    # RESP3 sends qless's messages as push replies: read as messages, not skipped (which
    # would also leave the read waiting out its timeout, an outage).
    url = redis_url + ("&" if "?" in redis_url else "?") + "protocol=3"
    worker = start_worker(["foo"], url=url, interval=60, fork_per_job=fork_per_job)
    wait_for(lambda: dict(redis_conn.pubsub_numsub("ql:log")).get("ql:log") == 1)
    put_at = time.time()
    jid = put(client, "foo", "Noop")
    wait_state(client, jid, "complete", timeout=5)
    popped_at = next(e["when"] for e in client.jobs[jid].history if e["what"] == "popped")
    assert popped_at - put_at < 0.5  # heard, not the 60 s poll
    assert "Redis is unavailable" not in worker.log_text()


def test_a_delayed_job_is_found_by_the_poll(start_worker, client):
    start_worker(["foo"], interval=0.2)
    jid = put(client, "foo", "Noop", delay=1)
    wait_state(client, jid, "complete", timeout=10)


def test_a_worker_whose_record_cannot_be_made_runs_jobs_without_it(start_worker, client, tmp_path):
    # The pool's state directory removed under it (systemd-logind's RemoveIPC, a tmpfs cleaner).
    worker = start_worker(["foo"], state_path=str(tmp_path / "gone" / "worker-1"))
    jids = [put(client, "foo", "Noop") for _ in range(2)]
    for jid in jids:
        wait_state(client, jid, "complete")
    assert worker.log_text().count("no record for qless-pool status: ") == 1
    assert "No such file or directory" in worker.log_text()


# --- one child per job ----------------------------------------------------------------------------


def test_each_job_runs_in_its_own_child_of_the_worker(start_worker, client, redis_conn):
    worker = start_worker(["foo"])
    jids = [put(client, "foo", "Noop") for _ in range(3)]
    for jid in jids:
        wait_state(client, jid, "complete")
    recorded = runs(redis_conn)
    assert [run["jid"] for run in recorded] == jids
    assert {run["ppid"] for run in recorded} == {worker.pid}
    assert worker.pid not in {run["pid"] for run in recorded}
    assert len({run["pid"] for run in recorded}) == 3
    # qless knows the job by the worker's name, <hostname>-<worker pid>.
    assert {
        entry["worker"]
        for jid in jids
        for entry in client.jobs[jid].history
        if entry["what"] == "popped"
    } == {f"{os.uname().nodename}-{worker.pid}"}


def test_titles_while_waiting_and_while_a_job_runs(start_worker, client):
    worker = start_worker(["foo", "bar", "baz"])
    assert WAITING.match(worker.title()).group(1) == "foo,bar,baz"
    before = int(time.time())
    jid = put(client, "bar", "Sleep", {"seconds": 30})
    wait_state(client, jid, "running")
    forked = wait_for(lambda: FORKED.match(worker.title()))
    child = int(forked.group(1))
    assert child == worker.job_child()
    assert before <= int(forked.group(2)) <= time.time()
    processing = wait_for(lambda: PROCESSING.match(title(child)))
    assert processing.group(1) == "bar"
    assert processing.group(2) == forked.group(2)


def test_a_job_that_returns_is_completed(start_worker, client):
    start_worker(["foo"])
    jid = put(client, "foo", "Noop")
    wait_state(client, jid, "complete")
    assert history_events(client, jid).count("done") == 1


def test_a_job_that_completes_itself_is_completed_once(start_worker, client):
    start_worker(["foo"])
    advanced = put(client, "foo", "Advance", {"next": "later"})
    completed = put(client, "foo", "Complete")
    wait_state(client, completed, "complete")
    assert history_events(client, completed).count("done") == 1
    wait_for(lambda: client.jobs[advanced].queue_name == "later")
    assert state(client, advanced) == "waiting"


def test_a_job_that_raises_is_failed_with_its_exception(start_worker, client):
    start_worker(["foo"])
    jid = put(client, "foo", "Fail")
    wait_state(client, jid, "failed")
    failure = client.jobs[jid].failure
    assert failure["group"] == "foo-ValueError"
    assert "this job always fails" in failure["message"]


def test_a_child_that_exits_without_settling_is_handed_back(start_worker, client):
    start_worker(["foo"])
    jid = put(client, "foo", "Exit", retries=1)
    wait_state(client, jid, "failed")  # one retry, then out of retries
    job = client.jobs[jid]
    assert job.failure["group"] == "foo-DirtyExit"
    assert "exited with status 3" in job.failure["message"]
    assert history_events(client, jid).count("popped") == 2


@pytest.mark.parametrize("fork_per_job", [True, False], ids=["fork", "in-process"])
@pytest.mark.parametrize(
    ("klass", "raised"), [("SysExit", "SystemExit(4)"), ("Interrupt", "KeyboardInterrupt")]
)
def test_a_job_that_exits_is_failed_not_run_again(
    start_worker, client, klass, raised, fork_per_job
):
    worker = start_worker(["foo"], fork_per_job=fork_per_job)
    jid = put(client, "foo", klass, retries=3)
    wait_state(client, jid, "failed")
    failure = client.jobs[jid].failure
    assert failure["group"] == "foo-SystemExit"
    assert f"the job function raised {raised}" in failure["message"]
    assert "Traceback" in failure["message"]
    assert history_events(client, jid).count("popped") == 1
    assert alive(worker.pid)  # in-process too: the worker did not exit
    later = put(client, "foo", "Noop")
    wait_state(client, later, "complete")


@pytest.mark.parametrize("fork_per_job", [True, False], ids=["fork", "in-process"])
def test_job_data_that_is_not_json_is_failed_not_retried(
    start_worker, client, redis_conn, fork_per_job
):
    jid = put(client, "foo", "Noop", retries=3)
    redis_conn.hset(f"ql:j:{jid}", "data", "{not json")
    start_worker(["foo"], fork_per_job=fork_per_job)
    # Read from the hash: qless-py cannot make a Job of it either.
    wait_for(lambda: redis_conn.hget(f"ql:j:{jid}", "state") == "failed", message="the failure")
    failure = json.loads(redis_conn.hget(f"ql:j:{jid}", "failure"))
    assert failure["group"] == "foo-BadJobData"
    assert "the job's data is not valid JSON" in failure["message"]
    assert "{not json" in failure["message"]
    history = redis_conn.lrange(f"ql:j:{jid}-history", 0, -1)
    assert sum('"popped"' in entry for entry in history) == 1
    assert runs(redis_conn) == []  # the job function never ran


def test_a_huge_failure_message_is_capped_in_redis_and_in_the_log(start_worker, client):
    worker = start_worker(["foo"])
    jid = put(client, "foo", "BigFailure", {"size": 5_000_000})
    wait_state(client, jid, "failed")
    message = client.jobs[jid].failure["message"]
    assert len(message) <= 64 * 1024
    assert message.startswith("[qless-pool: ")
    assert "characters cut" in message.splitlines()[0]
    assert message.rstrip().endswith("x the end")
    wait_for(lambda: "the end" in worker.log_text(), message="the failure to be logged")
    log = worker.log_text()
    assert max(len(line) for line in log.splitlines()) <= 64 * 1024
    worker.log.write_text(log.replace("x" * 1000, "x..."))  # not 64 KiB of it in the test report


# --- supervising the child ------------------------------------------------------------------------


def test_heartbeats_keep_a_job_longer_than_its_heartbeat_interval(start_worker, client, redis_url):
    client.config["heartbeat"] = 1
    client.config["grace-period"] = 0
    start_worker(["foo"])
    jid = put(client, "foo", "Sleep", {"seconds": 3})
    wait_state(client, jid, "running")
    thief = connect(redis_url, "thief")
    # A pop by another worker reclaims any job whose lock has expired; none may be.
    while state(client, jid) == "running":
        assert thief.queues["foo"].pop() is None
        time.sleep(0.1)
    assert state(client, jid) == "complete"
    assert "timed-out" not in history_events(client, jid)


@pytest.mark.parametrize("take_away", ["move", "cancel", "timeout"])
def test_a_job_taken_away_kills_its_child(start_worker, client, take_away):
    worker = start_worker(["foo"])
    jid = put(client, "foo", "Sleep", {"seconds": 60})
    wait_state(client, jid, "running")
    child = wait_for(worker.job_child)
    job = client.jobs[jid]
    if take_away == "move":
        job.move("elsewhere")
    elif take_away == "cancel":
        job.cancel()
    else:
        job.timeout()  # qless's own "lock lost"
    wait_for(lambda: not alive(child), timeout=5, message="the job child to be killed")
    if take_away == "move":
        wait_for(lambda: WAITING.match(worker.title()), message="the worker to wait again")
        assert state(client, jid) == "waiting"
        assert client.jobs[jid].queue_name == "elsewhere"
    elif take_away == "cancel":
        wait_for(lambda: WAITING.match(worker.title()), message="the worker to wait again")
        assert client.jobs[jid] is None
    else:
        # A timed-out job is up for grabs again; this worker's next pop takes it.
        wait_for(lambda: history_events(client, jid).count("popped") == 2)
        assert wait_for(worker.job_child) != child
    assert "killing job child" in worker.log_text()


def test_job_timeout_kills_the_child_and_fails_the_job(start_worker, client):
    worker = start_worker(["foo"], job_timeout=0.5)
    jid = put(client, "foo", "Sleep", {"seconds": 60})
    wait_state(client, jid, "failed", timeout=10)
    failure = client.jobs[jid].failure
    assert failure["group"] == "foo-TimeoutError"
    assert "job timeout (0.5s)" in failure["message"]
    assert worker.job_child() is None


def test_kill_9_of_the_child_retries_the_job_which_a_later_attempt_completes(
    start_worker, client, redis_conn
):
    worker = start_worker(["foo"])
    jid = put(client, "foo", "Sleep", {"seconds": 60, "once": True}, retries=3)
    wait_state(client, jid, "running")
    child = wait_for(worker.job_child)
    wait_for(lambda: runs(redis_conn))  # the job has started
    os.kill(child, signal.SIGKILL)
    wait_state(client, jid, "complete")
    # The second attempt ran with one retry fewer (completing restores qless's count).
    assert [run["attempt"] for run in runs(redis_conn)] == [1, 2]
    assert "killed by SIGKILL" in worker.log_text()


# --- signals --------------------------------------------------------------------------------------


def test_quit_finishes_the_current_job_then_exits(start_worker, client):
    worker = start_worker(["foo"])
    jid = put(client, "foo", "Sleep", {"seconds": 1})
    later = put(client, "foo", "Noop")
    wait_state(client, jid, "running")
    worker.send(signal.SIGQUIT)
    assert worker.process.wait(timeout=10) == 0
    assert state(client, jid) == "complete"
    assert state(client, later) == "waiting"  # no new job after QUIT
    assert not client.workers.counts  # deregistered on the way out


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_term_and_int_kill_the_child_hand_the_job_back_and_exit(start_worker, client, signum):
    worker = start_worker(["foo"])
    jid = put(client, "foo", "Sleep", {"seconds": 60}, retries=3)
    wait_state(client, jid, "running")
    child = wait_for(worker.job_child)
    worker.send(signum)
    assert worker.process.wait(timeout=10) == 0
    assert not alive(child)
    job = client.jobs[jid]
    assert (job.state, job.retries_left) == ("waiting", 2)
    assert f"the worker was told to stop ({signal.Signals(signum).name})" in worker.log_text()


def test_usr1_kills_the_child_and_keeps_working(start_worker, client, redis_conn):
    worker = start_worker(["foo"])
    jid = put(client, "foo", "Sleep", {"seconds": 60, "once": True})
    wait_state(client, jid, "running")
    child = wait_for(worker.job_child)
    worker.send(signal.SIGUSR1)
    wait_state(client, jid, "complete")  # handed back, then run again by the same worker
    assert not alive(child)
    assert alive(worker.pid)
    assert {run["ppid"] for run in runs(redis_conn)} == {worker.pid}


def test_usr2_pauses_and_cont_resumes(start_worker, client):
    worker = start_worker(["foo"], interval=0.1)
    worker.send(signal.SIGUSR2)
    wait_for(lambda: PAUSED.match(worker.title()), message="the Paused title")
    jid = put(client, "foo", "Noop")
    # Five poll intervals: a worker that was not paused would have taken it.
    stays(lambda: state(client, jid) == "waiting", 0.5, message="the job left waiting")
    worker.send(signal.SIGCONT)
    wait_state(client, jid, "complete")
    wait_for(lambda: WAITING.match(worker.title()))


def test_usr2_during_a_job_lets_it_finish_and_takes_no_more(start_worker, client):
    worker = start_worker(["foo"], interval=0.1)
    first = put(client, "foo", "Sleep", {"seconds": 0.5})
    wait_state(client, first, "running")
    second = put(client, "foo", "Noop")
    worker.send(signal.SIGUSR2)
    wait_state(client, first, "complete")
    wait_for(lambda: PAUSED.match(worker.title()))
    assert state(client, second) == "waiting"


def test_the_worker_exits_after_its_job_when_its_parent_is_gone(start_worker, client):
    worker = start_worker(["foo"], orphanable=True)
    jid = put(client, "foo", "Sleep", {"seconds": 1})
    wait_state(client, jid, "running")
    later = put(client, "foo", "Noop")
    worker.process.kill()  # the intermediate process only
    worker.process.wait(timeout=5)
    worker.wait_gone()
    assert state(client, jid) == "complete"
    assert state(client, later) == "waiting"
    assert "is gone; exiting after the current job" in worker.log_text()


# --- jobs in the worker process -------------------------------------------------------------------


def test_no_fork_per_job_runs_jobs_in_the_worker(start_worker, client, redis_conn):
    worker = start_worker(["foo"], fork_per_job=False)
    jid = put(client, "foo", "Sleep", {"seconds": 30})
    wait_for(lambda: PROCESSING.match(worker.title()), message="the worker's Processing title")
    assert worker.job_child() is None
    assert wait_for(lambda: runs(redis_conn), message="the job's record")[0]["pid"] == worker.pid
    worker.send(signal.SIGTERM)  # interrupts the job, hands it back, exits
    assert worker.process.wait(timeout=10) == 0
    assert (state(client, jid), client.jobs[jid].retries_left) == ("waiting", 4)
    client.jobs[jid].cancel()
    failed = put(client, "foo", "Fail")
    done = put(client, "foo", "Noop")
    start_worker(["foo"], fork_per_job=False)
    wait_state(client, done, "complete")
    assert state(client, failed) == "failed"


def test_no_fork_per_job_timeout(start_worker, client):
    start_worker(["foo"], fork_per_job=False, job_timeout=0.5)
    jid = put(client, "foo", "Sleep", {"seconds": 30})
    wait_state(client, jid, "failed")
    assert client.jobs[jid].failure["group"] == "foo-TimeoutError"


# --- Redis going away -----------------------------------------------------------------------------


def test_redis_restarted_mid_run_the_worker_recovers_and_finishes_the_queue(
    start_worker, own_redis
):
    url = own_redis.url()
    client = connect(url, "test-producer")
    jids = [put(client, "foo", "Sleep", {"seconds": 0.5}) for _ in range(4)]
    worker = start_worker(["foo"], url=url)
    wait_state(client, jids[0], "running")
    child = wait_for(worker.job_child)
    own_redis.stop()  # saves, so the jobs survive the restart
    # The child finishes the job but cannot report it; the worker keeps its outcome.
    wait_for(lambda: not alive(child), message="the job child to finish while Redis is down")
    own_redis.start()
    for jid in jids:
        wait_state(client, jid, "complete", timeout=30)
    assert [history_events(client, jid).count("done") for jid in jids] == [1, 1, 1, 1]
    # Logged once Redis has answered the complete: wait for it.
    wait_for(lambda: "complete" in worker.log_text(), message="a complete said")
    log = worker.log_text()
    assert log.count("Redis is unavailable") == 1  # once per outage, not once per attempt
    assert "Redis is back after" in log


def test_a_worker_started_while_redis_is_down_waits_for_it(start_worker, own_redis):
    url = own_redis.url()
    own_redis.stop()
    worker = start_worker(["foo"], url=url, ready=False)
    wait_for(lambda: "Redis is unavailable" in worker.log_text(), message="the outage to be logged")
    assert alive(worker.pid)
    own_redis.start()
    client = connect(url, "test-producer")
    jid = put(client, "foo", "Noop")
    wait_state(client, jid, "complete", timeout=30)


def test_a_failover_to_a_read_only_replica_is_ridden_out_like_an_outage(start_worker, own_redis):
    url = own_redis.url()
    client = connect(url, "test-producer")
    worker = start_worker(["foo"], url=url)
    wait_for(lambda: WAITING.match(worker.title()))
    # A replica of a master that does not answer: it keeps its data and refuses every write.
    client.redis.execute_command("REPLICAOF", "127.0.0.1", "1")
    wait_for(lambda: "Redis is unavailable" in worker.log_text(), message="the outage to be logged")
    assert alive(worker.pid)
    client.redis.execute_command("REPLICAOF", "NO", "ONE")
    jid = put(client, "foo", "Noop")
    wait_state(client, jid, "complete", timeout=30)
    assert worker.log_text().count("Redis is unavailable") == 1


def test_a_bare_worker_logs_without_any_logging_set_up(redis_url, tmp_path, client):
    script = (
        "import sys; from qless_pool.worker import Worker; "
        f"sys.exit(Worker(['foo'], {redis_url!r}, interval=0.2).work())"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script], stderr=subprocess.PIPE, text=True, start_new_session=True,
        env={**os.environ, "PYTHONPATH": python_path(TESTS)},
    )  # fmt: skip
    try:
        wait_for(lambda: WAITING.match(title(process.pid)), message="the worker")
        jid = put(client, "foo", "Noop")
        wait_state(client, jid, "complete")
        process.send_signal(signal.SIGQUIT)
        _, err = process.communicate(timeout=10)
    finally:
        kill_tree(process.pid)
        process.wait()
    assert "INFO: worker " in err and "started on foo" in err
    assert f"job {jid} (testjobs.Noop) from foo: completed in" in err


def test_a_worker_run_inside_a_program_gives_back_its_signals(redis_url, tmp_path):
    script = f"""
import signal, sys
from qless_pool.worker import Worker

def mine(signum, frame):
    print("mine", signum, flush=True)

signal.signal(signal.SIGTERM, mine)
Worker(['foo'], {redis_url!r}, interval=0.2).work()
assert signal.getsignal(signal.SIGTERM) is mine
assert signal.getsignal(signal.SIGQUIT) is signal.SIG_DFL
assert signal.set_wakeup_fd(-1) == -1
signal.raise_signal(signal.SIGTERM)
print("after", flush=True)
"""
    process = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True, env={**os.environ, "PYTHONPATH": str(TESTS)},
    )  # fmt: skip
    try:
        wait_for(lambda: WAITING.match(title(process.pid)), message="the worker")
        process.send_signal(signal.SIGQUIT)
        out, err = process.communicate(timeout=10)
    finally:
        kill_tree(process.pid)
        process.wait()
    assert process.returncode == 0, err
    assert out.split() == ["mine", str(int(signal.SIGTERM)), "after"]
