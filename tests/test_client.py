"""The fixed qless client against a real Redis (>= 6.2.7, where the unfixed script fails)."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
import time

import pytest
import qless
import redis
from qless.exceptions import LostLockException, QlessException

from qless_pool.client import (
    BATCH_COMMAND,
    BATCH_LIMIT,
    LOCAL_EXTEND,
    RedisUnavailable,
    connect,
    fix_script,
    fixed_script,
    pipelined,
    redis_is_down,
    use_fixed_script,
    with_batch_command,
)
from qless_pool.ops.operations import _refusal

KLASS = "jobs.Noop"


def original_script() -> str:
    return pkgutil.get_data("qless", "qless-core/qless.lua").decode()


def job_hash(redis_conn, jid):
    return redis_conn.hgetall(f"ql:j:{jid}")


# --- the transform ------------------------------------------------------------------------------


def test_fix_makes_the_global_a_local_and_rewrites_every_call():
    source = original_script()
    assert source.count("table.extend(") == 3  # the definition and two calls
    fixed = fixed_script()
    assert "table.extend" not in fixed
    assert fixed.count(f"local function {LOCAL_EXTEND}(") == 1
    assert fixed.count(f"{LOCAL_EXTEND}(") == 3
    assert len(fix_script(source).splitlines()) == len(source.splitlines())
    # and the batch command, once, before qless-core's dispatcher
    assert fixed.count(f"if ARGV[1] == '{BATCH_COMMAND}' then") == 1
    assert fixed.index(BATCH_COMMAND) < fixed.index("if #KEYS > 0 then")


def test_an_unknown_dispatcher_is_refused_not_half_changed():
    with pytest.raises(ValueError, match="found 0 times"):
        with_batch_command("return 1\n")


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("local x = 1\n", "local x = 1\n"),
        (
            "function table.extend(a, b)\nend\ntable.extend(x, y)\n",
            f"local function {LOCAL_EXTEND}(a, b)\nend\n{LOCAL_EXTEND}(x, y)\n",
        ),
    ],
)
def test_fix_script_cases(source, expected):
    assert fix_script(source) == expected


def test_fix_refuses_a_script_it_was_not_written_for():
    with pytest.raises(ValueError, match="2 times"):
        fix_script("function table.extend(a)\nend\nfunction table.extend(b)\nend\n")


# --- unfixed vs fixed on this Redis -------------------------------------------------------------


def test_unfixed_script_fails_on_this_redis(redis_url, redis_conn):
    version = tuple(int(part) for part in redis_conn.info("server")["redis_version"].split(".")[:3])
    assert version >= (6, 2, 7), "the tests must run on a Redis that makes script globals read-only"
    client = qless.Client(redis_url)
    client._lua = client.redis.register_script(original_script())
    with pytest.raises(QlessException, match="readonly table"):
        client.queues["foo"].put(KLASS, {})


def test_patch_qless_fixes_every_client_and_is_idempotent(redis_url):
    # In a fresh interpreter, so that this process's qless.Client stays unpatched.
    program = f"""
import qless, qless_pool
from qless.exceptions import QlessException
try:
    qless.Client({redis_url!r}).queues["foo"].put("jobs.Noop", {{}})
    print("unpatched worked")
except QlessException as exc:
    print("unpatched failed:", "readonly table" in str(exc))
qless_pool.patch_qless()
qless_pool.patch_qless()
client = qless.Client({redis_url!r}, hostname="w1")
jid = client.queues["foo"].put("jobs.Noop", {{"a": 1}})
print("patched put:", client.jobs[jid].state)
print("patched pop:", client.queues["foo"].pop().jid == jid)
"""
    result = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "unpatched failed: True",
        "patched put: waiting",
        "patched pop: True",
    ]


@pytest.mark.parametrize(
    ("error", "down"),
    [
        (redis.ConnectionError("gone"), True),
        (redis.TimeoutError("slow"), True),
        (redis.BusyLoadingError("loading"), True),
        # Redis 6.2 quotes the replica's refusal in a script error.
        (
            QlessException(
                "Error running script (call to f_d9bf): @user_script:1122: @user_script: 1122: "
                "-READONLY You can't write against a read only replica."
            ),
            True,
        ),
        (QlessException("Heartbeat(): Job given out to another worker: w2"), False),
        (ValueError("not Redis at all"), False),
    ],
)
def test_redis_is_down_tells_an_outage_from_a_refusal(error, down):
    assert redis_is_down(error) is down


@pytest.mark.parametrize("own_client", [False, True], ids=["connect", "qless.Client"])
def test_redis_is_down_on_a_read_only_replica(qless_client, redis_url, own_client):
    # Redis 7 replies READONLY. connect()'s connections raise it as RedisUnavailable, an outage
    # at every level; a qless.Client of one's own wraps it in a QlessException, and the reply
    # stays the exception's context.
    client = use_fixed_script(qless.Client(redis_url)) if own_client else qless_client
    client.queues["foo"].put(KLASS, {})
    client.redis.execute_command("REPLICAOF", "127.0.0.1", "1")
    try:
        with pytest.raises(QlessException if own_client else RedisUnavailable) as refused:
            client.queues["foo"].pop()
    finally:
        client.redis.execute_command("REPLICAOF", "NO", "ONE")
    assert redis_is_down(refused.value)


# --- several commands in one call (pipelined: BATCH_COMMAND) -------------------------------------


def _batch_commands(queue: str) -> list[list]:
    return [
        ["put", queue, f"{queue}-1", KLASS, "{}", 0],
        ["put", queue, f"{queue}-2", KLASS, '{"a": 1}', 0, "priority", 5],
        ["pop", queue, "test-worker", 1],
        ["get", f"{queue}-missing"],  # nil
        ["complete", f"{queue}-missing", "test-worker", queue, "{}"],  # refused
        ["jobs", "running", queue],  # a table
        ["length", queue],  # a number
        ["no-such-command"],
        ["complete", f"{queue}-2", "test-worker", queue, "{}"],  # the job popped
        ["heartbeat", f"{queue}-2", "test-worker", "{}"],  # refused: complete
    ]


def _comparable(answer, queue: str):
    if isinstance(answer, QlessException):
        return ("refused", _refusal(answer).replace(queue, "Q"))
    if isinstance(answer, str) and answer.startswith("[{"):  # a pop: its jobs, less the times
        return [(job["jid"].replace(queue, "Q"), job["state"], job["worker"])
                for job in json.loads(answer)]  # fmt: skip
    if isinstance(answer, list):
        return [item.replace(queue, "Q") for item in answer]
    return answer.replace(queue, "Q") if isinstance(answer, str) else answer


def test_a_batch_answers_each_command_as_it_would_alone(qless_client):
    # The same commands on two queues: one by one, and in one call.
    alone = []
    for command in _batch_commands("one"):
        try:
            alone.append(qless_client(*command))
        except QlessException as refused:
            alone.append(refused)
    batch = pipelined(qless_client, _batch_commands("two"))
    assert [_comparable(a, "one") for a in alone] == [_comparable(b, "two") for b in batch]
    assert _comparable(batch[2], "two") == [("Q-2", "running", "test-worker")]  # by priority
    assert batch[3] is None and batch[5] == ["two-2"] and batch[6] == 2
    assert batch[8] == "complete" and isinstance(batch[9], QlessException)
    assert _comparable(batch[4], "two") == ("refused", "Complete(): Job does not exist")
    assert isinstance(batch[7], QlessException) and "Unknown command" in str(batch[7])


def test_a_batch_runs_its_commands_in_order_and_each_one_whole(qless_client, redis_conn):
    jids = [qless_client.queues["foo"].put(KLASS, {}) for _ in range(3)]
    popped = json.loads(pipelined(qless_client, [["pop", "foo", "test-worker", 3]])[0])
    assert sorted(job["jid"] for job in popped) == sorted(jids)
    # A refused command in the middle does not stop the ones after it.
    answers = pipelined(
        qless_client,
        [["complete", jids[0], "test-worker", "foo", "{}"],
         ["complete", jids[0], "test-worker", "foo", "{}"],  # twice: refused
         ["complete", jids[1], "test-worker", "foo", '{"done": true}'],
         ["pop", "foo", "test-worker", 5]],
    )  # fmt: skip
    assert answers[0] == "complete" and answers[2] == "complete"
    assert isinstance(answers[1], QlessException) and not redis_is_down(answers[1])
    assert not json.loads(answers[3])  # nothing left to pop (qless says {})
    assert [redis_conn.hget(f"ql:j:{jid}", "state") for jid in jids] == [
        "complete", "complete", "running"]  # fmt: skip
    assert json.loads(redis_conn.hget(f"ql:j:{jids[1]}", "data")) == {"done": True}
    assert pipelined(qless_client, []) == []


def test_a_long_list_goes_as_several_calls_in_one_round_trip(qless_client, redis_conn):
    # Redis serves no one else while a script runs: a long list is cut into calls.
    count = 2 * BATCH_LIMIT + 3
    pipelined(qless_client, [["length", "foo"]])  # the script loaded (an earlier test may flush it)
    redis_conn.config_resetstat()
    jids = pipelined(qless_client, [["put", "foo", f"j{i}", KLASS, "{}", 0] for i in range(count)])
    assert jids == [f"j{i}" for i in range(count)]
    assert redis_conn.info("commandstats")["cmdstat_evalsha"]["calls"] == 3
    assert redis_conn.zcard("ql:q:foo-work") == count


def test_one_command_of_a_batch_with_too_many_arguments_fails_alone(qless_client, redis_conn):
    # Lua's unpack() takes about 8,000 values: a command past that is refused, not its batch.
    jids = [f"j{i}" for i in range(9000)]
    answers = pipelined(
        qless_client,
        [["put", "foo", "j1", KLASS, "{}", 0], ["multiget", *jids], ["length", "foo"]],
    )
    assert answers[0] == "j1" and answers[2] == 1
    assert isinstance(answers[1], QlessException) and "unpack" in str(answers[1])
    with pytest.raises(ValueError, match="empty"):
        pipelined(qless_client, [["length", "foo"], []])


def test_a_batch_sent_after_redis_lost_the_script_runs_once(qless_client, redis_conn):
    jid = qless_client.queues["foo"].put(KLASS, {})
    redis_conn.script_flush()
    answers = pipelined(qless_client, [["pop", "foo", "test-worker", 1], ["length", "foo"]])
    assert json.loads(answers[0])[0]["jid"] == jid
    assert answers[1] == 1
    assert redis_conn.hget(f"ql:j:{jid}", "state") == "running"


def test_a_batch_on_a_read_only_replica_is_an_outage(qless_client, redis_conn):
    # Redis 7 lets a script start on a replica and refuses its first write inside it: each
    # command of the batch is refused READONLY there. That is Redis away, not qless's refusal.
    jid = qless_client.queues["foo"].put(KLASS, {})
    redis_conn.execute_command("REPLICAOF", "127.0.0.1", "1")
    try:
        with pytest.raises(RedisUnavailable, match="READONLY"):
            pipelined(qless_client, [["pop", "foo", "test-worker", 1], ["length", "foo"]])
    finally:
        redis_conn.execute_command("REPLICAOF", "NO", "ONE")
    assert redis_conn.hget(f"ql:j:{jid}", "state") == "waiting"
    assert json.loads(pipelined(qless_client, [["pop", "foo", "test-worker", 1]])[0])


def test_connect_names_the_worker_and_the_driver(qless_client):
    assert qless_client.worker_name == "test-worker"
    assert isinstance(qless_client, qless.Client)
    # CLIENT SETINFO (Redis >= 7.2) shows "redis-py(qless-pool_v...)"; the version is given, so
    # redis-py does not look up its own package metadata for every new connection.
    options = qless_client.redis.connection_pool.connection_kwargs
    driver = options.get("driver_info")
    if driver is not None:
        assert "qless-pool" in driver.formatted_name
        assert driver.lib_version
    else:  # redis-py 5 to 7
        assert "qless-pool" in options["lib_name"]
        assert options["lib_version"]


# --- every operation the pool and its users rely on ---------------------------------------------


def test_put_with_priority_tags_retries_and_data(qless_client, redis_conn):
    queue = qless_client.queues["foo"]
    jid = queue.put(KLASS, {"n": 1}, priority=10, tags=["a", "b"], retries=3)
    job = qless_client.jobs[jid]
    assert (job.state, job.queue_name, job.klass_name) == ("waiting", "foo", KLASS)
    assert (job.priority, job.tags, job.original_retries, job.retries_left) == (
        10,
        ["a", "b"],
        3,
        3,
    )
    assert job.data == {"n": 1}
    assert job_hash(redis_conn, jid)["state"] == "waiting"
    assert qless_client.jobs.tagged("a")["jobs"] == [jid]


def test_priority_orders_pops(qless_client):
    queue = qless_client.queues["foo"]
    low = queue.put(KLASS, {}, priority=0)
    high = queue.put(KLASS, {}, priority=5)
    assert [queue.pop().jid, queue.pop().jid] == [high, low]


def test_put_with_delay_is_scheduled(qless_client):
    queue = qless_client.queues["foo"]
    jid = queue.put(KLASS, {}, delay=60)
    assert qless_client.jobs[jid].state == "scheduled"
    assert queue.pop() is None
    assert queue.counts["scheduled"] == 1
    assert queue.jobs.scheduled() == [jid]


def test_depends_waits_for_the_dependency(qless_client):
    queue = qless_client.queues["foo"]
    first = queue.put(KLASS, {})
    second = queue.put(KLASS, {}, depends=[first])
    assert qless_client.jobs[second].state == "depends"
    assert qless_client.jobs[second].dependencies == [first]
    assert queue.pop().jid == first
    assert queue.pop() is None
    qless_client.jobs[first].complete()
    assert qless_client.jobs[second].state == "waiting"
    assert queue.pop().jid == second


def test_pop_peek_and_heartbeat(qless_client, redis_conn, redis_url):
    queue = qless_client.queues["foo"]
    jid = queue.put(KLASS, {})
    assert queue.peek().jid == jid
    assert qless_client.jobs[jid].state == "waiting"
    job = queue.pop()
    assert job.jid == jid
    assert job_hash(redis_conn, jid)["worker"] == "test-worker"
    assert qless_client.jobs[jid].state == "running"
    assert queue.peek() is None
    before = job.expires_at
    qless_client.config["heartbeat"] = 120
    assert job.heartbeat() >= before + 50  # Redis hands the new expiry back as whole seconds
    # Another worker may not heartbeat a job it does not hold.
    stolen = connect(redis_url, worker_name="someone-else").jobs[jid]
    with pytest.raises(LostLockException):
        stolen.heartbeat()


def test_complete_plain_and_advancing(qless_client):
    queue = qless_client.queues["foo"]
    queue.put(KLASS, {})
    queue.put(KLASS, {})
    first, second = queue.pop(), queue.pop()
    assert first.complete() == "complete"
    assert qless_client.jobs[first.jid].state == "complete"
    assert second.complete("bar") == "waiting"
    advanced = qless_client.jobs[second.jid]
    assert (advanced.state, advanced.queue_name) == ("waiting", "bar")
    assert qless_client.queues["bar"].pop().jid == second.jid


def test_fail_and_failed_listing(qless_client):
    queue = qless_client.queues["foo"]
    jid = queue.put(KLASS, {})
    job = queue.pop()
    assert job.fail("foo-ValueError", "boom") == jid
    failed = qless_client.jobs[jid]
    assert failed.state == "failed"
    assert failed.failure["group"] == "foo-ValueError"
    assert failed.failure["message"] == "boom"
    assert qless_client.jobs.failed() == {"foo-ValueError": 1}
    assert [j.jid for j in qless_client.jobs.failed("foo-ValueError")["jobs"]] == [jid]


def test_retry_consumes_a_retry_then_fails(qless_client):
    queue = qless_client.queues["foo"]
    jid = queue.put(KLASS, {}, retries=1)
    assert queue.pop().retry(0, "foo-Flaky", "try again") == 0
    again = qless_client.jobs[jid]
    assert (again.state, again.retries_left) == ("waiting", 0)
    assert queue.pop().retry(0, "foo-Flaky", "out of retries") == -1
    final = qless_client.jobs[jid]
    assert final.state == "failed"
    assert final.failure["group"] == "foo-Flaky"


def test_cancel_removes_the_job(qless_client):
    queue = qless_client.queues["foo"]
    jid = queue.put(KLASS, {})
    assert qless_client.jobs[jid].cancel() == [jid]
    assert qless_client.jobs[jid] is None
    assert queue.pop() is None


def test_move_to_another_queue(qless_client):
    jid = qless_client.queues["foo"].put(KLASS, {})
    qless_client.jobs[jid].move("bar")
    assert qless_client.jobs[jid].queue_name == "bar"
    assert qless_client.queues["foo"].pop() is None
    assert qless_client.queues["bar"].pop().jid == jid


def test_track_and_untrack(qless_client):
    jid = qless_client.queues["foo"].put(KLASS, {})
    qless_client.jobs[jid].track()
    assert [job.jid for job in qless_client.jobs.tracked()["jobs"]] == [jid]
    qless_client.jobs[jid].untrack()
    assert qless_client.jobs.tracked()["jobs"] == []


def test_recurring_job_spawns_instances(qless_client):
    queue = qless_client.queues["foo"]
    jid = queue.recur(KLASS, {"r": 1}, interval=60)
    recurring = qless_client.jobs[jid]
    assert isinstance(recurring, qless.RecurringJob)
    assert recurring.interval == 60
    instance = queue.pop()
    assert instance is not None
    assert instance.jid.startswith(jid)
    assert instance.data == {"r": 1}
    assert queue.pop() is None  # the next one is due in a minute
    recurring.cancel()
    assert qless_client.jobs[jid] is None


def test_config_get_set_unset(qless_client):
    assert qless_client.config["heartbeat"] == 60
    qless_client.config["heartbeat"] = 7
    qless_client.config["foo-heartbeat"] = 3
    assert qless_client.config["heartbeat"] == 7
    assert qless_client.config["foo-heartbeat"] == 3
    assert qless_client.config.all["foo-heartbeat"] == "3"
    assert qless_client.queues["foo"].heartbeat == 3
    del qless_client.config["heartbeat"]
    assert qless_client.config["heartbeat"] == 60


def test_queue_counts_and_stats(qless_client):
    queue = qless_client.queues["foo"]
    for _ in range(3):
        queue.put(KLASS, {})
    queue.pop().complete()
    counts = queue.counts
    assert (counts["name"], counts["waiting"], counts["running"]) == ("foo", 2, 0)
    assert [q["name"] for q in qless_client.queues.counts] == ["foo"]
    assert len(queue) == 2
    stats = queue.stats()
    assert stats["run"]["count"] == 1
    assert stats["wait"]["count"] == 1


def test_workers_listing(qless_client):
    queue = qless_client.queues["foo"]
    jid = queue.put(KLASS, {})
    queue.pop()
    assert [(w["name"], w["jobs"]) for w in qless_client.workers.counts] == [("test-worker", 1)]
    assert qless_client.workers["test-worker"]["jobs"] == [jid]


def _next_message(pubsub, deadline_seconds=5.0):
    deadline = time.monotonic() + deadline_seconds
    while time.monotonic() < deadline:
        message = pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1)
        if message is not None:
            return message["channel"], json.loads(message["data"])
    raise AssertionError("no pubsub message arrived")


def test_events_on_the_log_and_worker_channels(qless_client, redis_conn):
    pubsub = redis_conn.pubsub()
    pubsub.subscribe("ql:log", "ql:w:test-worker")
    queue = qless_client.queues["foo"]
    jid = queue.put(KLASS, {})
    assert _next_message(pubsub) == ("ql:log", {"jid": jid, "event": "put", "queue": "foo"})
    queue.pop()
    qless_client.jobs[jid].move("bar")  # takes the job away from its worker
    seen = [_next_message(pubsub) for _ in range(3)]
    lock_lost = {"jid": jid, "event": "lock_lost", "worker": "test-worker"}
    assert ("ql:w:test-worker", lock_lost) in seen
    assert ("ql:log", lock_lost) in seen
    assert ("ql:log", {"jid": jid, "event": "put", "queue": "bar"}) in seen
    pubsub.close()


def test_redis_refusing_writes_for_now_is_an_outage_not_a_refusal():
    from qless.exceptions import QlessException

    from qless_pool.client import redis_is_down

    for text in (
        "MISCONF Redis is configured to save RDB snapshots, but it's currently unable to persist",
        "command not allowed when used memory > 'maxmemory'.",
        "ERR Error running script: @user_script:12: READONLY You can't write against a read "
        "only replica.",
        "BUSY Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN NOSAVE.",
    ):
        assert redis_is_down(QlessException(text)), text
    assert not redis_is_down(QlessException("Heartbeat(): Job given out to another worker: w1"))
    assert not redis_is_down(ValueError("MISCONF"))
    # redis-py raises MASTERDOWN as a MasterDownError whose message no longer says MASTERDOWN.
    from qless_pool.outage import refuses_for_now

    cut_off = redis.exceptions.MasterDownError("Link with MASTER is down and replica-serve...")
    assert refuses_for_now(cut_off)  # so connect()'s connections raise it as RedisUnavailable
    wrapped = QlessException(str(cut_off))
    wrapped.__context__ = cut_off
    assert redis_is_down(wrapped)
