"""Every option's range, checked at start in every entry: the command line, the Invoke settings
and tasks, ``qless_pool.run(...)`` and a Worker made by hand. A value outside it is one line and
exit 2 before anything starts, never a worker that crashes on it again and again."""

from __future__ import annotations

import os
import signal

import pytest
from commands import invoke, one_line, qless_pool
from processes import alive, wait_for
from redis_server import RedisServer

import qless_pool as package
from qless_pool.options import MAX_SECONDS, OPTIONS, OptionError, Seconds, Whole, check
from qless_pool.worker import Worker

BIG = "1" + "0" * 30


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-i", "1e-320"], "argument -i/--interval: must be at least 0.01 seconds: '1e-320'"),
        (["-i", "0"], "argument -i/--interval: must be at least 0.01 seconds: '0'"),
        (["-i", "7200"], "argument -i/--interval: must be at most 3,600 seconds: '7200'"),
        (["--spawn-delay", "-1"], "argument -s/--spawn-delay: must not be negative: '-1'"),
        (["--job-timeout", "1e300"], "argument --job-timeout: must be at most 10,000,000 seconds: '1e300'"),
        (["--graceful-timeout", "0"], "argument --graceful-timeout: must be more than 0"),
        (["--prefetch", BIG], f"argument --prefetch: must be at most 1,000: '{BIG}'"),
        (["--prefetch", "0"], "argument --prefetch: must be 1 or more: '0'"),
        (["--max-jobs", "1_0"], "argument --max-jobs: not a whole number: '1_0'"),
        (["--max-jobs", "0x10"], "argument --max-jobs: not a whole number: '0x10'"),
        (["--max-jobs-jitter", "-1"], "argument --max-jobs-jitter: must not be negative: '-1'"),
        (["--max-memory", BIG], f"argument --max-memory: must be at most 10,000,000: '{BIG}'"),
        (["--max-workers", "0"], "argument --max-workers: must be 1 or more: '0'"),
        (["--metrics-port", "70000"], "argument --metrics-port: must be at most 65,535: '70000'"),
        (["-R", ""], "argument -R/--redis: empty (an unset variable?)"),
        (["--user", ""], "argument --user: empty (an unset variable?)"),
        (["--group", " "], "argument --group: empty (an unset variable?)"),
    ],
)  # fmt: skip
def test_a_value_outside_its_range_is_one_line_and_exit_2(project, args, message):
    result = qless_pool(project, *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (project / "tmp").exists()


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("socket_timeout=nan", "socket_timeout must be a number of seconds more than 0, not nan"),
        ("socket_timeout=-1", "socket_timeout must be a number of seconds more than 0, not -1.0"),
        ("socket_connect_timeout=0", "socket_connect_timeout must be a number of seconds more than 0, not 0.0"),
        ("health_check_interval=-5", "health_check_interval must be a number of seconds, 0 or more, not -5"),
    ],
)  # fmt: skip
def test_a_url_option_a_connection_would_fail_on_is_refused(project, query, message):
    result = qless_pool(project, "-R", f"redis://localhost:6379/0?{query}")
    assert result.returncode == 2
    line = one_line(result)
    assert line.startswith("qless-pool: bad Redis URL (from --redis): ")
    assert message in line


@pytest.mark.parametrize("daemon", [False, True], ids=["foreground", "daemon"])
def test_a_database_beyond_the_servers_is_refused_at_start(project, redis_url, daemon):
    url = redis_url.replace("db=0", "db=99999")
    assert url != redis_url
    result = qless_pool(project, *(["-d"] if daemon else []), "-R", url)
    assert result.returncode == 2
    assert one_line(result) == (
        f"qless-pool: Redis refuses the database of {url}: DB index is out of range (the "
        "server has as many as its 'databases' setting says, numbered from 0)"
    )
    assert not (project / "tmp").exists()


def test_a_database_beyond_the_servers_is_an_outage_for_a_worker_not_a_crash(
    start_worker, redis_url
):
    # Redis was away at start, so the look at start could not say: the worker rides it out.
    worker = start_worker(["foo"], url=redis_url.replace("db=0", "db=99999"), ready=False)
    wait_for(
        lambda: "Redis is unavailable (DB index is out of range)" in worker.log_text(),
        message="the worker to take it for an outage",
    )
    assert alive(worker.pid)
    worker.send(signal.SIGQUIT)
    worker.wait_gone()
    assert "Traceback" not in worker.log_text()


def test_run_checks_the_options_before_loading_the_application():
    with pytest.raises(OptionError, match=r"^interval: must be at least 0.01 seconds: 1e-320$"):
        package.run({"foo": 1}, interval=1e-320, preload_modules=["no_such_module_here"])
    with pytest.raises(OptionError, match=r"^prefetch: must be at most 1,000"):
        package.run({"foo": 1}, prefetch=10**30, preload_modules=["no_such_module_here"])
    with pytest.raises(OptionError, match=r"^redis: empty"):
        package.run({"foo": 1}, redis_url="", preload_modules=["no_such_module_here"])


def test_a_worker_made_by_hand_checks_its_options():
    with pytest.raises(OptionError, match=r"^interval: must be at least 0.01 seconds"):
        Worker(["foo"], interval=1e-320)
    with pytest.raises(OptionError, match=r"^job_timeout: not a finite number of seconds"):
        Worker(["foo"], job_timeout=float("nan"))
    with pytest.raises(OptionError, match=r"^max_jobs: must be 1 or more"):
        Worker(["foo"], max_jobs=0)


def test_every_range_takes_its_bounds_and_refuses_past_them():
    ranged = [opt for opt in OPTIONS if isinstance(opt.kind, (Seconds, Whole))]
    assert len(ranged) >= 10
    for opt in ranged:
        low, high = opt.kind.minimum, opt.kind.maximum
        if getattr(opt.kind, "positive", False):
            low = 1e-6
        assert check(opt.name, low) == low, opt.name
        assert check(opt.name, high) == high, opt.name
        with pytest.raises(OptionError):
            check(opt.name, high * 2 + 1)
        with pytest.raises(OptionError):
            check(opt.name, -1)
    assert next(opt for opt in OPTIONS if opt.name == "job_timeout").kind.maximum == MAX_SECONDS


@pytest.mark.parametrize(
    ("task", "variable", "value", "message"),
    [
        ("qless.pool", "PREFETCH", BIG, f"qless_pool.prefetch: must be at most 1,000: '{BIG}'"),
        ("qless.pool", "INTERVAL", "1e-320", "qless_pool.interval: must be at least 0.01 seconds"),
        ("qless.pool", "USER", "", "qless_pool.user: empty (an unset variable?)"),
        ("qless.pool", "REDIS", "", "qless_pool.redis: empty (an unset variable?)"),
        ("qless.work", "PREFETCH", BIG, f"qless_pool.prefetch: must be at most 1,000: '{BIG}'"),
        ("qless.work", "INTERVAL", "1e-320", "qless_pool.interval: must be at least 0.01 seconds"),
        ("qless.work", "REDIS", "", "qless_pool.redis: empty (an unset variable?)"),
    ],
)  # fmt: skip
def test_invoke_checks_the_same_ranges(invoke_project, redis_url, task, variable, value, message):
    result = invoke(
        invoke_project,
        redis_url,
        task,
        *(["--queues", "foo"] if task == "qless.work" else []),
        env={f"INVOKE_QLESS_POOL_{variable}": value},
    )
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_a_server_with_more_databases_takes_a_higher_one(project):
    server = RedisServer(extra=("--databases", "100")).start()
    try:
        url = server.url().replace("db=0", "db=99")
        result = qless_pool(project, "-R", url, "--drain")
        assert result.returncode == 0, result.stderr
    finally:
        server.remove()
    assert os.path.exists(project)


def test_qless_work_refuses_a_queue_name_with_a_control_character(invoke_project, redis_url):
    result = invoke(invoke_project, redis_url, "qless.work", "--queues", "foo,ba\x1br")
    assert result.returncode == 2
    assert "qless.work: queue 'ba\\x1br' holds the control character '\\x1b'" in result.stderr


def test_none_is_not_a_value_of_an_option_that_always_has_one():
    with pytest.raises(OptionError, match=r"^interval: must be given, not None$"):
        Worker(["foo"], interval=None)
    with pytest.raises(OptionError, match=r"^spawn_delay: must be given, not None$"):
        package.run({"foo": 1}, spawn_delay=None, preload_modules=["no_such_module_here"])
