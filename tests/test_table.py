"""The manager's decisions over its worker table (pool/table.py), as plain functions: no process,
no Redis. The process tests (test_manager.py) show the same decisions taken by a real pool."""

from __future__ import annotations

from qless_pool.pool.table import (
    HEALTHY_AFTER,
    MAX_BACKOFF,
    Backoff,
    WorkerRecord,
    clean_exit,
    next_spawn_time,
    note_exit,
    plan,
)

FOO, BAR = ("foo",), ("bar", "foo")


def record(pid, queues=FOO, started=0.0, **kwargs):
    return WorkerRecord(pid, queues, started, **kwargs)


def test_missing_workers_are_spawned_group_by_group():
    todo = plan({FOO: 2, BAR: 1}, [record(1)], {}, now=10.0)
    assert todo.spawn == [FOO, BAR]
    assert todo.retire == [] and todo.healthy == []


def test_surplus_workers_are_retired_newest_first():
    workers = [record(1, started=1.0), record(2, started=3.0), record(3, started=2.0)]
    todo = plan({FOO: 1}, workers, {}, now=10.0)
    assert [w.pid for w in todo.retire] == [2, 3]
    assert todo.spawn == []


def test_retiring_workers_do_not_count_and_a_group_no_longer_wanted_goes():
    workers = [record(1, retiring=True), record(2, BAR)]
    todo = plan({FOO: 1}, workers, {}, now=10.0)
    assert todo.spawn == [FOO]  # the retiring one is finishing its job: it is replaced now
    assert [w.pid for w in todo.retire] == [2]


def test_winch_wants_nothing_and_every_worker_is_retired():
    todo = plan({}, [record(1), record(2, BAR)], {}, now=10.0)
    assert sorted(w.pid for w in todo.retire) == [1, 2]


def test_a_group_in_backoff_waits_and_others_do_not():
    backoffs = {FOO: Backoff(failures=2, until=12.0)}
    assert plan({FOO: 1, BAR: 1}, [], backoffs, now=11.0).spawn == [BAR]
    assert plan({FOO: 1, BAR: 1}, [], backoffs, now=12.0).spawn == [FOO, BAR]


def test_a_spawn_delay_starts_one_at_a_time_and_still_retires():
    todo = plan({FOO: 3}, [], {}, now=10.0, spawn_delay=0.5)
    assert todo.spawn == [FOO]
    workers = [record(1, BAR)]
    todo = plan({FOO: 3}, workers, {}, now=10.0, next_spawn_at=10.5, spawn_delay=0.5)
    assert todo.spawn == [] and [w.pid for w in todo.retire] == [1]


def test_a_backing_off_group_starts_healthily_again_once_a_worker_began_or_lived():
    backoffs = {FOO: Backoff(failures=3, until=0.0)}
    assert plan({FOO: 1}, [record(1, started=9.0)], backoffs, now=10.0).healthy == []
    assert plan({FOO: 1}, [record(1, started=9.0, began=True)], backoffs, now=10.0).healthy == [FOO]
    lived = plan({FOO: 1}, [record(1, started=10.0 - HEALTHY_AFTER)], backoffs, now=10.0)
    assert lived.healthy == [FOO]


def test_failed_starts_back_off_doubling_up_to_a_minute():
    backoff = Backoff()
    delays = [note_exit(backoff, lived=0.1, began=False, now=100.0) for _ in range(9)]
    assert delays == [1, 2, 4, 8, 16, 32, MAX_BACKOFF, MAX_BACKOFF, MAX_BACKOFF]
    assert backoff.until == 100.0 + MAX_BACKOFF


def test_a_death_after_the_first_job_or_after_a_while_is_no_failed_start():
    backoff = Backoff(failures=4, until=50.0)
    assert note_exit(backoff, lived=0.1, began=True, now=100.0) is None
    assert backoff.failures == 0
    backoff.failures = 2
    assert note_exit(backoff, lived=HEALTHY_AFTER, began=False, now=100.0) is None
    assert backoff.failures == 0


def test_when_the_next_spawn_is_due():
    backoffs = {FOO: Backoff(failures=1, until=15.0)}
    assert next_spawn_time({FOO: 1}, [], backoffs, now=10.0, next_spawn_at=0.0, idle=1.0) == 15.0
    assert next_spawn_time({FOO: 1}, [record(1)], {}, now=10.0, next_spawn_at=0.0, idle=1.0) == 11.0
    assert next_spawn_time({BAR: 1}, [], {}, now=10.0, next_spawn_at=12.0, idle=1.0) == 12.0


def test_a_clean_exit_is_a_stop_as_asked_or_a_recycle():
    assert clean_exit(0) and clean_exit(75 << 8)
    assert not clean_exit(1 << 8) and not clean_exit(9)  # exit status 1; killed by SIGKILL
