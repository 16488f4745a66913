"""Every bad input gets a one-line answer and an exit status, never a traceback: options, Redis
URLs, files the pool must create, config files. Run as users run it: the installed command."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time

import pytest
from commands import SCRIPT, one_line, qless_pool

# --- options --------------------------------------------------------------------------------------


@pytest.mark.parametrize("option", ["--interval", "--spawn-delay", "--job-timeout"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN", "infinity"])
def test_seconds_must_be_finite(project, option, value):
    result = qless_pool(project, f"{option}={value}", "--dry-run")
    assert result.returncode == 2
    assert f"not a finite number of seconds: '{value}'" in result.stderr
    assert "Traceback" not in result.stderr


# --- Redis URLs -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("notaurl", "'notaurl' is not a URL"),
        ("http://x", "unsupported scheme 'http'"),
        ("redis://:6379/0", "names no host"),
        ("redis:///0", "names no host"),
        ("redis://localhost/abc", "the database 'abc' is not a number"),
        ("redis://localhost:6379?db=x", "the database 'x' is not a number"),
        ("redis://localhost:port/0", "the port is not a number"),
        ("unix://", "names no socket path"),
    ],
)
@pytest.mark.parametrize("daemon", [False, True], ids=["foreground", "daemon"])
def test_a_redis_url_that_cannot_work_is_refused_before_anything_starts(
    project, url, problem, daemon
):
    result = qless_pool(project, *(["-d"] if daemon else []), "-R", url)
    assert result.returncode == 2
    line = one_line(result)
    assert line.startswith("qless-pool: bad Redis URL (from --redis): ")
    assert problem in line
    assert "started as a daemon" not in result.stderr
    assert not (project / "tmp").exists()  # no pidfile: nothing was started


def test_a_bad_url_from_the_environment_names_the_variable_and_hides_the_password(project):
    result = qless_pool(project, "--dry-run", env={"QLESS_URL": "redis://:secretpw@host:x/0"})
    assert result.returncode == 2
    line = one_line(result)
    assert line.startswith("qless-pool: bad Redis URL (from $QLESS_URL): ")
    assert "redis://:***@host:x/0" in line
    assert "secretpw" not in line


# --- files the pool creates -----------------------------------------------------------------------


REDIS_DOWN = "redis://127.0.0.1:1/0"  # a valid URL whose Redis is down: not an error


@pytest.mark.parametrize("daemon", [False, True], ids=["foreground", "daemon"])
@pytest.mark.parametrize(
    ("option", "what"),
    [("-p", "pidfile"), ("-e", "log file"), ("-o", "log file"), ("-l", "lock file")],
)
def test_a_file_in_a_directory_that_cannot_be_made_exits_73(project, option, what, daemon):
    (project / "afile").write_text("")
    result = qless_pool(
        project, *(["-d"] if daemon else []), "-R", REDIS_DOWN, option, "afile/x/pool.out"
    )
    assert result.returncode == 73
    assert one_line(result) == (
        f"qless-pool: cannot create {what} afile/x/pool.out: afile is not a directory"
    )


@pytest.mark.parametrize("daemon", [False, True], ids=["foreground", "daemon"])
def test_a_pidfile_where_the_user_may_not_write_exits_73(project, daemon):
    # /sys refuses new files even to root.
    result = qless_pool(project, *(["-d"] if daemon else []), "-R", REDIS_DOWN, "-p", "/sys/x.pid")
    assert result.returncode == 73
    assert one_line(result) == "qless-pool: cannot create pidfile /sys/x.pid: Permission denied"


@pytest.mark.parametrize(
    ("option", "what"),
    [("-p", "pidfile"), ("-l", "lock file"), ("-e", "log file"), ("-o", "log file")],
)
def test_a_hard_linked_pidfile_lock_or_log_is_never_written_through(project, option, what):
    target = project / "precious"
    target.write_text("do not touch\n")
    os.link(target, project / "linked")
    result = qless_pool(project, "-R", REDIS_DOWN, option, "linked")
    assert result.returncode == 73
    assert one_line(result) == (
        f"qless-pool: {what} linked has 1 other hard link(s); refusing to write through it"
    )
    assert target.read_text() == "do not touch\n"


@pytest.mark.parametrize("daemon", [False, True], ids=["foreground", "daemon"])
@pytest.mark.parametrize("kind", ["symlink", "dangling symlink", "fifo"])
def test_a_log_file_that_is_a_symlink_or_not_a_file_is_refused(project, kind, daemon):
    # Where the pool's user may write in the log directory, a link put in place of a log file
    # must not make root append to (and hand over) whatever it points to.
    target = project / "precious"
    if kind != "dangling symlink":
        target.write_text("do not touch\n")
    (project / "log").mkdir()
    log = project / "log/qless-pool.stderr.log"
    if kind == "fifo":
        os.mkfifo(log)
    else:
        log.symlink_to(target)
    result = qless_pool(project, *(["-d"] if daemon else ["-e", str(log)]), "-R", REDIS_DOWN)
    assert result.returncode == 73
    problem = "is not a regular file" if kind == "fifo" else "is a symlink; refusing to follow it"
    shown = "log/qless-pool.stderr.log" if daemon else str(log)
    assert one_line(result) == f"qless-pool: log file {shown} {problem}"
    if kind == "dangling symlink":
        assert not target.exists()
    elif kind == "symlink":
        assert target.read_text() == "do not touch\n"
    assert not (project / "tmp").exists()  # nothing started


def test_a_log_directory_that_is_a_symlink_is_followed(project):
    (project / "logs-elsewhere").mkdir()
    (project / "log").symlink_to("logs-elsewhere")
    result = qless_pool(project, "-d", "-R", REDIS_DOWN)
    assert result.returncode == 0, result.stderr
    assert "manager started" in (project / "logs-elsewhere/qless-pool.stderr.log").read_text()
    os.kill(int((project / "tmp/pids/qless-pool.pid").read_text()), 15)


def test_files_are_not_created_group_or_world_writable_whatever_the_umask(project):
    script = (
        f"import os, subprocess, sys; os.umask(0); "
        f"sys.exit(subprocess.run([{SCRIPT!r}, '-d', '-R', {REDIS_DOWN!r}, '-l', 'run/pool.lock'])"
        ".returncode)"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=project, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    for path in ("log", "log/qless-pool.stderr.log", "log/qless-pool.stdout.log", "tmp/pids",
                 "tmp/pids/qless-pool.pid", "run/pool.lock"):  # fmt: skip
        mode = stat.S_IMODE(os.stat(project / path).st_mode)
        assert not mode & 0o022, f"{path} is {oct(mode)}"
    pid = int((project / "tmp/pids/qless-pool.pid").read_text())
    os.kill(pid, 15)
    deadline = time.monotonic() + 10
    while (project / "tmp/pids/qless-pool.pid").exists() and time.monotonic() < deadline:
        time.sleep(0.05)


# --- config files ---------------------------------------------------------------------------------


def test_an_environment_section_the_file_lacks_is_an_error_listing_those_it_has(project):
    (project / "qless-pool.yml").write_text("foo: 1\nproduction:\n  foo: 4\nstaging:\n  foo: 2\n")
    result = qless_pool(project, "-E", "prodution", "--dry-run")
    assert result.returncode == 78
    assert one_line(result) == (
        "qless-pool: config error: qless-pool.yml: no section 'prodution' "
        "(the file has sections 'production', 'staging')"
    )


def test_an_environment_from_rails_env_without_a_section_is_a_warning_in_the_log(project):
    (project / "qless-pool.yml").write_text("foo: 1\nproduction:\n  foo: 4\n")
    result = qless_pool(project, "-R", REDIS_DOWN, "-d", env={"RAILS_ENV": "development"})
    assert result.returncode == 0, result.stderr
    log = (project / "log/qless-pool.stderr.log").read_text()
    assert log.count("no section 'development'") == 1
    assert "using the defaults" in log
    os.kill(int((project / "tmp/pids/qless-pool.pid").read_text()), 15)


def test_a_directory_given_as_the_config_says_so(project):
    (project / "conf").mkdir()
    result = qless_pool(project, "-c", "conf", "--dry-run")
    assert result.returncode == 78
    assert one_line(result) == "qless-pool: config error: conf: is a directory, not a config file"


def test_a_count_too_large_is_refused(project):
    (project / "qless-pool.yml").write_text("foo: 99999999999999999999999\n")
    result = qless_pool(project, "--dry-run")
    assert result.returncode == 78
    assert "the worker count must be at most 1000" in one_line(result)


def test_a_variable_that_is_not_one_value_is_refused(project):
    (project / "qless-pool.yml").write_text("foo: 1\nbar: ${BAR_WORKERS}\n")
    result = qless_pool(project, "--dry-run", env={"BAR_WORKERS": "{x: 1}"})
    assert result.returncode == 78
    assert one_line(result) == (
        "qless-pool: config error: qless-pool.yml: key 'bar': line 2: ${BAR_WORKERS} must be "
        "one plain value, not '{x: 1}' (a variable cannot add keys, lists or sections)"
    )
