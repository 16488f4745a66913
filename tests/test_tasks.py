"""The Invoke tasks, as users run them: ``invoke`` in a project of its own, and ``invoke demo``."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
from contextlib import redirect_stdout
from pathlib import Path

import pytest
from commands import INVOKE, invoke
from invoke import Collection, Program, task
from processes import children, kill_processes_in, reap_orphans, title, wait_for
from workers import READY, WAITING, put, python_path, wait_state

import qless_pool.tasks

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"


@pytest.fixture
def project(invoke_project):
    """Every test here runs in the Invoke project (conftest.py)."""
    return invoke_project


def executed(stderr: str) -> list[str]:
    """The tasks Invoke ran, in order (from `invoke -d`)."""
    return re.findall(r"Executing <Call '([^']+)'", stderr)


def chain(project) -> list[list[str]]:
    return [line.split() for line in (project / "chain.log").read_text().splitlines()]


# --- the chain ------------------------------------------------------------------------------------


def test_the_chain_runs_in_order_once_each_and_the_task_process_becomes_the_manager(
    project, redis_url
):
    (project / "invoke.yaml").write_text("qless_pool:\n  preload: [chainapp]\n  interval: 0.2\n")
    result = invoke(project, redis_url, "-d", "qless.pool", "--drain")
    assert result.returncode == 0, result.stderr
    # The settings and the config are checked before the user's tasks load the application.
    assert executed(result.stderr) == [
        "check_pool", "check", "environment", "setup", "close_connections", "pool_setup", "pool",
    ]  # fmt: skip
    records = chain(project)
    assert [what for what, *_ in records[:3]] == ["environment", "preload", "pool-setup"]
    task_pid = {pid for _, pid, *_ in records[:3]}
    assert len(task_pid) == 1  # one process: the invoke process itself
    [manager] = task_pid
    assert f"qless-pool-manager[{project.name}][{manager}] INFO: manager started" in result.stderr
    workers = [record for record in records if record[0] == "after_prefork"]
    assert len(workers) == 2  # once in every worker
    assert {ppid for _, _, ppid in workers} == {manager}
    assert "qless-pool: drained foo: 0 completed, 0 failed" in result.stdout


def test_each_hook_runs_once_even_when_several_tasks_need_it(project, redis_url):
    (project / "invoke.yaml").write_text("qless_pool:\n  preload: [chainapp]\n  interval: 0.2\n")
    result = invoke(
        project, redis_url, "-d", "qless.setup", "qless.pool.setup", "qless.pool", "--drain"
    )
    assert result.returncode == 0, result.stderr
    assert executed(result.stderr) == [
        "check", "environment", "setup", "close_connections", "pool_setup", "check_pool", "pool",
    ]  # fmt: skip
    assert [what for what, *_ in chain(project)].count("preload") == 1


def test_the_hooks_reach_every_task_that_depends_on_qless_setup(project, redis_url, client):
    # qless.work also stands on qless.setup, so the user's environment task runs before it.
    (project / "invoke.yaml").write_text("qless_pool:\n  preload: [chainapp]\n  interval: 0.2\n")
    process = subprocess.Popen(
        [INVOKE, "-d", "qless.work", "--queues", "foo"],
        cwd=project,
        env={
            **os.environ,
            "CHAIN_LOG": str(project / "chain.log"),
            "QLESS_URL": redis_url,
            "PYTHONPATH": python_path(TESTS, project),
        },
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: WAITING.match(title(process.pid)))
        jid = put(client, "foo", "Noop")
        wait_state(client, jid, "complete")
        assert [what for what, *_ in chain(project)] == ["environment", "preload"]
        process.send_signal(signal.SIGQUIT)
        _, stderr = process.communicate(timeout=10)
        assert process.returncode == 0
        assert executed(stderr) == ["check", "environment", "setup", "work"]
    finally:
        process.kill()
        process.wait()


def test_adding_the_module_with_no_hooks_works(tmp_path, redis_url):
    (tmp_path / "tasks.py").write_text(
        "from invoke import Collection\nimport qless_pool.tasks\n\n"
        "ns = Collection()\nns.add_collection(qless_pool.tasks)\n"
    )
    (tmp_path / "qless-pool.yml").write_text("foo: 1\n")
    try:
        listed = invoke(tmp_path, redis_url, "--list")
        assert listed.returncode == 0, listed.stderr
        result = invoke(
            tmp_path, redis_url, "qless.pool", "--drain", env={"INVOKE_QLESS_POOL_INTERVAL": "0.2"}
        )
        assert result.returncode == 0, result.stderr
        assert "qless-pool: drained foo: 0 completed" in result.stdout
    finally:
        kill_processes_in(tmp_path)
        reap_orphans()


def test_list_shows_the_four_tasks_with_one_line_of_help_each():
    ns = Collection()
    ns.add_collection(qless_pool.tasks)
    output = io.StringIO()
    with redirect_stdout(output):
        Program(namespace=ns, binary="invoke").run(["invoke", "--list"], exit=False)
    listing = output.getvalue()
    for name, words in (
        ("qless.setup", "Load the application"),
        ("qless.pool.setup", "Close what must not cross a fork"),
        ("qless.pool.run (qless.pool)", "Run the pool manager"),
        ("qless.work", "Run one worker"),
    ):
        line = next(
            line
            for line in listing.splitlines()
            if line.strip().startswith(name) or f" {name} " in line
        )
        assert words in line, (name, line)


def test_collection_builds_a_fresh_chain_each_time():
    @task
    def mine(c):
        pass

    first, second = qless_pool.tasks.collection(setup=[mine]), qless_pool.tasks.collection()
    assert first["setup"] is not second["setup"]
    assert [t.name for t in first["setup"].pre] == ["check", "mine"]
    assert [t.name for t in second["setup"].pre] == ["check"]
    # qless.pool's own pre-tasks are this collection's setup tasks, not the module's.
    assert first["pool"].pre[1] is first["setup"]


# --- settings -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flag", "invoke_yaml", "invoke_env", "plain_env", "used"),
    [
        ("c.yml", "a.yml", "b.yml", "d.yml", "c.yml"),  # the flag wins
        (None, "a.yml", "b.yml", "d.yml", "b.yml"),  # INVOKE_QLESS_POOL_CONFIG: Invoke config
        (None, "a.yml", None, "d.yml", "a.yml"),  # invoke.yaml
        (None, None, None, "d.yml", "d.yml"),  # $QLESS_POOL_CONFIG, as the command line
        (None, None, None, None, "qless-pool.yml"),  # the default search
    ],
)
def test_settings_precedence(project, redis_url, flag, invoke_yaml, invoke_env, plain_env, used):
    for name in ("a", "b", "c", "d"):
        (project / f"{name}.yml").write_text(f"{name}: 1\n")
    yaml_lines = ["qless_pool:", "  interval: 0.2"] + (
        [f"  config: {invoke_yaml}"] if invoke_yaml else []
    )
    (project / "invoke.yaml").write_text("\n".join(yaml_lines) + "\n")
    env = {}
    if invoke_env:
        env["INVOKE_QLESS_POOL_CONFIG"] = invoke_env
    if plain_env:
        env["QLESS_POOL_CONFIG"] = plain_env
    result = invoke(
        project, redis_url, "qless.pool", "--drain", *(["--config", flag] if flag else []), env=env
    )
    assert result.returncode == 0, result.stderr
    assert f"manager started ({used})" in result.stderr


def test_settings_reach_the_pre_tasks_from_the_environment(project, redis_url):
    # No invoke.yaml: Invoke itself would not load INVOKE_QLESS_POOL_PRELOAD for a pre-task.
    result = invoke(
        project, redis_url, "qless.pool", "--drain",
        env={"INVOKE_QLESS_POOL_PRELOAD": "chainapp", "INVOKE_QLESS_POOL_INTERVAL": "0.2"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "preload" in [what for what, *_ in chain(project)]


def test_environment_and_redis_flags(project, redis_url, client):
    (project / "qless-pool.yml").write_text("foo: 1\nstaging:\n  bar: 1\n")
    put(client, "bar", "Noop")
    result = invoke(
        project, "unix:///nowhere.sock", "qless.pool", "--drain", "--environment", "staging",
        "--redis", redis_url, env={"INVOKE_QLESS_POOL_INTERVAL": "0.2"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "drained foo,bar: 1 completed, 0 failed" in result.stdout


# --- qless.work and drain exit codes --------------------------------------------------------------


def test_qless_work_takes_its_queues_from_QUEUES(project, redis_url, client, redis_conn):
    process = subprocess.Popen(
        [INVOKE, "qless.work"],
        cwd=project,
        env={
            **os.environ,
            "QUEUES": "bar,foo",
            "QLESS_URL": redis_url,
            "CHAIN_LOG": str(project / "chain.log"),
            "PYTHONPATH": python_path(TESTS, project),
            "INVOKE_QLESS_POOL_INTERVAL": "0.2",
        },
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        match = wait_for(lambda: WAITING.match(title(process.pid)))
        assert match.group(1) == "bar,foo"
        # The worker is the task process itself: its only child is the standby job child.
        wait_for(
            lambda: (
                [READY.match(title(pid)) is not None for pid in children(process.pid)] == [True]
            ),
            message="the standby job child, alone",
        )
        jid = put(client, "foo", "Noop")
        wait_state(client, jid, "complete")
        process.send_signal(signal.SIGQUIT)
        assert process.wait(timeout=10) == 0
    finally:
        process.kill()
        process.wait()


def test_qless_work_without_queues_says_how_to_name_them(project, redis_url):
    result = invoke(project, redis_url, "qless.work")
    assert result.returncode == 2
    assert "name the queues with --queues foo,bar or QUEUES=foo,bar" in result.stderr


def test_drain_exit_codes_through_invoke(project, redis_url, client, redis_conn):
    env = {"INVOKE_QLESS_POOL_INTERVAL": "0.2"}
    put(client, "foo", "Chain", {"left": 2})
    good = invoke(project, redis_url, "qless.pool", "--drain", env=env)
    assert good.returncode == 0, good.stderr
    assert "3 completed, 0 failed" in good.stdout  # follow-up jobs were waited for
    put(client, "foo", "Fail")
    bad = invoke(project, redis_url, "qless.pool", "--drain", env=env)
    assert bad.returncode == 1
    assert "0 completed, 1 failed" in bad.stdout


# --- the demo -------------------------------------------------------------------------------------


def _no_demo_left() -> bool:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as file:
                    cmdline = file.read()
            except OSError:
                continue
            if b"qless-pool-demo-" in cmdline or b"qless-pool-manager[demo]" in cmdline:
                return False
    return True


def _demo(env=None, timeout=120):
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("QLESS_", "INVOKE_"))}
    environ.update(env or {})
    return subprocess.run(
        [INVOKE, "demo", "--jobs", "60"], cwd=ROOT, env=environ, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def test_invoke_demo_end_to_end_with_an_embedded_redis():
    result = _demo()
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "qless-pool demo: embedded redis-server" in out
    assert "enqueued 60 jobs on demo_foo, demo_bar, demo_baz" in out
    assert re.search(r"qless-pool-manager\[demo\]: managing \[", out)  # the process tree
    assert "qless-pool: drained demo_foo,demo_bar,demo_baz: 57 completed, 3 failed in " in out
    assert "demo finished: 57 completed, 3 failed on purpose, nothing left running" in out
    reap_orphans()
    wait_for(_no_demo_left, message="nothing of the demo left running")


def test_invoke_demo_uses_QLESS_URL_when_set_and_leaves_it_as_it_was(redis_url, client):
    # Another app's jobs on queues the demo's config would have called foo and bar.
    theirs = [put(client, "foo", "Noop"), put(client, "bar", "Fail")]
    before = sorted(client.redis.keys("*"))
    result = _demo(env={"QLESS_URL": redis_url})
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"using $QLESS_URL ({redis_url})" in result.stdout
    assert "demo finished: 57 completed, 3 failed on purpose" in result.stdout
    # Their jobs were not touched; nothing of the demo's is left (its 60 jobs ran here).
    assert [client.jobs[jid].state for jid in theirs] == ["waiting", "waiting"]
    left = sorted(set(client.redis.keys("*")) - set(before))
    assert [key for key in left if "demo" in key or key.startswith("ql:j:")] == []
    assert client.redis.zcard("ql:completed") == 0
    reap_orphans()
    wait_for(_no_demo_left, message="nothing of the demo left running")


def test_the_allow_modules_setting(project, redis_url, client):
    (project / "invoke.yaml").write_text(
        "qless_pool:\n  interval: 0.2\n  allow_modules: [testjobs]\n"
    )
    allowed = put(client, "foo", "Noop")
    forbidden = client.queues["foo"].put("chainapp.Nothing", {})
    result = invoke(project, redis_url, "qless.pool", "--drain")
    assert result.returncode == 1, result.stderr  # a job failed
    assert client.jobs[allowed].state == "complete"
    assert client.jobs[forbidden].failure["group"] == "foo-ForbiddenClass"
    assert "no job class allowlist" not in result.stderr


# --- the environment over invoke.yaml, for every type -----------------------------------------


def test_the_environment_overrides_invoke_yaml_for_every_type(project, redis_url, client):
    (project / "otherapp.py").write_text(
        "import os\nopen(os.environ['CHAIN_LOG'], 'a').write(f'otherapp {os.getpid()}\\n')\n"
    )
    (project / "invoke.yaml").write_text(
        "qless_pool:\n"
        "  preload: [chainapp]\n"  # a list
        "  interval: 2\n"  # an int in the file, a fraction in the environment
        "  fork_per_job: true\n"  # a boolean
        "  allow_modules: [nothing]\n"  # a list
        "  max_jobs: 100\n"  # an int
        "  appname: fromfile\n"  # a string
    )
    put(client, "foo", "Noop")
    result = invoke(
        project, redis_url, "qless.pool", "--drain",
        env={
            "INVOKE_QLESS_POOL_PRELOAD": "otherapp",
            "INVOKE_QLESS_POOL_INTERVAL": "0.5",
            "INVOKE_QLESS_POOL_FORK_PER_JOB": "false",
            "INVOKE_QLESS_POOL_ALLOW_MODULES": "testjobs,other",
            "INVOKE_QLESS_POOL_MAX_JOBS": "7",
            "INVOKE_QLESS_POOL_APPNAME": "fromenv",
        },
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    loaded = [what for what, *_ in chain(project)]
    assert "otherapp" in loaded and "preload" not in loaded  # not chainapp
    assert "jobs in process, ordered, polling every 0.5s" in result.stderr
    assert "qless-pool-manager[fromenv]" in result.stderr
    assert "drained foo: 1 completed, 0 failed" in result.stdout


@pytest.mark.parametrize(
    ("yaml", "message"),
    [
        ("  interval: soon\n", "qless_pool.interval: not a number of seconds: 'soon'"),
        ("  max_jobs: 2.5\n", "qless_pool.max_jobs: not a whole number: 2.5"),
        ("  daemon: maybe\n", "qless_pool.daemon: must be true or false, not 'maybe'"),
        ("  preload: {a: 1}\n", "qless_pool.preload: must be a list, not {'a': 1}"),
    ],
)
def test_a_setting_of_the_wrong_type_is_one_line(project, redis_url, yaml, message):
    (project / "invoke.yaml").write_text("qless_pool:\n" + yaml)
    result = invoke(project, redis_url, "qless.pool", "--drain")
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_qless_work_takes_the_worker_options(project, redis_url, client):
    put(client, "bar", "Noop")
    process = subprocess.Popen(
        [INVOKE, "qless.work", "--queues", "foo,bar", "--redis", redis_url, "--interval", "0.3",
         "--reserver", "round-robin", "--no-fork-per-job", "--job-timeout", "9"],
        cwd=project, env={**os.environ, "QLESS_URL": "unix:///nowhere.sock",
                          "PYTHONPATH": python_path(TESTS, project),
                          "CHAIN_LOG": str(project / "chain.log")},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_for(lambda: WAITING.match(title(process.pid)), message="the worker")
        process.send_signal(signal.SIGQUIT)
        _, err = process.communicate(timeout=10)
    finally:
        process.kill()
    assert "on foo,bar (jobs in process, round-robin, polling every 0.3s)" in err


def test_qless_pool_daemon_shows_the_manager_title_at_once(project, redis_url):
    (project / "invoke.yaml").write_text("qless_pool:\n  interval: 0.2\n")
    result = invoke(project, redis_url, "qless.pool", "--daemon")
    assert result.returncode == 0, result.stderr
    pid = int((project / "tmp/pids/qless-pool.pid").read_text())
    # The moment the command returns: the manager's title, not the invoke command line.
    assert title(pid).startswith(f"qless-pool-manager[{project.name}]: managing [")
    os.kill(pid, signal.SIGTERM)
