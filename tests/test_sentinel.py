"""redis+sentinel:// URLs against real Redis Sentinels: a master, its replica, two Sentinels, and
failovers in the middle of a pool's run; and a master short of replicas (min-replicas-to-write),
which is an outage too."""

from __future__ import annotations

import json
import logging
import os
import re

import pytest
from processes import alive, wait_for
from redis_sentinel import MASTER_PASSWORD, SENTINEL_PASSWORD, SentinelCluster, free_port
from workers import put, runs, wait_state

from qless_pool.client import Outage, RedisUnavailable, connect, pipelined, redis_is_down


@pytest.fixture
def cluster():
    started = SentinelCluster().start()
    yield started
    started.remove()


def dead_sentinel() -> str:
    """A Sentinel the URL names that is not there (one Sentinel host down): skipped."""
    return f"127.0.0.1:{free_port()}"


def until_it_works(call, timeout: float = 20.0):
    """Call ``call()`` until it returns, as a worker rides out an outage: every error meanwhile
    must be one that redis_is_down() calls Redis being away."""
    errors = []

    def attempt():
        try:
            return (call(),)
        except Exception as error:
            assert redis_is_down(error), f"not an outage: {error!r}"
            errors.append(error)
            return None

    [answer] = wait_for(attempt, timeout, interval=0.1, message=f"{call} to work again")
    return answer, errors


def test_a_sentinel_url_reaches_the_master_with_its_passwords(cluster):
    client = connect(cluster.url(extra_sentinels=(dead_sentinel(),)), "test-producer")
    jid = client.queues["foo"].put("testjobs.Noop", {})
    # On the master, in the database the URL names, through the password it gives.
    assert cluster.master.client().hget(f"ql:j:{jid}", "state") == b"waiting"
    pool = client.redis.connection_pool
    assert pool.service_name == "mymaster"
    assert pool.connection_kwargs["password"] == MASTER_PASSWORD
    assert pool.connection_kwargs["decode_responses"] is True
    assert pool.connection_kwargs["protocol"] == 2
    for sentinel in pool.sentinel_manager.sentinels:
        assert sentinel.connection_pool.connection_kwargs["password"] == SENTINEL_PASSWORD
    # The database is the URL's.
    other = connect(cluster.url(db=3), "test-producer")
    other.queues["foo"].put("testjobs.Noop", {})
    assert cluster.master.client(db=3).zcard("ql:q:foo-work") == 1


@pytest.mark.parametrize("crash", [False, True], ids=["sentinel-failover", "master-killed"])
def test_a_client_follows_a_failover_commands_pipelines_and_pubsub(cluster, crash):
    client = connect(cluster.url(extra_sentinels=(dead_sentinel(),)), "w1", socket_timeout=3)
    pubsub = client.redis.pubsub()
    pubsub.subscribe("ql:log")
    before = client.queues["foo"].put("testjobs.Noop", {})
    [counts] = pipelined(client, [["queues", "foo"]])
    assert json.loads(counts)["waiting"] == 1
    # Connected to the master: the pubsub connection and an idle one for commands.
    assert len(client.redis.connection_pool._available_connections) == 1
    cluster.fail_over(crash)

    # Each way a worker talks to Redis: errors that are outages, then the new master.
    after, errors = until_it_works(lambda: client.queues["foo"].put("testjobs.Noop", {}))
    if not crash:  # the demoted master answered READONLY: an outage, not a refusal
        assert any("previous master" in str(e) or "READONLY" in str(e) for e in errors), errors
    new_master = cluster.replica.client()
    assert {before, after} <= {jid.decode() for jid in new_master.zrange("ql:q:foo-work", 0, -1)}
    answers, _ = until_it_works(lambda: pipelined(client, [["queues", "foo"], ["get", after]]))
    assert json.loads(answers[0])["waiting"] == 2
    fresh = client.redis.pubsub()  # a worker's next subscription, after an outage
    fresh.subscribe("ql:w:w1")
    wait_for(lambda: fresh.get_message(timeout=0.1) is not None)
    assert dict(new_master.pubsub_numsub("ql:w:w1"))[b"ql:w:w1"] == 1
    for pubsubs in (pubsub, fresh):
        pubsubs.close()


@pytest.mark.parametrize("crash", [False, True], ids=["sentinel-failover", "master-killed"])
def test_a_pool_rides_out_a_failover_mid_run_and_loses_nothing(cluster, start_pool, crash):
    # (cluster first: the pool is stopped before the servers are)
    url = cluster.url(extra_sentinels=(dead_sentinel(),))
    pool = start_pool(url=url, config="foo: 2\n", expect={"foo": 2})
    workers = pool.workers()
    producer = connect(url, "test-producer", socket_timeout=3)
    # Jobs that do not touch Redis themselves: a job's own write during the failover would
    # fail the job (qless-py fails a job whose function raises), which is not what is tested.
    jids = [put(producer, "foo", "Quiet", {"seconds": 0.02}) for _ in range(150)]
    old_master = cluster.master.client()
    wait_for(lambda: old_master.zcard("ql:completed") >= 30, 30, message="30 jobs done")
    cluster.fail_over(crash)
    for _ in range(50):  # put through the Sentinels: on the new master only
        jid, _ = until_it_works(lambda: put(producer, "foo", "Quiet", {"seconds": 0.02}))
        jids.append(jid)

    new_master = cluster.replica.client(decode_responses=True)

    def states():
        pipe = new_master.pipeline(transaction=False)
        for jid in jids:
            pipe.hget(f"ql:j:{jid}", "state")
        return pipe.execute()

    wait_for(lambda: set(states()) == {"complete"}, 60, 0.2, message="every job complete")
    names = {f"{os.uname().nodename}-{pid}" for pid in workers}
    for jid in jids:
        history = producer.jobs[jid].history  # through the Sentinels: the new master's
        popped = [entry["worker"] for entry in history if entry["what"] == "popped"]
        assert len(popped) == 1, history  # ran once: no completion was lost
        assert popped[0] in names
    assert pool.workers() == workers  # ridden out: no worker died
    log = pool.log_text()
    assert "Redis is unavailable" in log and "Redis is back" in log
    assert MASTER_PASSWORD not in log and SENTINEL_PASSWORD not in log


def refused(redis_conn) -> int:
    """How many commands Redis has refused NOREPLICAS."""
    return redis_conn.info("errorstats").get("errorstat_NOREPLICAS", {}).get("count", 0)


def test_a_master_short_of_replicas_is_an_outage_and_the_job_is_not_lost(
    start_worker, client, redis_conn
):
    # min-replicas-to-write 1 and no replica: every write is refused NOREPLICAS. That is Redis
    # not able to serve now, not qless refusing: the worker must not kill its job because a
    # heartbeat was refused, nor drop the completion it owes.
    client.config["heartbeat"] = 6  # a heartbeat every 2 s
    worker = start_worker(["foo"])
    jid = put(client, "foo", "Sleep", {"seconds": 3})
    wait_for(lambda: runs(redis_conn), message="the job to start")  # its one write is done
    redis_conn.config_set("min-replicas-to-write", 1)
    try:
        # (Redis 6.2 quotes NOREPLICAS in a script error)
        wait_for(lambda: re.search(r"Redis is unavailable \(.*NOREPLICAS", worker.log_text()), 10)
        wait_for(lambda: worker.job_child() is None, 10, message="the job to end")
        # Several attempts to send the completion, refused; reads and SUBSCRIBE get through.
        ended = refused(redis_conn)
        wait_for(lambda: refused(redis_conn) >= ended + 3, message="three more refused writes")
    finally:
        redis_conn.config_set("min-replicas-to-write", 0)
    wait_state(client, jid, "complete", timeout=30)
    assert [run["jid"] for run in runs(redis_conn)] == [jid]  # ran once: not killed, not re-run
    log = worker.log_text()
    assert "refused" not in log
    # One outage, not one per attempt (Redis answers the worker's reads and SUBSCRIBE all
    # along). A busy worker may take Redis for back once, after a look that wrote nothing.
    assert 1 <= log.count("Redis is unavailable") <= 2, log
    wait_for(lambda: "Redis is back after" in worker.log_text())
    assert alive(worker.pid)


def test_an_outage_that_lets_reads_through_is_one_outage_with_backoff(caplog):
    # What the worker sees when Redis refuses writes only: its first look of each attempt (a
    # read) gets through, the next (a write) does not.
    outage = Outage(logging.getLogger("test-outage"))
    error = RedisUnavailable("NOREPLICAS Not enough good replicas to write.")
    now = 100.0
    with caplog.at_level(logging.INFO, logger="test-outage"):
        outage.failed(now, error)
        delays = []
        for _ in range(5):
            now = outage.retry_at
            outage.recovered(now)  # the read
            outage.failed(now, error)  # the write
            delays.append(outage.delay)
        assert delays == [1, 2, 4, 8, 16]  # backing off, not retrying twice a second
        assert [r.getMessage()[:20] for r in caplog.records] == ["Redis is unavailable"]
        now = outage.retry_at
        outage.recovered(now)  # Redis is back: a look, then another
        outage.recovered(now + 1)
        assert caplog.records[-1].getMessage() == "Redis is back after 31.5s"
        assert (outage.since, outage.delay, outage.retry_at) == (None, 0.0, 0.0)
