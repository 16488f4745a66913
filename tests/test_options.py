"""Every option, declared once (options.py), reaches every entry that has it: the qless-pool
command, invoke qless.pool (its flags, invoke.yaml, INVOKE_QLESS_POOL_*), qless_pool.run() and
invoke qless.work. Each is proved by what the pool (or worker) started holds, as the pool's
state (``qless-pool status --json``) or the worker's log says, not by the parser alone."""

from __future__ import annotations

import fcntl
import grp
import json
import os
import pwd
import re
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from invoke import Collection
from processes import alive, wait_for
from workers import python_path

import qless_pool.tasks
from qless_pool import options
from qless_pool.cli import build_parser
from qless_pool.options import COMMAND, OPTIONS, POOL, RUN, WORK, OptionError, Switch
from qless_pool.pool.manager import TERM_BEHAVIOURS
from qless_pool.worker.reservation import RESERVERS

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
BIN = os.path.dirname(sys.executable)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def sample(project: Path, redis_url: str) -> dict:
    """A value for every option that is not its default (dry_run, drain: see below)."""
    user = pwd.getpwuid(os.getuid()).pw_name
    return {
        "config": "sample.yml",
        "environment": "production",
        "max_workers": 50,
        "appname": "sampleapp",
        "redis": redis_url,
        "preload": ["arrival_app"],
        "include": [str(project)],
        "spawn_delay": 0.05,
        "scale_interval": 0.5,
        "scale_up_after": 2.5,
        "scale_down_after": 45.0,
        "scale_step": 2,
        "single_process_group": True,
        "term": "graceful",
        "interval": 0.3,
        "reserver": "round-robin",
        "fork_per_job": False,
        "prefetch": 7,
        "job_timeout": 99.0,
        "allow_modules": ["testjobs", "arrival_app"],
        "max_jobs": 1000,
        "max_jobs_jitter": 3,
        "max_memory": 4000,
        "graceful_timeout": 45.0,
        "daemon": True,
        "pidfile": "run/sample.pid",
        "stdout": "logs/out.log",
        "stderr": "logs/err.log",
        "sync": False,
        "user": user,
        "group": grp.getgrgid(pwd.getpwnam(user).pw_gid).gr_name,
        "lock": "run/sample.lock",
        "metrics_port": free_port(),
        "metrics_address": "127.0.0.2",
        "log_level": "DEBUG",
        "queues": ["foo", "bar"],
    }


#: Options the long-running start cannot show, each proved by its own effect below.
ON_THEIR_OWN = {"dry_run", "drain"}


def test_the_sample_covers_every_option(tmp_path):
    given = set(sample(tmp_path, "redis://x/0")) | ON_THEIR_OWN
    assert given == {opt.name for opt in OPTIONS}, "a new option needs a value here"
    for opt in OPTIONS:
        if opt.name in given - ON_THEIR_OWN:
            assert sample(tmp_path, "redis://x/0")[opt.name] != opt.default, opt.name


@pytest.fixture
def project(make_project):
    made = make_project(
        {
            "sample.yml": 'foo: 0\nproduction:\n  "foo,bar": 2\n',
            "arrival_app.py": "import os\n"
            "open(os.path.join(os.path.dirname(__file__), 'loaded'), 'a').write('x')\n",
            "tasks.py": "from invoke import Collection\nimport qless_pool.tasks\n\n"
            "ns = Collection()\nns.add_collection(qless_pool.tasks)\n",
        }
    )
    os.chmod(made, 0o755)
    return made


def environ(project: Path, extra: dict | None = None) -> dict:
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("INVOKE_", "QLESS_", "RACK_ENV", "RAILS_ENV", "QUEUES"))
    }
    return {**base, "PYTHONPATH": python_path(TESTS, project), **(extra or {})}


def flags_for(values: dict, entry: str) -> list[str]:
    """The command line (entry COMMAND) or Invoke task flags (POOL, WORK) for ``values``."""
    argv: list[str] = []
    for opt in options.for_entry(entry):
        if opt.name not in values:
            continue
        value = values[opt.name]
        flag = opt.flags[-1] if entry == COMMAND else opt.task_flag
        if isinstance(opt.kind, Switch):
            if entry == COMMAND:
                argv.append(opt.flags[-1])
            else:
                argv.append(flag if value else "--no-" + opt.task_flag[2:])
        elif opt.const_flags and entry == COMMAND:
            argv.append(opt.flags[opt.kind.values.index(value)])
        elif isinstance(value, list):
            for item in value:
                argv += [flag, str(item)]
        else:
            argv += [flag, str(value)]
    return argv


def wait_for_pool(project: Path, values: dict) -> dict:
    """The started pool's options, from its state (qless-pool status --json)."""
    pidfile = project / values["pidfile"]
    wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), 30, message="the pidfile")
    pid = int(pidfile.read_text())
    result = {}

    def read() -> bool:
        nonlocal result
        status = subprocess.run(
            [f"{BIN}/qless-pool", "status", "--pid", str(pid), "--json", "-R", values["redis"]],
            capture_output=True, text=True, timeout=30, cwd=project,
        )  # fmt: skip
        if status.returncode != 0:
            return False
        result = json.loads(status.stdout)
        return len(result["workers"]) == 2

    wait_for(read, 30, message="the pool's state with its 2 workers")
    return result


def expected_in_state(values: dict, entry: str) -> dict:
    return {
        opt.name: values[opt.name]
        for opt in options.for_entry(entry)
        if opt.name in values and opt.name not in ("dry_run", "queues")
    }


def check_arrived(project: Path, values: dict, entry: str, state: dict) -> None:
    held = state["manager"]["options"]
    for name, value in expected_in_state(values, entry).items():
        assert held.get(name) == value, (entry, name, held.get(name), value)
    assert state["manager"]["appname"] == "sampleapp"
    assert (project / "loaded").exists()  # the preload ran
    assert (project / values["stderr"]).exists() and (project / values["stdout"]).exists()
    assert "DEBUG" in (project / values["stderr"]).read_text()  # the log level arrived
    # What each worker was given, as it says itself (the log level is DEBUG).
    said = re.findall(r"worker options: (\{.*\})", (project / values["stderr"]).read_text())
    assert said, "the workers' options line"
    for line in said:
        held_by_worker = json.loads(line)
        for opt in options.for_entry(entry):
            if opt.goes_to == "worker":
                assert held_by_worker[opt.name] == values[opt.name], (entry, opt.name)
    # The lock is held: an exclusive one cannot be had.
    with open(project / values["lock"]) as lock, pytest.raises(BlockingIOError):
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    address = f"http://127.0.0.2:{values['metrics_port']}/metrics"
    with urllib.request.urlopen(address, timeout=10) as answer:
        assert b"qless_pool_workers" in answer.read()


def stop(project: Path, values: dict) -> None:
    pid = int((project / values["pidfile"]).read_text())
    os.kill(pid, 15)
    wait_for(lambda: not alive(pid), 20, message="the pool to stop")


@pytest.mark.timeout(120)
def test_every_option_arrives_through_the_command(project, redis_url):
    values = sample(project, redis_url)
    given = {k: v for k, v in values.items() if COMMAND in options.option(k).entries}
    result = subprocess.run(
        [f"{BIN}/qless-pool", *flags_for(given, COMMAND)],
        cwd=project, env=environ(project), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    check_arrived(project, values, COMMAND, wait_for_pool(project, values))
    stop(project, values)


def given_to_invoke(project: Path, given: dict, entry: str, how: str) -> tuple[list, dict]:
    """``given`` as a task's flags, as INVOKE_QLESS_POOL_* variables, or in invoke.yaml: the
    task's extra argv and environment."""
    argv, extra = [], {}
    if how == "flags":
        argv = flags_for(given, entry)
    elif how == "variables":
        for name, value in given.items():
            if isinstance(value, list):
                text = ",".join(value)
            else:
                text = str(value).lower() if isinstance(value, bool) else str(value)
            extra[options.option(name).setting] = text
    else:
        (project / "invoke.yaml").write_text(json.dumps({"qless_pool": given}))
    return argv, extra


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["flags", "variables", "invoke.yaml"])
def test_every_option_arrives_through_invoke_qless_pool(project, redis_url, how):
    values = sample(project, redis_url)
    given = {k: v for k, v in values.items() if POOL in options.option(k).entries}
    argv, extra = given_to_invoke(project, given, POOL, how)
    result = subprocess.run(
        [f"{BIN}/invoke", "qless.pool", *argv],
        cwd=project, env=environ(project, extra), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    check_arrived(project, values, POOL, wait_for_pool(project, values))
    stop(project, values)


RUN_SCRIPT = """\
import json, sys
import qless_pool
given = json.loads(sys.argv[1])
config, environment = given.pop("config"), given.pop("environment")
sys.exit(qless_pool.run(config, environment, **given))
"""


@pytest.mark.timeout(120)
def test_every_option_arrives_through_run(project, redis_url):
    values = sample(project, redis_url)
    given = {k: v for k, v in values.items() if RUN in options.option(k).entries}
    (project / "run_pool.py").write_text(RUN_SCRIPT)
    process = subprocess.Popen(
        [sys.executable, "run_pool.py", json.dumps(given)],
        cwd=project, env=environ(project), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    try:
        check_arrived(project, values, RUN, wait_for_pool(project, values))
    finally:
        process.terminate()
        process.wait(timeout=20)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["flags", "variables", "invoke.yaml"])
def test_every_option_arrives_through_invoke_qless_work(project, redis_url, how):
    values = sample(project, redis_url)
    given = {k: v for k, v in values.items() if WORK in options.option(k).entries}
    argv, extra = given_to_invoke(project, given, WORK, how)
    process = subprocess.Popen(
        [f"{BIN}/invoke", "qless.work", *argv],
        cwd=project, env=environ(project, extra), stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    lines: list[str] = []
    try:
        wait_for(lambda: (lines.append(process.stderr.readline()) or True)
                 and "worker options:" in lines[-1], 30, interval=0)  # fmt: skip
        held = json.loads(lines[-1].split("worker options: ", 1)[1])
        for opt in options.for_entry(WORK):
            if opt.goes_to == "worker":
                assert held[opt.name] == values[opt.name], opt.name
        started = next(line for line in lines if " started on " in line)
        assert "qless-pool-worker[sampleapp]" in started and " started on foo,bar " in started
        assert (project / "loaded").exists()
    finally:
        process.terminate()
        process.wait(timeout=20)


def test_dry_run_and_drain_arrive_everywhere_they_are_options(project, redis_url):
    (project / "qless-pool.yml").write_text("foo: 1\n")
    env = environ(project, {"QLESS_URL": redis_url})
    for argv in ([f"{BIN}/qless-pool", "--dry-run"], [f"{BIN}/invoke", "qless.pool", "--dry-run"]):
        result = subprocess.run(argv, cwd=project, env=env, capture_output=True, text=True,
                                timeout=60)  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == '{"foo": 1}'
    for argv in ([f"{BIN}/qless-pool", "--drain", "-i", "0.2"],
                 [f"{BIN}/invoke", "qless.pool", "--drain", "--interval", "0.2"],
                 [sys.executable, "-c", "import qless_pool, sys; "
                  "sys.exit(qless_pool.run(drain=True, interval=0.2))"]):  # fmt: skip
        result = subprocess.run(argv, cwd=project, env=env, capture_output=True, text=True,
                                timeout=60)  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert "drained foo: 0 completed" in result.stdout + result.stderr


def test_the_pre_tasks_read_only_the_flags_of_the_task_run(project, redis_url):
    """Invoke's own --config (its settings file) is not the pool's: qless.check_pool and
    qless.setup read only the words given to qless.pool."""
    (project / "qless-pool.yml").write_text("foo: 1\n")
    (project / "settings.yaml").write_text("greeting: hello\nqless_pool:\n  max_workers: 5\n")
    for invoke_flag in ("--config", "-f"):
        result = subprocess.run(
            [f"{BIN}/invoke", invoke_flag, "settings.yaml", "qless.pool", "--dry-run"],
            cwd=project, env=environ(project, {"QLESS_URL": redis_url}), capture_output=True,
            text=True, timeout=60,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == '{"foo": 1}'


def test_a_switch_flag_given_as_its_default_wins_over_the_setting(project, redis_url):
    process = subprocess.Popen(
        [f"{BIN}/invoke", "qless.work", "--queues", "foo", "--fork-per-job", "--log-level",
         "DEBUG"],
        cwd=project, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env=environ(project, {"QLESS_URL": redis_url, "INVOKE_QLESS_POOL_FORK_PER_JOB": "false"}),
        start_new_session=True,
    )  # fmt: skip
    lines: list[str] = []
    try:
        wait_for(lambda: (lines.append(process.stderr.readline()) or True)
                 and "worker options:" in lines[-1], 30, interval=0)  # fmt: skip
        assert json.loads(lines[-1].split("worker options: ", 1)[1])["fork_per_job"] is True
        assert any("(a child per job, " in line for line in lines)
    finally:
        process.terminate()
        process.wait(timeout=20)


def test_a_bad_task_flag_is_named_as_the_flag(project):
    result = subprocess.run(
        [f"{BIN}/invoke", "qless.work", "--queues", "foo", "--max-jobs", "0"],
        cwd=project, env=environ(project), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip() == "qless.work: --max-jobs: must be 1 or more: '0'"


# --- where an option makes no sense, one line -----------------------------------------------------


def test_run_refuses_an_option_it_does_not_have():
    with pytest.raises(OptionError) as error:
        qless_pool.run({"foo": 1}, daemon=True)
    assert str(error.value) == (
        "qless_pool.run(): daemon: not an option of qless_pool.run() (the qless-pool command "
        "and invoke qless.pool take it)"
    )
    with pytest.raises(OptionError, match=r"^qless_pool.run\(\): no_such: no such option$"):
        qless_pool.run({"foo": 1}, no_such=1)


def test_qless_work_refuses_a_flag_of_the_pool_and_says_which_settings_it_does_not_use(
    project, redis_url
):
    refused = subprocess.run(
        [f"{BIN}/invoke", "qless.work", "--queues", "foo", "--daemon"],
        cwd=project, env=environ(project), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert refused.returncode != 0
    assert "No idea what '--daemon' is!" in refused.stderr
    (project / "invoke.yaml").write_text("qless_pool:\n  daemon: true\n  pidfile: x.pid\n")
    process = subprocess.Popen(
        [f"{BIN}/invoke", "qless.work", "--queues", "foo"],
        cwd=project, env=environ(project, {"QLESS_URL": redis_url}), stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        first = process.stderr.readline()
        assert first.strip() == (
            "qless.work: not using the settings daemon, pidfile (not options of qless.work)"
        )
    finally:
        process.terminate()
        process.wait(timeout=20)


def test_a_setting_that_is_no_option_is_one_line(project, redis_url):
    (project / "invoke.yaml").write_text("qless_pool:\n  max_job: 3\n")
    result = subprocess.run(
        [f"{BIN}/invoke", "qless.pool"], cwd=project, env=environ(project),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == "qless_pool.max_job: no such setting (the options: docs/options.md)"
    )


# --- the declaration, whole -----------------------------------------------------------------------


def test_every_option_has_its_flags_settings_and_keywords():
    parser = build_parser()
    flags = {flag for action in parser._actions for flag in action.option_strings}
    ns = Collection()
    ns.add_collection(qless_pool.tasks)
    pool_args = {arg.name for arg in ns.collections["qless"].collections["pool"]
                 .tasks["run"].get_arguments()}  # fmt: skip
    work_args = {arg.name for arg in ns.collections["qless"].tasks["work"].get_arguments()}
    names = set()
    for opt in OPTIONS:
        assert opt.help and opt.section in options.sections(), opt.name
        assert opt.name not in names
        names.add(opt.name)
        if COMMAND in opt.entries:
            assert set(opt.flags) <= flags, opt.name
        if POOL in opt.entries:
            assert opt.name in pool_args, opt.name
        if WORK in opt.entries:
            assert opt.name in work_args, opt.name
    # And nothing beside the declaration: no flag or task argument written by hand.
    assert pool_args == {opt.name for opt in options.for_entry(POOL)}
    assert work_args == {opt.name for opt in options.for_entry(WORK)}
    declared = {
        flag
        for opt in OPTIONS
        if COMMAND in opt.entries
        for flag in (*opt.flags, *([opt.off_flag] if opt.off_flag else []))
    }
    assert flags - declared == {"-h", "--help", "-v", "--version"}
    # The choices the declaration offers are the ones the code has.
    assert options.choices("reserver") == tuple(RESERVERS)
    assert options.choices("term") == TERM_BEHAVIOURS
