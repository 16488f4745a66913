"""Worker count ranges (``foo: 1..4``): the config, the rule (pool/scaling.py's Scaler, fed
samples by hand), the sampler's measure on a real qless, and real pools that scale up on a
backlog, back down when idle, hold when Redis is away, and keep to --max-workers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
from commands import one_line, qless_pool
from pools import free_port, scrape
from processes import alive, children, stays, title, wait_for
from redis_server import RedisServer
from workers import put, runs

from qless_pool.client import connect
from qless_pool.config import Range
from qless_pool.notes import RetireSlots
from qless_pool.pool.ranges import RetireAsked
from qless_pool.pool.scaling import Scaler, ScaleSettings, sample_waits
from qless_pool.pool.table import WorkerRecord

pytestmark = pytest.mark.timeout(90)
FAST = ("--scale-interval", "0.2", "--scale-down-after", "1")

# --- the config -----------------------------------------------------------------------------------


def test_a_range_in_the_config_and_dry_run(project):
    (project / "qless-pool.yml").write_text(
        'foo: 1..4\n"bar,baz": 2\nproduction:\n  foo: " 2 .. 8"\n  zero: 0..3\n'
    )
    done = qless_pool(project, "--dry-run")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"foo": "1..4", "bar,baz": 2}
    production = qless_pool(project, "--dry-run", "-E", "production")
    assert json.loads(production.stdout) == {"foo": "2..8", "bar,baz": 2, "zero": "0..3"}


@pytest.mark.parametrize(
    ("count", "message"),
    [
        ("4..1", "key 'foo': a worker count range goes from low to high: 1..4, not 4..1"),
        ("1..", "key 'foo': a worker count range is MIN..MAX, two whole numbers (1..8), not '1..'"),
        ("a..b", "a worker count range is MIN..MAX, two whole numbers (1..8), not 'a..b'"),
        ("-1..4", "key 'foo': a worker count range must not be negative ('-1..4')"),
        ("1..500000", "key 'foo': a worker count range goes at most to 100,000 ('1..500000')"),
        ("2000..3000", "key 'foo': the worker count must be at most 1000 ('2000..3000')"),
        ("1...4", "not '1...4'"),
        ("\u0661..\u0663", "not '\u0661..\u0663'"),  # Arabic-Indic digits: not plain decimal
        ("0001..3", "two whole numbers in plain decimal, not '0001..3'"),
    ],
)
def test_a_bad_range_is_a_config_error(project, count, message):
    (project / "qless-pool.yml").write_text(f"foo: {count}\n")
    done = qless_pool(project, "--dry-run")
    assert done.returncode == 78
    assert message in one_line(done)


def test_the_lows_of_the_ranges_count_toward_max_workers(project):
    (project / "qless-pool.yml").write_text("foo: 2..8\nbar: 2..8\n")
    assert qless_pool(project, "--dry-run", "--max-workers", "8").returncode == 0
    done = qless_pool(project, "--dry-run", "--max-workers", "3")
    assert done.returncode == 78 and "asks for at least 4 workers in all" in one_line(done)


# --- the rule -------------------------------------------------------------------------------------


def scaler(**settings) -> Scaler:
    rule = Scaler(ScaleSettings(**{"up_after": 1.0, "down_after": 30.0, **settings}))
    rule.configure({("foo",): Range(1, 4), ("bar",): 2})
    return rule


def test_up_fast_by_the_step_to_max_and_only_while_the_wait_is_long():
    rule = scaler(step=2)
    assert rule.wanted() == {("foo",): 1}  # a range starts at its MIN; fixed groups are not its
    assert rule.observe({("foo",): 0.5}, 2, now=0.0) == []  # waited, but not long
    [up] = rule.observe({("foo",): 1.5}, 2, now=1.0)
    assert (up.action, up.wanted, up.reason) == ("up", 3, "the next job has waited 1.5s (> 1s)")
    [up] = rule.observe({("foo",): 2.5}, 2, now=2.0)
    assert up.wanted == 4 and rule.wanted() == {("foo",): 4}  # at MAX: no further
    assert rule.observe({("foo",): 9.0}, 2, now=3.0) == []


def test_down_slow_one_idle_worker_each_quiet_period_to_min():
    rule = Scaler(ScaleSettings(down_after=30.0))
    rule.configure({("foo",): Range(1, 4)}, start={("foo",): 3})
    assert rule.wanted() == {("foo",): 3}  # a reload's count, where it was
    assert rule.observe({("foo",): None}, 0, now=0.0) == []  # quiet from now on
    assert rule.observe({("foo",): 0.2}, 0, now=20.0) == []  # a job waited: quiet starts again
    assert rule.observe({("foo",): None}, 0, now=21.0) == []
    assert rule.observe({("foo",): None}, 0, now=50.0) == []
    [down] = rule.observe({("foo",): None}, 0, now=51.0)
    assert (down.action, down.wanted) == ("down", 2)
    assert rule.wanted() == {("foo",): 3}  # until a worker has retired
    rule.retired(("foo",), now=52.0)
    assert rule.wanted() == {("foo",): 2}
    assert rule.observe({("foo",): None}, 0, now=60.0) == []  # the next step: another period
    assert [d.wanted for d in rule.observe({("foo",): None}, 0, now=82.0)] == [1]
    rule.retired(("foo",), now=83.0)
    assert rule.observe({("foo",): None}, 0, now=500.0) == []  # at MIN
    rule.retired(("foo",), now=501.0)
    assert rule.wanted() == {("foo",): 1}


def test_the_cap_binds_across_groups_and_is_said_once():
    rule = Scaler(ScaleSettings(up_after=1.0, cap=5))
    rule.configure({("a",): Range(1, 4), ("b",): Range(1, 4), ("c",): 1})
    decided = []
    for second in range(5):
        decided += rule.observe({("a",): 5.0, ("b",): 5.0}, 1, now=float(second))
    assert sum(rule.wanted().values()) + 1 == 5  # never past the cap
    held = [d for d in decided if d.action == "hold"]
    assert len(held) == 1 and "--max-workers 5" in held[0].reason  # said once a binding
    rule.observe({("a",): None, ("b",): None}, 1, now=6.0)  # no longer bound
    again = rule.observe({("a",): 5.0, ("b",): 5.0}, 1, now=7.0)
    assert [d.action for d in again] == ["hold"]


def test_a_hup_keeps_a_groups_count_clamped_and_redis_away_holds():
    rule = scaler()
    rule.observe({("foo",): 5.0}, 2, now=0.0)
    rule.observe({("foo",): 5.0}, 2, now=1.0)
    assert rule.wanted() == {("foo",): 3}
    rule.configure({("foo",): Range(1, 2)})
    assert rule.wanted() == {("foo",): 2}
    last = rule.report()[("foo",)]["last"]  # status's last word: the clamp, not "up to 3"
    assert (last["action"], last["wanted"], last["reason"]) == (
        "set", 2, "the config's range is now 1..2",
    )  # fmt: skip
    rule.configure({("foo",): 2})
    assert rule.wanted() == {}
    rule = scaler(down_after=1.0)
    rule.observe({("foo",): None}, 0, now=0.0)
    rule.unavailable("Connection refused")
    assert rule.observe({("foo",): None}, 0, now=1.5) == []  # the quiet period starts again


# --- the measure ----------------------------------------------------------------------------------


def old_put(client, queue, jid, seconds_ago, priority=0):
    """A job put ``seconds_ago`` (qless takes the time from the caller)."""
    client._lua(keys=[], args=["put", time.time() - seconds_ago, queue, jid, "testjobs.Noop",
                               "{}", 0, "priority", priority])  # fmt: skip


def test_the_wait_is_the_next_jobs_age_paused_queues_count_as_empty(client):
    old_put(client, "a", "a-old", 30)
    old_put(client, "a", "a-new", 2)
    old_put(client, "b", "b-high", 5, priority=10)
    old_put(client, "b", "b-low", 50)  # older, but a worker takes the high one first
    old_put(client, "p", "p-old", 100)
    client.queues["p"].pause()
    client.jobs["a-old"].priority = 0  # rescored without its put time: read from its history
    waits = sample_waits(client, [("a",), ("b",), ("p",), ("a", "p"), ("empty",)], time.time())
    assert 29 < waits[("a",)] < 40 and 4 < waits[("b",)] < 10
    assert waits[("p",)] is None and waits[("empty",)] is None
    assert waits[("a", "p")] == waits[("a",)]


# --- real pools -----------------------------------------------------------------------------------


def test_a_backlog_scales_up_every_job_runs_once_and_idle_scales_back_down(
    start_pool, client, redis_conn
):
    pool = start_pool(*FAST, config="foo: 1..4\n", expect={"foo": 1})
    jids = [put(client, "foo", "Sleep", {"seconds": 0.1}) for _ in range(240)]
    wait_for(lambda: len(pool.workers()) == 4, timeout=15, message="4 workers")
    pool.wait_log("scaling foo up to 4: the next job has waited")
    wait_for(lambda: client.queues["foo"].counts["waiting"] == 0, timeout=40)
    wait_for(lambda: len(runs(redis_conn)) == 240, timeout=20, message="every job run")
    assert sorted(run["jid"] for run in runs(redis_conn)) == sorted(jids)  # each exactly once
    wait_for(lambda: all(client.jobs[j].state == "complete" for j in jids[-20:]), timeout=10)
    assert all(
        [e["what"] for e in client.jobs[j].history].count("popped") == 1 for j in jids
    )  # none popped twice: no worker retired mid-job
    wait_for(lambda: len(pool.workers()) == 1, timeout=20, message="back to 1")
    pool.wait_log("retired, idle", count=3)  # logged once reaped: after it left the table
    text = pool.log_text()
    assert text.count("retired, idle") == 3 and text.count("WINCH: idle, retiring") == 3


def test_a_paused_queue_never_scales_up(start_pool, client):
    client.queues["foo"].pause()
    pool = start_pool(*FAST, config="foo: 1..4\n", expect={"foo": 1})
    for _ in range(30):
        put(client, "foo", "Noop")
    stays(lambda: len(pool.workers()) == 1, 3.0, interval=0.1, message="one worker")
    assert "scaling foo up" not in pool.log_text()


def test_a_winch_the_pool_did_not_send_retires_nobody(start_pool, client):
    # A terminal's resize sends WINCH to its whole process group (--single-process-group).
    pool = start_pool(*FAST, config="foo: 1..3\nbar: 1\n", expect={"foo": 1, "bar": 1})
    workers = pool.workers()
    for worker in workers:
        os.kill(worker, signal.SIGWINCH)
    stays(lambda: sorted(pool.workers()) == sorted(workers), 1.5, interval=0.05,
          message="every worker stays")  # fmt: skip
    assert "retiring" not in pool.log_text() and "retired" not in pool.log_text()
    jid = put(client, "foo", "Noop")
    wait_for(lambda: client.jobs[jid].state == "complete")


def test_the_retire_slots_say_who_was_asked():
    slots = RetireSlots()
    assert not slots.asked(1234)
    slots.ask(1234)
    assert slots.asked(1234) and not slots.asked(1234 + RetireSlots.SLOTS)
    slots.withdraw(1234 + RetireSlots.SLOTS)  # another pid of the slot: not withdrawn
    assert slots.asked(1234)
    slots.withdraw(1234)
    assert not slots.asked(1234)


def test_scaling_down_asks_each_idle_candidate_in_turn():
    """The youngest first; one that stayed (busy) is not asked again before the others."""
    pool = _RangesOnly()
    for pid, started in ((11, 1.0), (12, 2.0), (13, 3.0), (14, 4.0)):
        pool.workers[pid] = WorkerRecord(pid=pid, queues=("foo",), started_at=started)
    asked = None
    order = []
    for _ in range(6):
        worker = pool._worker_to_retire(("foo",), asked)
        order.append(worker.pid)
        tried = (asked.tried if asked else frozenset()) | {worker.pid}
        asked = RetireAsked(worker.pid, 0.0, tried if len(tried) < 4 else frozenset())
    assert order == [14, 13, 12, 11, 14, 13]


def test_a_paused_pool_holds_its_counts(start_pool, client):
    pool = start_pool(*FAST, "--scale-up-after", "0.2", config="foo: 1..4\n", expect={"foo": 1})
    pool.send(signal.SIGUSR2)
    pool.wait_log("USR2")
    for _ in range(30):
        put(client, "foo", "Noop")
    stays(lambda: len(pool.workers()) == 1, 2.0, interval=0.1, message="one worker, paused")
    assert "scaling foo up" not in pool.log_text()
    pool.send(signal.SIGCONT)
    wait_for(lambda: client.queues["foo"].counts["waiting"] == 0, timeout=20)


def test_hup_from_a_range_to_a_fixed_count_leaves_the_manager_idle(start_pool):
    pool = start_pool(*FAST, config="foo: 1..3\n", expect={"foo": 1})
    (pool.directory / "qless-pool.yml").write_text("foo: 2\n")
    pool.send(signal.SIGHUP)
    pool.wait_for_workers({"foo": 2})
    wait_for(lambda: not [p for p in children(pool.pid) if "scaler" in title(p)],
             message="the sampler gone")  # fmt: skip
    before = cpu_seconds(pool.pid)
    stays(lambda: alive(pool.pid), 1.0, interval=0.1, message="the manager up")  # a window
    assert cpu_seconds(pool.pid) - before < 0.3  # (a loop woken by a closed pipe: ~1 s)


def test_reload_passes_a_ranges_count_on(start_pool, client):
    pool = start_pool(*FAST, config="foo: 1..3\n", expect={"foo": 1})
    for _ in range(200):
        put(client, "foo", "Sleep", {"seconds": 0.2})
    wait_for(lambda: len(pool.workers()) == 3, timeout=15, message="3 workers")
    done = subprocess.run([pool_status_command(), "reload", "--pid", str(pool.pid), "--wait"],
                          cwd=pool.directory, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    [manager] = [p for p in children(pool.pid) if title(p).startswith("qless-pool-manager")] or [
        pool.pid
    ]
    assert "range 1..3" in subprocess.run(
        [pool_status_command(), "status", "--pid", str(manager)], capture_output=True, text=True,
        timeout=30,
    ).stdout  # fmt: skip
    wait_for(lambda: client.queues["foo"].counts["waiting"] == 0, timeout=60)


def test_hup_from_a_range_to_a_fixed_count_and_back(start_pool, client):
    pool = start_pool(*FAST, config="foo: 1..4\n", expect={"foo": 1})
    (pool.directory / "qless-pool.yml").write_text("foo: 3\n")
    pool.send(signal.SIGHUP)
    pool.wait_for_workers({"foo": 3})
    (pool.directory / "qless-pool.yml").write_text("foo: 2..5\n")
    pool.send(signal.SIGHUP)
    pool.wait_log("HUP: config foo: 2..5")
    pool.wait_for_workers({"foo": 3})  # a fixed count becomes a range where it was
    (pool.directory / "qless-pool.yml").write_text("foo: 9..2\n")
    pool.send(signal.SIGHUP)
    pool.wait_log("keeping the current config and workers")
    pool.wait_for_workers({"foo": 3})


def test_redis_away_while_scaled_up_holds_the_counts(start_pool):
    server = RedisServer().start()
    try:
        client = connect(server.url(), worker_name="test-producer")
        pool = start_pool(*FAST, config="foo: 1..3\n", url=server.url(), expect={"foo": 1})
        for _ in range(200):
            put(client, "foo", "Sleep", {"seconds": 0.2})
        wait_for(lambda: len(pool.workers()) == 3, timeout=15, message="3 workers")
        server.stop()
        pool.wait_log("the sampler cannot reach Redis", timeout=10)

        def status_says_redis_is_down() -> bool:
            done = subprocess.run(
                [pool_status_command(), "status", "--json", "--pid", str(pool.pid)],
                capture_output=True, text=True, timeout=30,
            )  # fmt: skip
            [foo] = json.loads(done.stdout)["groups"]
            return bool(foo["scaling"]["redis_down"])

        wait_for(status_says_redis_is_down, message="status to say the counts hold")
        stays(lambda: len(pool.workers()) == 3, 3.0, interval=0.1, message="3 workers hold")
        assert alive(pool.pid)
        server.start()
        wait_for(lambda: client.queues["foo"].counts["waiting"] == 0, timeout=60)
        wait_for(lambda: len(pool.workers()) == 1, timeout=20, message="back to 1")
    finally:
        server.remove()


def test_the_host_cap_binds_and_is_logged(start_pool, client):
    pool = start_pool(*FAST, "--max-workers", "5", config="foo: 1..4\nbar: 1..4\n",
                      expect={"foo": 1, "bar": 1})  # fmt: skip
    for _ in range(150):
        put(client, "foo", "Sleep", {"seconds": 0.2})
        put(client, "bar", "Sleep", {"seconds": 0.2})
    pool.wait_log("held at the cap", timeout=15)
    wait_for(lambda: len(pool.workers()) == 5, message="5 workers")
    stays(lambda: len(pool.workers()) <= 5, 1.5, interval=0.05, message="at most 5")


def test_status_and_metrics_show_the_range_and_the_last_decision(start_pool, client, project):
    port = free_port()
    pool = start_pool(*FAST, "--metrics-port", str(port), config="foo: 1..3\nbar: 1\n",
                      expect={"foo": 1, "bar": 1})  # fmt: skip
    for _ in range(100):
        put(client, "foo", "Sleep", {"seconds": 0.2})
    wait_for(lambda: len(pool.workers()) == 4, timeout=15)
    done = subprocess.run([pool_status_command(), "status", "--json", "--pid", str(pool.pid)],
                          capture_output=True, text=True, timeout=30)  # fmt: skip
    groups = {",".join(g["queues"]): g for g in json.loads(done.stdout)["groups"]}
    foo = groups["foo"]
    assert (foo["range"], foo["wanted"], foo["live"]) == ("1..3", 3, 3)
    assert foo["scaling"]["last"]["action"] == "up" and "waited" in foo["scaling"]["last"]["reason"]
    assert "range" not in groups["bar"]
    text = subprocess.run([pool_status_command(), "status", "--pid", str(pool.pid)],
                          capture_output=True, text=True, timeout=30).stdout  # fmt: skip
    assert "range 1..3; up to 3" in text
    samples = scrape(port)
    assert samples['qless_pool_workers_wanted{queues="foo"}'] == 3
    assert samples['qless_pool_workers_wanted{queues="bar"}'] == 1
    assert samples['qless_pool_scale_events_total{direction="up",queues="foo"}'] == 2


def test_drain_runs_every_range_at_its_max(start_pool, client):
    for _ in range(20):
        put(client, "foo", "Sleep", {"seconds": 0.3})
    pool = start_pool("--drain", config="foo: 1..3\n")
    wait_for(lambda: len(pool.workers()) == 3, timeout=15, message="3 workers")
    assert pool.process.wait(timeout=30) == 0


def pool_status_command() -> str:
    from pools import SCRIPT

    return SCRIPT


class _RangesOnly:
    """The ranges mixin's choice of a worker to ask, over a table of our own."""

    from qless_pool.pool.ranges import Ranges as _Ranges

    _worker_to_retire = _Ranges._worker_to_retire

    def __init__(self) -> None:
        self.workers: dict[int, WorkerRecord] = {}


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as file:
        fields = file.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
