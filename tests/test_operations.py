"""The operations layer (ops/operations.py) as the commands and the dashboard use it: plain data
from a real qless, and actions on it."""

from __future__ import annotations

import json

import pytest
from workers import put

from qless_pool.ops.operations import JOB_STATES, NotFound, Operations


@pytest.fixture
def ops(client):
    return Operations(client)


def test_jobs_of_a_queue_by_state_in_pages(ops, client):
    low = [put(client, "foo", "Noop", priority=0) for _ in range(3)]
    high = put(client, "foo", "Noop", priority=5)
    later = put(client, "foo", "Noop", delay=600)
    blocked = client.queues["foo"].put("testjobs.Noop", {}, depends=[later])
    waiting = ops.jobs("foo", "waiting", 0, 2)
    assert waiting.total == 4
    assert [job["jid"] for job in waiting.jobs] == [high, low[0]]  # as pop would take them
    assert [job["jid"] for job in ops.jobs("foo", "waiting", 2, 10).jobs] == low[1:]
    assert [job["jid"] for job in ops.jobs("foo", "scheduled").jobs] == [later]
    assert [job["jid"] for job in ops.jobs("foo", "depends").jobs] == [blocked]
    [popped] = client.queues["foo"].pop(1)
    running = ops.jobs("foo", "running")
    assert (running.total, [job["jid"] for job in running.jobs]) == (1, [popped.jid])
    for state in JOB_STATES:
        assert ops.jobs("foo", state, 1000, 5).jobs == []  # past the end: an empty page
    with pytest.raises(ValueError, match="state 'done': one of waiting, running"):
        ops.jobs("foo", "done")
    with pytest.raises(NotFound, match="no queue 'nope' in qless; its queues: foo"):
        ops.jobs("nope", "waiting")


def test_a_job_its_data_decoded_and_a_recurring_template(ops, client):
    jid = put(client, "foo", "Noop", {"a": [1, 2]})
    assert ops.job(jid)["data"] == {"a": [1, 2]}
    client.queues["foo"].recur("testjobs.Noop", {"r": 1}, interval=60, jid="every-minute")
    template = ops.job("every-minute")
    assert (template["interval"], template["data"]) == (60, {"r": 1})
    with pytest.raises(NotFound, match="no job 'missing'"):
        ops.job("missing")


def test_move_and_priority_keep_the_rest_of_the_job(ops, client):
    jid = client.queues["foo"].put("testjobs.Noop", {"x": 1}, tags=["t"], priority=1, retries=2)
    ops.move(jid, "bar")
    ops.set_priority(jid, 9)
    job = client.jobs[jid]
    assert (job.queue_name, job.state, job.priority, job.tags, job.data) == (
        "bar", "waiting", 9, ["t"], {"x": 1},
    )  # fmt: skip
    assert job.original_retries == 2
    with pytest.raises(NotFound):
        ops.move("missing", "bar")
    with pytest.raises(NotFound):
        ops.set_priority("missing", 1)


def test_queues_failure_groups_and_a_page_of_one(ops, client):
    assert ops.queues() == [] and ops.failure_groups() == {}
    jids = [put(client, "foo", "Noop") for _ in range(3)]
    for job in client.queues["foo"].pop(3):
        job.fail("foo-Boom", f"boom {job.jid}")
    assert ops.failure_groups() == {"foo-Boom": 3}
    page = ops.failed("foo-Boom", 1, 1)
    assert (page.total, page.offset, len(page.jobs)) == (3, 1, 1)
    assert page.jobs[0]["jid"] in jids and page.jobs[0]["failure"]["group"] == "foo-Boom"
    with pytest.raises(NotFound, match="no failed jobs in group 'foo-Nope'"):
        ops.failed("foo-Nope")
    [counts] = ops.queues()
    assert (counts.name, counts.waiting, counts.running, counts.paused) == ("foo", 0, 0, False)
    ops.pause("foo")
    assert ops.queue("foo").paused is True
    ops.unpause("foo")
    assert ops.queue("foo").paused is False


def test_a_bulk_action_keeps_the_first_refusals_and_counts_them_all(ops, client):
    done = ops.retry([f"missing-{n}" for n in range(50)])
    assert (done.acted, done.refusals, len(done.refused)) == (0, 50, 20)
    assert set(done.refused.values()) == {"no such job"}
    done = ops.cancel(["missing", "missing"])  # named twice: refused once
    assert (done.acted, done.refusals) == (0, 1)
    assert json.loads(client("failed")) == {}
