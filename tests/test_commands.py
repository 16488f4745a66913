"""The operator's commands on a real Redis, as users run them: qless-pool queues, failed, job,
retry, cancel, pause, unpause (stop: test_stop.py). Bad input is one line and a documented exit
status: 1 not found or refused, 2 bad usage, 69 Redis unreachable."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import time

import pytest
from commands import SCRIPT, one_line, qless_pool
from processes import wait_for
from workers import history_events, put

from qless_pool.client import pipelined

DEAD = "unix:///nonexistent/redis.sock"


def run(project, redis_url, *args, **kwargs):
    return qless_pool(project, *args, "-R", redis_url, **kwargs)


def as_json(result) -> object:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def failed_jobs(client, queue: str, group: str, count: int, klass="testjobs.Noop") -> list[str]:
    """``count`` jobs failed in ``group``, in round trips of 1,000; their jids in the order
    they failed (qless lists a group newest first)."""
    jids = []
    for start in range(0, count, 1000):
        n = min(1000, count - start)
        puts = [["put", queue, f"{group}-{start + i:06d}", klass,
                 json.dumps({"n": start + i}), 0] for i in range(n)]  # fmt: skip
        pipelined(client, puts)
        popped = json.loads(client("pop", queue, "test-worker", n))
        fails = [["fail", job["jid"], "test-worker", group, f"broke {job['jid']}", job["data"]]
                 for job in popped]  # fmt: skip
        pipelined(client, fails)
        jids += [job["jid"] for job in popped]
    return jids


# --- looking --------------------------------------------------------------------------------------


def test_queues_counts_every_queue_and_shows_the_paused(project, redis_url, client):
    assert run(project, redis_url, "queues").stdout.startswith("no queues yet")
    for _ in range(3):
        put(client, "foo", "Noop")
    put(client, "bar", "Noop", delay=600)
    client.queues["bar"].pause()
    failed_jobs(client, "baz", "baz-ValueError", 2)
    result = run(project, redis_url, "queues")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["QUEUE", "WAITING", "RUNNING", "SCHEDULED", "STALLED",
                                "DEPENDS", "RECURRING"]  # fmt: skip
    assert lines[1].split() == ["bar", "0", "0", "1", "0", "0", "0", "paused"]
    assert lines[3].split() == ["foo", "3", "0", "0", "0", "0", "0"]
    assert lines[-1] == "failed: 2 in 1 group(s) (qless-pool failed)"
    data = as_json(run(project, redis_url, "queues", "--json"))
    assert data["failed"] == {"baz-ValueError": 2}
    assert {q["name"]: (q["waiting"], q["scheduled"], q["paused"]) for q in data["queues"]} == {
        "bar": (0, 1, True), "baz": (0, 0, False), "foo": (3, 0, False),
    }  # fmt: skip


def test_20000_failed_jobs_a_page_from_the_middle_a_closed_pipe_and_a_bulk_retry(
    project, redis_url, client
):
    jids = failed_jobs(client, "foo", "foo-Broken", 20_000)
    failed_jobs(client, "bar", "bar-Other", 3)
    groups = run(project, redis_url, "failed")
    assert [line.split() for line in groups.stdout.splitlines()] == [
        ["GROUP", "JOBS"], ["bar-Other", "3"], ["foo-Broken", "20,000"], ["20,003", "in", "all"]
    ]  # fmt: skip
    # A page from the middle, newest first: the 10,001st newest is jids[-10001].
    page = as_json(run(project, redis_url, "failed", "foo-Broken", "--offset", "10000",
                       "--limit", "5", "--json"))  # fmt: skip
    assert page["total"] == 20_000 and page["offset"] == 10_000
    assert [job["jid"] for job in page["jobs"]] == jids[-10001:-10006:-1]
    assert page["jobs"][0]["failure"]["message"] == f"broke {jids[-10001]}"
    assert page["jobs"][0]["data"] == {"n": int(jids[-10001].rsplit("-", 1)[1])}
    text = run(project, redis_url, "failed", "foo-Broken", "--offset", "19998")
    assert (
        text.stdout.splitlines()[0]
        == "foo-Broken: 20,000 failed job(s); 19999 to 20000, newest first"
    )
    # A reader that stops early (| head -1): no traceback, the status of SIGPIPE.
    reader = subprocess.Popen(
        [SCRIPT, "failed", "foo-Broken", "--limit", "1000", "-R", redis_url],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=project,
    )  # fmt: skip
    assert reader.stdout.readline().startswith(b"foo-Broken: 20,000")
    reader.stdout.close()
    assert reader.wait(timeout=30) == 141
    assert reader.stderr.read() == b""
    # Every one of them retried, in batches, with --yes (no terminal to ask on).
    began = time.monotonic()
    result = run(project, redis_url, "retry", "--group", "foo-Broken", "--yes", timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "retried 20,000 job(s) of foo-Broken"
    print(f"retrying 20,000 jobs took {time.monotonic() - began:.1f}s")
    counts = client.queues["foo"].counts
    assert (counts["waiting"], counts["running"]) == (20_000, 0)
    assert json.loads(client("failed")) == {"bar-Other": 3}
    job = client.jobs["foo-Broken-000123"]
    assert (job.state, job.data, job.retries_left) == ("waiting", {"n": 123}, 5)


def test_a_group_retried_under_a_live_pool_is_retried_once_though_its_jobs_fail_again(
    project, redis_url, client, start_pool
):
    # They fail again, into the same group, while the retry goes on: none is retried twice.
    failed_jobs(client, "foo", "foo-ValueError", 300, klass="testjobs.Fail")
    # In process: 300 failures (each with its traceback logged) are quick even on a busy CI.
    pool = start_pool("--no-fork-per-job", config="foo: 2\n", expect={"foo": 2})
    result = run(project, redis_url, "retry", "--group", "foo-ValueError", "--yes")
    assert result.stdout.strip() == "retried 300 job(s) of foo-ValueError"
    wait_for(
        lambda: json.loads(client("failed")).get("foo-ValueError") == 300,
        timeout=40,
        message="all failed again",
    )
    assert pool.process.poll() is None


def test_job_shows_one_job_and_refuses_an_unknown_one(project, redis_url, client):
    jid = client.queues["foo"].put("testjobs.Noop", {"x": 1}, priority=7, tags=["t1"], retries=3)
    [popped] = client.queues["foo"].pop(1)
    popped.fail("foo-KeyError", "the key was missing\nsecond line")
    result = run(project, redis_url, "job", jid)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"{jid}  testjobs.Noop"
    for expected in ("  state:      failed", "  queue:      foo", "  priority:   7",
                     "  tags:       t1", "  retries:    3 of 3 left", '  data:       {"x": 1}',
                     "    the key was missing", "    second line"):  # fmt: skip
        assert expected in lines, expected
    assert any(line.startswith("  failed:     foo-KeyError at ") for line in lines)
    assert [line.split()[2] for line in lines[lines.index("  history:") + 1 :]] == [
        "put", "popped", "failed"
    ]  # fmt: skip
    data = as_json(run(project, redis_url, "job", jid, "--json"))
    assert (data["state"], data["data"], data["failure"]["group"]) == ("failed", {"x": 1},
                                                                        "foo-KeyError")  # fmt: skip
    missing = run(project, redis_url, "job", "no-such-jid")
    assert missing.returncode == 1
    assert one_line(missing) == "qless-pool job: no job 'no-such-jid'"


# --- acting ---------------------------------------------------------------------------------------


def test_retry_puts_failed_jobs_back_as_they_were_and_refuses_the_rest(project, redis_url, client):
    jid = client.queues["foo"].put("testjobs.Noop", {"x": 2}, priority=5, tags=["keep"], retries=2)
    [job] = client.queues["foo"].pop(1)
    job.retry(0, "foo-Flaky", "once")  # one retry spent
    [job] = client.queues["foo"].pop(1)
    job.fail("foo-Flaky", "twice")
    waiting = put(client, "bar", "Noop")
    result = run(project, redis_url, "retry", jid, waiting, "nope", jid)  # jid named twice
    assert result.returncode == 1
    assert result.stdout == "retried 1 job(s)\n"
    assert result.stderr.splitlines() == [
        "not retried: 2", f"  {waiting}: not failed (waiting)", "  nope: no such job",
    ]  # fmt: skip
    assert history_events(client, jid).count("put") == 2  # the first put, and the retry: once
    again = client.jobs[jid]
    assert (again.state, again.queue_name, again.data) == ("waiting", "foo", {"x": 2})
    assert (again.priority, again.tags, again.retries_left) == (5, ["keep"], 2)
    assert json.loads(client("failed")) == {}


def test_cancel_cancels_and_qless_refuses_a_job_others_depend_on(project, redis_url, client):
    first = put(client, "foo", "Noop")
    second = client.queues["foo"].put("testjobs.Noop", {}, depends=[first])
    result = run(project, redis_url, "cancel", first, "--json")
    assert result.returncode == 1
    data = json.loads(result.stdout)
    assert data["acted"] == 0 and data["refusals"] == 1
    assert "is a dependency of" in data["refused"][first]
    result = run(project, redis_url, "cancel", second, first)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "canceled 2 job(s)"
    assert client.jobs[first] is None and client.jobs[second] is None
    failed_jobs(client, "foo", "foo-Gone", 1200)
    result = run(project, redis_url, "cancel", "--group", "foo-Gone", "-y")
    assert result.stdout.strip() == "canceled 1,200 job(s) of foo-Gone"
    assert json.loads(client("failed")) == {}


def test_a_group_action_asks_on_a_terminal_and_needs_yes_without_one(project, redis_url, client):
    failed_jobs(client, "foo", "foo-Ask", 3)
    refused = run(project, redis_url, "retry", "--group", "foo-Ask")  # stdin: not a terminal
    assert refused.returncode == 2
    assert one_line(refused) == (
        "qless-pool retry: retry --group acts on many jobs: give --yes (no terminal to ask on)"
    )
    for answer, status, left in ((b"n\n", 1, 3), (b"y\n", 0, 0)):
        controller, terminal = pty.openpty()
        try:
            process = subprocess.Popen(
                [SCRIPT, "retry", "--group", "foo-Ask", "-R", redis_url], stdin=terminal,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=project,
            )  # fmt: skip
            os.write(controller, answer)
            out, err = process.communicate(timeout=30)
        finally:
            os.close(controller)
            os.close(terminal)
        assert process.returncode == status, err
        assert err.startswith(b"retry 3 failed job(s) of foo-Ask? [y/N] ")  # not in the answer
        assert json.loads(client("failed")).get("foo-Ask", 0) == left
    assert out == b"retried 3 job(s) of foo-Ask\n"


def test_pause_and_unpause_a_queue_qless_knows(project, redis_url, client):
    put(client, "foo", "Noop")
    result = run(project, redis_url, "pause", "foo")
    assert (result.returncode, result.stdout) == (0, "paused foo\n")
    assert client.queues["foo"].counts["paused"] is True
    assert as_json(run(project, redis_url, "unpause", "foo", "--json")) == {
        "queue": "foo", "paused": False
    }  # fmt: skip
    assert client.queues["foo"].counts["paused"] is False
    for name in ("fooo", "foo bar", "foo,bar"):
        result = run(project, redis_url, "pause", name)
        assert result.returncode == 1
        line = one_line(result)
        assert line.startswith(f"qless-pool pause: no queue {name!r} in qless")
        assert line.endswith("its queues: foo")
    assert "a queue list is not a queue" in run(project, redis_url, "pause", "foo bar").stderr


# --- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["queues"],
        ["failed"],
        ["failed", "g"],
        ["job", "j"],
        ["retry", "j"],
        ["cancel", "j"],
        ["retry", "--group", "g", "--yes"],
        ["pause", "q"],
        ["unpause", "q"],
    ],
    ids=lambda args: " ".join(args),
)
def test_redis_unreachable_is_one_line_and_status_69(project, args):
    result = qless_pool(project, *args, "-R", DEAD)
    assert result.returncode == 69
    line = one_line(result)
    assert line.startswith(f"qless-pool {args[0]}: Redis at {DEAD} is unreachable: ")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["failed", "g", "--limit", "0"], "argument --limit: a whole number from 1 to 1,000: '0'"),
        (["failed", "g", "--offset", "-1"], "argument --offset: a whole number from 0"),
        (["retry"], "one of the arguments JID --group is required"),
        (["retry", "j", "--group", "g"], "argument --group: not allowed with argument JID"),
        (["job"], "the following arguments are required: JID"),
        (
            ["nosuch"],
            "unknown command 'nosuch' (the commands: status, queues, failed, job, "
            "retry, cancel, pause, unpause, stop, reload, web)",
        ),
    ],
)
def test_bad_usage_is_one_line_and_status_2(project, redis_url, args, message):
    result = run(project, redis_url, *args)
    assert result.returncode == 2
    assert message in result.stderr.splitlines()[-1]
    assert "Traceback" not in result.stderr


def test_a_bad_url_and_the_unknown_group_are_one_line(project, redis_url):
    bad = qless_pool(project, "queues", "-R", "http://x")
    assert bad.returncode == 2
    assert one_line(bad).startswith("qless-pool queues: bad Redis URL (from --redis): ")
    for args in (["failed", "nope"], ["retry", "--group", "nope", "--yes"],
                 ["cancel", "--group", "nope", "--yes"]):  # fmt: skip
        result = run(project, redis_url, *args)
        assert result.returncode == 1
        assert one_line(result) == f"qless-pool {args[0]}: no failed jobs in group 'nope'"


def test_the_url_comes_from_the_environment_as_for_the_pool(project, redis_url, client):
    put(client, "from-env", "Noop")
    for variable in ("QLESS_URL", "REDIS_URL"):
        result = qless_pool(project, "queues", "--json", env={variable: redis_url})
        assert [q["name"] for q in as_json(result)["queues"]] == ["from-env"]


def test_a_server_that_is_not_redis_and_an_argument_that_is_not_utf8_are_one_line(
    project, tmp_path
):
    import socket
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(5)

    def answer_like_http():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            conn.recv(1024)
            conn.sendall(b"HTTP/1.0 400 Bad Request\r\n\r\n")
            conn.close()

    threading.Thread(target=answer_like_http, daemon=True).start()
    try:
        url = f"redis://:pw@127.0.0.1:{listener.getsockname()[1]}/0"
        result = qless_pool(project, "queues", "-R", url)
        assert result.returncode == 69
        line = one_line(result)
        assert line.startswith(f"qless-pool queues: Redis at {url.replace('pw', '***')} did not")
    finally:
        listener.close()
    odd = qless_pool(project, "job", "\udcff", "-R", DEAD)  # as Python reads a byte 0xff
    assert odd.returncode == 2
    assert one_line(odd) == "qless-pool job: an argument is not UTF-8 text: '\\udcff'"


def test_a_password_with_a_space_is_masked(project):
    result = qless_pool(project, "queues", "-R", "redis://:S3cret PW@127.0.0.1:1/0")
    assert result.returncode == 69
    assert "S3cret" not in result.stderr
    assert one_line(result).startswith("qless-pool queues: Redis at redis://:***@127.0.0.1:1/0 ")


def test_a_recurring_job_is_shown_and_cancel_stops_it(project, redis_url, client):
    client.queues["foo"].recur("testjobs.Noop", {}, interval=60, jid="every-minute")
    shown = run(project, redis_url, "job", "every-minute")
    assert "  retries:    5 a job" in shown.stdout.splitlines()
    refused = run(project, redis_url, "retry", "every-minute")
    assert refused.returncode == 1
    assert "every-minute: a recurring job, not failed (cancel stops it recurring)" in refused.stderr
    canceled = run(project, redis_url, "cancel", "every-minute")
    assert (canceled.returncode, canceled.stdout) == (0, "canceled 1 job(s)\n")
    assert client("recur.get", "every-minute") is None


def test_a_failure_message_cannot_drive_the_terminal(project, redis_url, client):
    jid = put(client, "foo", "Noop")
    [job] = client.queues["foo"].pop(1)
    job.fail("foo-Ansi", "red \x1b[31malert\x1b[0m")
    shown = run(project, redis_url, "job", jid).stdout
    assert "\x1b" not in shown and "    red \\x1b[31malert\\x1b[0m" in shown.splitlines()
    assert "\x1b" not in run(project, redis_url, "failed", "foo-Ansi").stdout


def test_a_bulk_action_cut_short_by_redis_says_what_it_did(project, start_pool):
    import signal as signals

    from redis_server import RedisServer

    from qless_pool.client import connect

    server = RedisServer().start()
    try:
        client = connect(server.url(), "test-producer")
        failed_jobs(client, "foo", "foo-Cut", 20_000)
        process = subprocess.Popen(
            [SCRIPT, "retry", "--group", "foo-Cut", "--yes", "-R", server.url()],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=project,
        )  # fmt: skip
        wait_for(lambda: json.loads(client("failed")).get("foo-Cut", 0) < 19_000,
                 message="the retry under way")  # fmt: skip
        os.kill(server.process.pid, signals.SIGSTOP)
        try:
            out, err = process.communicate(timeout=30)
        finally:
            os.kill(server.process.pid, signals.SIGCONT)
        assert process.returncode == 69
        done = int(out.split()[1].replace(",", ""))
        assert 1000 <= done < 20_000
        assert (
            out == f"done {done:,} job(s) of 20,000 (and up to 500 more, sent as Redis went away)\n"
        )
        assert err.rstrip().endswith(
            f"at most {20_000 - done:,} job(s) not done: run it again (only the jobs still failed "
            "are acted on)"
        )
        # Of the batch in flight, Redis ran some before it was stopped, maybe all once continued.
        assert 20_000 - done - 500 <= json.loads(client("failed"))["foo-Cut"] <= 20_000 - done
        again = subprocess.run(
            [SCRIPT, "retry", "--group", "foo-Cut", "--yes", "-R", server.url()],
            capture_output=True, text=True, cwd=project, timeout=60,
        )  # fmt: skip
        assert again.returncode == 0, again.stderr
        assert json.loads(client("failed")) == {}
        assert client.queues["foo"].counts["waiting"] == 20_000
    finally:
        server.remove()
