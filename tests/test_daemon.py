"""Production running: real daemons, pidfiles, log files and their rotation, the lock, sd_notify."""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from pools import MANAGER
from processes import (
    alive,
    children,
    stays,
    title,
    wait_for,
)
from workers import PAUSED, WAITING, put, wait_state

TESTS = Path(__file__).resolve().parent
SCRIPT = os.path.join(os.path.dirname(sys.executable), "qless-pool")


@pytest.fixture
def project(make_project, redis_url):
    return make_project({"qless-pool.yml": "foo: 1\nbar: 1\n"})


def qless_pool(project, redis_url, *args, env=None, timeout=30):
    environ = {
        k: v for k, v in os.environ.items() if k not in ("QLESS_ENV", "RACK_ENV", "RAILS_ENV")
    }
    environ.update(env or {})
    command = [SCRIPT, "-R", redis_url, "-I", str(TESTS), "-i", "0.2", *args]
    return subprocess.run(
        command, cwd=project, env=environ, capture_output=True, text=True, timeout=timeout
    )


def read_pid(path: Path) -> int:
    return int(path.read_text())


def worker_titles(pid: int) -> list[str]:
    return sorted(title(child) for child in children(pid))


DEFAULT_PIDFILE = "tmp/pids/qless-pool.pid"


def start_daemon(project, redis_url, *args) -> int:
    result = qless_pool(project, redis_url, "-d", *args)
    assert result.returncode == 0, result.stderr
    pid = read_pid(project / DEFAULT_PIDFILE)
    assert f"started as a daemon, pid {pid}" in result.stderr
    return pid


# --- starting -------------------------------------------------------------------------------------


def test_daemon_start_creates_pidfile_and_logs_and_the_pool_works(project, redis_url, client):
    result = qless_pool(project, redis_url, "-d")
    assert result.returncode == 0, result.stderr
    pid = read_pid(project / DEFAULT_PIDFILE)
    assert result.stderr == f"qless-pool: started as a daemon, pid {pid}\n"
    assert alive(pid)
    assert os.getsid(pid) != os.getsid(0)  # detached: a session of its own
    assert os.readlink(f"/proc/{pid}/cwd") == str(project)  # the working directory is kept
    assert (project / "log/qless-pool.stdout.log").exists()
    wait_for(
        lambda: (
            sorted(WAITING.match(t).group(1) for t in worker_titles(pid) if WAITING.match(t))
            == ["bar", "foo"]
        )
    )
    assert MANAGER.match(title(pid)).group(1) == f"[{project.name}]"
    jid = put(client, "foo", "Noop")
    wait_state(client, jid, "complete")
    assert (
        f"qless-pool-manager[{project.name}][{pid}] INFO: spawned worker"
        in (project / "log/qless-pool.stderr.log").read_text()
    )


def test_a_second_start_refuses_naming_the_pid_and_the_file(project, redis_url):
    pid = start_daemon(project, redis_url)
    second = qless_pool(project, redis_url, "-d")
    assert second.returncode == 1
    assert second.stderr == (
        f"qless-pool: pidfile {DEFAULT_PIDFILE} is held by a running qless-pool (pid {pid}); "
        "stop it first\n"
    )
    foreground = qless_pool(project, redis_url, "-p", DEFAULT_PIDFILE)
    assert foreground.returncode == 1
    assert read_pid(project / DEFAULT_PIDFILE) == pid
    assert alive(pid)


@pytest.mark.parametrize("content", ["dead", "", "not a pid\n"])
def test_a_stale_or_empty_pidfile_is_replaced(project, redis_url, content):
    if content == "dead":
        gone = subprocess.Popen(["true"])
        gone.wait()
        content = f"{gone.pid}\n"
    (project / "tmp/pids").mkdir(parents=True)
    (project / DEFAULT_PIDFILE).write_text(content)
    pid = start_daemon(project, redis_url)
    assert alive(pid)


def test_a_pidfile_naming_a_live_pool_that_holds_no_lock_refuses_the_start(project, redis_url):
    # A pool from before the flock (or whose lock was lost): the pid alone must still count.
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "qless-pool"])
    try:
        (project / "tmp/pids").mkdir(parents=True)
        (project / DEFAULT_PIDFILE).write_text(f"{sleeper.pid}\n")
        result = qless_pool(project, redis_url, "-d")
        assert result.returncode == 1
        assert f"names a running qless-pool (pid {sleeper.pid})" in result.stderr
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_pidfile_that_is_a_symlink_is_refused(project, redis_url):
    (project / "tmp/pids").mkdir(parents=True)
    target = project / "elsewhere"
    (project / DEFAULT_PIDFILE).symlink_to(target)
    result = qless_pool(project, redis_url, "-d")
    assert result.returncode == 73  # EX_CANTCREAT, as for any pidfile that cannot be made
    assert result.stderr == (
        f"qless-pool: pidfile {DEFAULT_PIDFILE} is a symlink; refusing to follow it\n"
    )
    assert not target.exists()


def test_a_start_with_a_bad_config_fails_in_the_foreground(project, redis_url):
    (project / "qless-pool.yml").write_text("foo: many\n")
    result = qless_pool(project, redis_url, "-d")
    assert result.returncode == 78
    assert "qless-pool.yml: key 'foo': the worker count must be a whole number" in result.stderr
    assert not (project / DEFAULT_PIDFILE).exists()
    assert not (project / "log").exists()


def test_a_daemon_whose_preload_fails_reports_it_to_the_command(project, redis_url):
    result = qless_pool(project, redis_url, "-d", "-m", "no_such_app")
    assert result.returncode == 1
    assert "preloading no_such_app failed: ModuleNotFoundError" in result.stderr
    assert not (project / DEFAULT_PIDFILE).exists()  # removed by the daemon that wrote it
    assert "Traceback" in (project / "log/qless-pool.stderr.log").read_text()


def test_pidfile_options_custom_paths_and_no_pidfile(project, redis_url):
    result = qless_pool(
        project, redis_url, "-d", "-p", "run/a.pid", "-o", "out.log", "-e", "err.log"
    )
    assert result.returncode == 0, result.stderr
    pid = read_pid(project / "run/a.pid")
    assert (project / "out.log").exists() and (project / "err.log").exists()
    assert "manager started" in (project / "err.log").read_text()
    os.kill(pid, signal.SIGQUIT)
    wait_for(lambda: not alive(pid))
    # Of -p and --no-pidfile, the last one given wins.
    result = qless_pool(project, redis_url, "-d", "-p", "run/b.pid", "--no-pidfile")
    assert result.returncode == 0, result.stderr
    assert not (project / "run/b.pid").exists()
    assert not (project / DEFAULT_PIDFILE).exists()


# --- running and stopping -------------------------------------------------------------------------


def test_quit_removes_the_pidfile(project, redis_url):
    pid = start_daemon(project, redis_url)
    wait_for(lambda: len(children(pid)) == 2)
    workers = children(pid)
    os.kill(pid, signal.SIGQUIT)
    wait_for(lambda: not alive(pid))
    assert not (project / DEFAULT_PIDFILE).exists()
    assert not any(alive(worker) for worker in workers)


def test_a_worker_exiting_leaves_the_pidfile_alone(project, redis_url):
    pid = start_daemon(project, redis_url)
    wait_for(lambda: len(children(pid)) == 2)
    victim = children(pid)[0]
    os.kill(victim, signal.SIGQUIT)  # a worker's exit must not remove the manager's pidfile
    wait_for(lambda: len(children(pid)) == 2 and victim not in children(pid))
    assert read_pid(project / DEFAULT_PIDFILE) == pid


def test_rename_the_log_then_hup_and_new_lines_go_to_a_new_file(project, redis_url):
    pid = start_daemon(project, redis_url)
    wait_for(lambda: len(children(pid)) == 2)
    log = project / "log/qless-pool.stderr.log"
    rotated = project / "log/qless-pool.stderr.log.1"
    log.rename(rotated)
    os.kill(pid, signal.SIGHUP)
    wait_for(lambda: log.exists() and "restarting every worker gracefully" in log.read_text())
    # The new workers write to the new file too.
    wait_for(lambda: log.read_text().count("started on") == 2)
    assert "reopened log/qless-pool.stdout.log and log/qless-pool.stderr.log" in log.read_text()
    assert "restarting every worker" not in rotated.read_text()
    assert "manager started" in rotated.read_text()


def test_winch_as_a_daemon_stops_the_workers_and_hup_brings_them_back(project, redis_url):
    pid = start_daemon(project, redis_url)
    wait_for(lambda: len(children(pid)) == 2)
    os.kill(pid, signal.SIGWINCH)
    wait_for(lambda: children(pid) == [], message="the workers to stop")
    assert MANAGER.match(title(pid)).group(2) == ""
    assert alive(pid)
    os.kill(pid, signal.SIGHUP)
    wait_for(lambda: len(children(pid)) == 2, message="HUP to start them again")


def test_the_lock_is_held_while_any_process_of_the_pool_lives(project, redis_url, client):
    lock = project / "pool.lock"
    pid = start_daemon(project, redis_url, "-l", str(lock))

    def lock_free() -> bool:
        with open(lock, "a") as file:
            try:
                fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            fcntl.flock(file, fcntl.LOCK_UN)
            return True

    wait_for(lambda: len(children(pid)) == 2)
    assert not lock_free()
    jid = put(client, "foo", "Sleep", {"seconds": 1.5})
    wait_state(client, jid, "running")
    os.kill(pid, signal.SIGINT)  # the manager exits at once; a worker finishes its job
    wait_for(lambda: not alive(pid))
    assert not lock_free()  # the worker (and its job child) still hold it
    wait_state(client, jid, "complete")
    wait_for(lock_free, message="the lock to be released by the last process")
    # What a deploy script runs: it returns at once now.
    assert subprocess.run(["flock", "-w", "5", str(lock), "true"], timeout=10).returncode == 0


# --- systemd --------------------------------------------------------------------------------------


def test_sd_notify_messages_arrive_in_order(project, redis_url, tmp_path):
    address = str(tmp_path / "notify.sock")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(address)
    receiver.settimeout(10)
    pool = subprocess.Popen(
        [SCRIPT, "-R", redis_url, "-i", "0.2"],
        cwd=project,
        env={**os.environ, "NOTIFY_SOCKET": address},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    messages: list[str] = []

    def receive_until(field: str) -> None:
        while True:
            message = receiver.recv(4096).decode()
            messages.append(message)
            if field in message.split("\n"):
                return

    try:
        receive_until("READY=1")
        assert f"MAINPID={pool.pid}" in messages[-1].split("\n")
        wait_for(lambda: len(children(pool.pid)) == 2)
        os.kill(pool.pid, signal.SIGHUP)
        receive_until("RELOADING=1")
        receive_until("READY=1")
        os.kill(pool.pid, signal.SIGQUIT)
        receive_until("STOPPING=1")
        assert pool.wait(timeout=10) == 0
    finally:
        pool.kill()
        pool.wait()
        receiver.close()
    events = [
        field
        for message in messages
        for field in message.split("\n")
        if field in ("READY=1", "RELOADING=1", "STOPPING=1")
    ]
    assert events == ["READY=1", "RELOADING=1", "READY=1", "STOPPING=1"]
    statuses = [f for m in messages for f in m.split("\n") if f.startswith("STATUS=managing")]
    assert "STATUS=managing 2 worker(s)" in statuses
    assert all("MONOTONIC_USEC=" in m for m in messages if "RELOADING=1" in m)


def test_paused_title_survives_in_daemon_mode(project, redis_url):
    pid = start_daemon(project, redis_url)
    wait_for(lambda: len(children(pid)) == 2)
    os.kill(pid, signal.SIGUSR2)
    wait_for(lambda: all(PAUSED.match(t) for t in worker_titles(pid)))


def test_a_winch_after_a_hup_is_not_undone_by_the_hup(project, redis_url):
    """The HUP waits for its burst to end; a WINCH meanwhile overtakes it."""
    pid = start_daemon(project, redis_url, "--log-level", "DEBUG")
    wait_for(lambda: len(children(pid)) == 2)
    log = project / "log/qless-pool.stderr.log"
    os.kill(pid, signal.SIGHUP)
    # Two signals sent at once may be delivered in either order: WINCH only once HUP is in.
    wait_for(lambda: "HUP: reloading in" in log.read_text(), message="the HUP to be taken")
    os.kill(pid, signal.SIGWINCH)
    wait_for(lambda: children(pid) == [], message="the workers to stop")
    wait_for(lambda: "HUP not acted on: WINCH came after it" in log.read_text())
    # Past the HUP's burst (0.2 s quiet), it must not bring the workers back.
    stays(lambda: children(pid) == [], 0.5, message="no workers")
