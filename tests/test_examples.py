"""The deployment examples: each checked by the tool that reads it, where the machine has it."""

from __future__ import annotations

import configparser
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from processes import alive, children, wait_for

from qless_pool.cli import build_parser
from qless_pool.ops.poolcommands import reload_parser

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
TESTS = ROOT / "tests"
SCRIPT = os.path.join(os.path.dirname(sys.executable), "qless-pool")


def needs(tool: str) -> str:
    path = shutil.which(tool) or (
        f"/usr/sbin/{tool}" if os.path.exists(f"/usr/sbin/{tool}") else None
    )
    if path is None:
        pytest.skip(f"{tool} is not installed here (.ci/run installs it)")
    return path


def render(example: str, app_root: Path, user: str = "root") -> str:
    """The example with its placeholders (/srv/myapp, user myapp) made real."""
    text = (EXAMPLES / example).read_text()
    if os.getuid() != 0:  # only root may tell monit to switch users
        text = "\n".join(line for line in text.splitlines() if "as uid myapp" not in line)
    return (
        text.replace("/srv/myapp/.venv/bin/qless-pool", SCRIPT)
        .replace("/srv/myapp", str(app_root))
        .replace("User=myapp", f"User={user}")
        .replace("Group=myapp", f"Group={user}")
        .replace("uid myapp and gid myapp", f"uid {user} and gid {user}")
    )


def qless_pool_args(command: str) -> list[str]:
    """The qless-pool options in a command line, checked by the real option parser."""
    words = shlex.split(command)
    args = words[next(i for i, w in enumerate(words) if w.endswith("qless-pool")) + 1 :]
    build_parser().parse_args(args)  # exits (fails the test) on an unknown or bad option
    return args


# --- systemd --------------------------------------------------------------------------------------


def test_systemd_unit_settings_fit_a_graceful_stop():
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read_string((EXAMPLES / "systemd/qless-pool.service").read_text())
    service = unit["Service"]
    assert service["Type"] == "notify"
    assert "qless-py" not in unit["Unit"]["Documentation"]  # qless-pool's own
    # A reload loads new code (qless-pool reload); the new manager names itself MAINPID.
    words = shlex.split(service["ExecReload"])
    assert words[0].endswith("/qless-pool") and words[1] == "reload"
    reload = reload_parser().parse_args([w.replace("$MAINPID", "123") for w in words[2:]])
    assert reload.pid == 123
    assert service["NotifyAccess"] == "all"
    assert service["KillMode"] == "mixed"  # TERM to the manager only
    args = qless_pool_args(service["ExecStart"])
    assert "--term-graceful-wait" in args
    job_timeout = float(args[args.index("--job-timeout") + 1])
    assert int(service["TimeoutStopSec"]) > job_timeout
    # A stuck job is handed back before systemd's SIGKILL.
    assert float(args[args.index("--graceful-timeout") + 1]) < int(service["TimeoutStopSec"])


def test_systemd_analyze_verifies_the_unit(tmp_path):
    analyze = needs("systemd-analyze")
    unit = tmp_path / "qless-pool.service"
    unit.write_text(render("systemd/qless-pool.service", tmp_path))
    result = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout + result.stderr == ""  # not even a setting "ignored"


# --- monit ----------------------------------------------------------------------------------------


def test_monit_checks_the_control_file(tmp_path):
    monit = needs("monit")
    control = tmp_path / "monitrc"
    control.write_text(render("monit/qless-pool.monitrc", tmp_path))
    control.chmod(0o600)
    result = subprocess.run(
        [monit, "-t", "-c", str(control)],
        capture_output=True, text=True, timeout=60, env={**os.environ, "HOME": str(tmp_path)},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Control file syntax OK" in result.stdout
    start = next(line for line in control.read_text().splitlines() if "start program" in line)
    assert "--daemon" in qless_pool_args(start.split('"')[1].split("-c ", 1)[1].strip("'"))
    health = next(line for line in control.read_text().splitlines() if "check program" in line)
    assert health.split('"')[1].endswith("qless-pool status --check'")


# --- LSB init script ------------------------------------------------------------------------------


def test_init_script_is_valid_sh():
    result = subprocess.run(["sh", "-n", str(EXAMPLES / "init.d/qless-pool")], capture_output=True)
    assert result.returncode == 0, result.stderr


def test_init_script_starts_reloads_and_stops_a_real_pool(project, redis_url):
    env = {
        **os.environ,
        "APP_ROOT": str(project),
        "QLESS_POOL": SCRIPT,
        "QLESS_POOL_ARGS": f"-R {redis_url} -I {TESTS} -i 0.2",
        "QLESS_ENV": "test",
        "STOP_TIMEOUT": "20",
    }

    def init(action: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["sh", str(EXAMPLES / "init.d/qless-pool"), action],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    assert init("status").returncode == 3
    assert init("start").returncode == 0
    pidfile = project / "tmp/pids/qless-pool.pid"
    pid = int(pidfile.read_text())
    assert init("status").stdout == f"qless-pool is running (pid {pid})\n"
    assert init("start").stdout == f"qless-pool is already running (pid {pid})\n"
    wait_for(lambda: len(children(pid)) == 1)
    [worker] = children(pid)
    assert init("reload").returncode == 0
    wait_for(lambda: children(pid) not in ([], [worker]), message="a new worker after reload")
    stopped = init("stop")
    assert stopped.returncode == 0 and stopped.stdout == "qless-pool stopped\n"
    assert not alive(pid)
    assert not pidfile.exists()
    assert init("status").returncode == 3


# --- logrotate ------------------------------------------------------------------------------------


def test_logrotate_rotates_and_the_pool_writes_to_the_new_files(project, redis_url):
    logrotate = needs("logrotate")
    started = subprocess.run(
        [SCRIPT, "-d", "-R", redis_url, "-i", "0.2"],
        cwd=project, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    pid = int((project / "tmp/pids/qless-pool.pid").read_text())
    wait_for(lambda: len(children(pid)) == 1)
    config = project / "logrotate.conf"
    config.write_text(render("logrotate/qless-pool", project))
    config.chmod(0o644)
    result = subprocess.run(
        [logrotate, "-f", "-s", str(project / "logrotate.state"), str(config)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    log = project / "log/qless-pool.stderr.log"
    rotated = project / "log/qless-pool.stderr.log.1"
    assert rotated.exists() and "manager started" in rotated.read_text()
    wait_for(lambda: log.exists() and "restarting every worker gracefully" in log.read_text())
    wait_for(lambda: "started on foo" in log.read_text(), message="the new worker's first line")
    os.kill(pid, signal.SIGQUIT)
    wait_for(lambda: not alive(pid))


def test_logrotate_snippet_signals_the_pidfile_the_pool_writes():
    text = (EXAMPLES / "logrotate/qless-pool").read_text()
    assert "kill -HUP" in text and "/srv/myapp/tmp/pids/qless-pool.pid" in text
    assert "/srv/myapp/log/qless-pool.stderr.log" in text


# --- Kubernetes -----------------------------------------------------------------------------------


def test_kubernetes_grace_period_covers_a_graceful_term():
    deployment = yaml.safe_load((EXAMPLES / "kubernetes/deployment.yaml").read_text())
    assert (deployment["apiVersion"], deployment["kind"]) == ("apps/v1", "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["command"] == ["qless-pool"]
    args = container["args"]
    build_parser().parse_args(args)
    assert "--term-graceful-wait" in args
    assert "--daemon" not in args and "-d" not in args  # the container's main process
    job_timeout = float(args[args.index("--job-timeout") + 1])
    assert pod["terminationGracePeriodSeconds"] > job_timeout
    graceful = float(args[args.index("--graceful-timeout") + 1])
    assert graceful < pod["terminationGracePeriodSeconds"]
    for probe in ("livenessProbe", "readinessProbe"):
        command = container[probe]["exec"]["command"]
        assert command[:2] == ["qless-pool", "status"] and "--check" in command
        from qless_pool.ops.status import build_parser as status_parser

        status_parser().parse_args(command[2:])
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"] == labels
