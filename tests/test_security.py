"""Security: a job class allowlist, passwords never shown, privileges dropped after start-up."""

from __future__ import annotations

import json
import os
import pwd
import signal
import subprocess
import sys
import time

import pytest
from processes import alive, as_unprivileged, descendants, wait_for
from workers import history_events, put, runs, wait_state

from qless_pool.client import connect

SCRIPT = os.path.join(os.path.dirname(sys.executable), "qless-pool")

# --- the job class allowlist ----------------------------------------------------------------------


@pytest.mark.parametrize("fork_per_job", [True, False], ids=["fork", "in-process"])
def test_a_job_class_outside_the_allowlist_is_failed_before_it_is_imported(
    start_worker, client, redis_conn, tmp_path, fork_per_job
):
    # A module whose import alone leaves a trace: it must never be imported.
    (tmp_path / "evil.py").write_text(
        "import os\nopen(os.environ['EVIL_TRACE'], 'w').write('imported')\n"
        "class Job:\n    @staticmethod\n    def process(job):\n        pass\n"
    )
    trace = tmp_path / "trace"
    os.environ["EVIL_TRACE"] = str(trace)
    sys.path.insert(0, str(tmp_path))
    try:
        worker = start_worker(["foo"], allow_modules=["testjobs"], fork_per_job=fork_per_job)
        forbidden = [
            client.queues["foo"].put(klass, {})
            for klass in ("evil.Job", "testjobsevil.Job", "os.system")
        ]
        allowed = put(client, "foo", "Noop")
        wait_state(client, allowed, "complete")
        for jid in forbidden:
            wait_state(client, jid, "failed")
            failure = client.jobs[jid].failure
            assert failure["group"] == "foo-ForbiddenClass"
            assert (
                "is not in a module this worker may import (--allow-module testjobs)"
                in (failure["message"])
            )
            assert history_events(client, jid).count("popped") == 1
        assert not trace.exists()
        assert len(runs(redis_conn)) == 1
        assert "ForbiddenClass" in worker.log_text()
    finally:
        sys.path.remove(str(tmp_path))
        del os.environ["EVIL_TRACE"]


def test_the_allowlist_from_the_environment_and_the_warning_without_one(
    start_pool, client, redis_conn
):
    pool = start_pool(
        config="foo: 1\n", env={"QLESS_POOL_ALLOW_MODULES": "myapp, testjobs"}, expect={"foo": 1}
    )
    jid = client.queues["foo"].put("tests_elsewhere.Job", {})
    ok = put(client, "foo", "Noop")
    wait_state(client, ok, "complete")
    wait_state(client, jid, "failed")
    assert client.jobs[jid].failure["group"] == "foo-ForbiddenClass"
    assert "no job class allowlist" not in pool.log_text()
    pool.send(signal.SIGQUIT)
    pool.process.wait(timeout=15)

    open_pool = start_pool(config="foo: 1\n", expect={"foo": 1})
    open_pool.wait_log("no job class allowlist (--allow-module)")
    assert open_pool.log_text().count("no job class allowlist") == 1  # the manager, once


def test_a_bad_allow_module_is_refused(tmp_path):
    (tmp_path / "qless-pool.yml").write_text("foo: 1\n")
    result = subprocess.run(
        [SCRIPT, "--allow-module", "my-app", "--dry-run"],
        cwd=tmp_path, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr == (
        "qless-pool: --allow-module: not a module name: 'my-app' (e.g. myapp or myapp.jobs)\n"
    )


# --- passwords ------------------------------------------------------------------------------------


def test_a_password_in_the_redis_url_is_never_shown(start_pool, redis_with_password, tmp_path):
    url = redis_with_password.url()
    assert "secretpw" in url
    seen: dict[int, list[str]] = {}

    def sample(pids):
        for pid in pids:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as file:
                    seen.setdefault(pid, []).append(file.read().decode(errors="replace"))
            except OSError:
                pass

    pool = start_pool("--drain", "-m", "poolapp", url=url, config="foo: 2\n")
    client = connect(url, "test-producer")
    for _ in range(20):
        put(client, "foo", "Noop")
    manager_started = None
    # Every process of the pool, from its first moment to the end of the run.
    while pool.process.poll() is None:
        pids = descendants(pool.pid)
        if pids and manager_started is None:
            manager_started = time.monotonic()
        sample(pids)
        if manager_started is not None:
            sample([pool.pid])
    assert pool.process.returncode == 0, pool.log_text()
    shown = [text for texts in seen.values() for text in texts]
    assert len(seen) >= 4  # the manager, two workers, the drain watcher, job children
    assert not [text for text in shown if "secretpw" in text]
    log = pool.log_text()
    assert "secretpw" not in log
    assert "qless-pool: drained foo: 20 completed" in log

    # --dry-run and an error message show the URL masked, if at all.
    (tmp_path / "qless-pool.yml").write_text("foo: 1\n")
    for args in (["--dry-run"], ["--dry-run", "-c", "missing.yml"], ["-R", url + "x", "-i", "0"]):
        result = subprocess.run(
            [SCRIPT, "-R", url, *args], cwd=tmp_path, capture_output=True, text=True, timeout=30
        )
        assert "secretpw" not in result.stdout + result.stderr
    bad = subprocess.run(
        [SCRIPT, "-R", "redis://:secretpw@host:nope/0", "--dry-run"],
        cwd=tmp_path, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert bad.returncode == 2
    assert "redis://:***@host:nope/0" in bad.stderr and "secretpw" not in bad.stderr


# --- privileges -----------------------------------------------------------------------------------


def ids(pid: int) -> tuple[int, int]:
    """(real uid, real gid) of a process."""
    with open(f"/proc/{pid}/status") as file:
        fields = dict(line.split(":", 1) for line in file if ":" in line)
    return int(fields["Uid"].split()[0]), int(fields["Gid"].split()[0])


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
def test_user_and_group_drop_privileges_once_the_files_are_open(project, redis_url):
    nobody = pwd.getpwnam("nobody")
    # nobody may write in the working directory (a job's files); not in tmp/ and log/ (root's).
    os.chmod(project, 0o777)
    for directory in ("tmp/pids", "log"):
        (project / directory).mkdir(parents=True)
    # Whether this Python's standard library is readable once we are nobody (not when Python
    # lives under /root): only then can the workers import what they need and run a job.
    can_run_jobs = as_unprivileged(lambda: os.access(os.__file__, os.R_OK))
    result = subprocess.run(
        [SCRIPT, "-d", "-R", redis_url, "-i", "0.2", "-I", os.path.dirname(__file__),
         "--user", "nobody", "--group", str(nobody.pw_gid)],
        cwd=project, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    pid = int((project / "tmp/pids/qless-pool.pid").read_text())
    assert ids(pid) == (nobody.pw_uid, nobody.pw_gid)
    with open(f"/proc/{pid}/status") as file:
        groups = next(line for line in file if line.startswith("Groups:")).split()[1:]
    assert {int(g) for g in groups} == set(os.getgrouplist("nobody", nobody.pw_gid))  # not root's
    # The pidfile was made as root; the log files were handed to nobody, for HUP to reopen them.
    assert os.stat(project / "tmp/pids/qless-pool.pid").st_uid == 0
    log = project / "log/qless-pool.stderr.log"
    assert os.stat(log).st_uid == nobody.pw_uid
    assert "dropped privileges: running as uid 65534 (nobody)" in log.read_text()
    assert "running as root" not in log.read_text()
    # root's status does not take a Redis URL from the state of nobody's pool.
    status = subprocess.run(
        [SCRIPT, "status", "--json"], cwd=project, capture_output=True, text=True, timeout=30
    )
    assert status.returncode == 0, status.stderr
    assert (
        "the pool runs as uid 65534, not as this user" in json.loads(status.stdout)["redis_error"]
    )
    if can_run_jobs:
        client = connect(redis_url, "test-producer")
        jid = put(client, "foo", "Noop")
        wait_state(client, jid, "complete")
        [worker] = [p for p in descendants(pid) if alive(p)][:1]
        assert ids(worker) == (nobody.pw_uid, nobody.pw_gid)
    # logrotate: rename, create the new file for the pool's user, HUP.
    log.rename(project / "log/old.log")
    log.write_text("")
    os.chown(log, nobody.pw_uid, nobody.pw_gid)
    os.kill(pid, signal.SIGHUP)
    wait_for(lambda: "reopened" in log.read_text(), message="the log to be reopened")
    os.kill(pid, signal.SIGTERM)
    # Gone, and the pidfile it could not delete (tmp/pids is root's) left empty, hence stale.
    wait_for(lambda: not alive(pid), message="the pool to stop")
    assert (project / "tmp/pids/qless-pool.pid").read_text() == ""


@pytest.mark.skipif(os.geteuid() != 0, reason="the warning is about running as root")
def test_running_as_root_without_user_warns(project, redis_url):
    result = subprocess.run(
        [SCRIPT, "-d", "-R", redis_url], cwd=project, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    pid = int((project / "tmp/pids/qless-pool.pid").read_text())
    log = (project / "log/qless-pool.stderr.log").read_text()
    assert "WARNING: running as root: give --user (and --group)" in log
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not alive(pid))


def test_a_user_that_cannot_be_switched_to_is_refused(project):
    def attempt() -> str:
        result = subprocess.run(
            [SCRIPT, "--user", "root", "--dry-run"],
            cwd=project, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        return f"{result.returncode} {result.stderr}"

    unknown = subprocess.run(
        [SCRIPT, "--user", "no-such-user-here", "--dry-run"],
        cwd=project, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert unknown.returncode == 2
    assert unknown.stderr == "qless-pool: --user no-such-user-here: no such user\n"
    if os.geteuid() != 0:  # as nobody (below) the command itself may not be runnable here
        assert attempt().startswith("2 qless-pool: --user/--group: only root can switch")


def free_uid() -> int:
    """A uid with no passwd entry."""
    return next(uid for uid in range(42000, 43000) if not _has_entry(uid))


def _has_entry(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--group", "0"], "qless-pool: --group 0 needs --user (the user to run as)\n"),
        (["--group", "nogroup-here"], "qless-pool: --group nogroup-here needs --user (the user to run as)\n"),
        (["--user", "UID"], "qless-pool: --user UID: no such user in the password database, so no group to run as; give --group too\n"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("daemon", [False, True], ids=["foreground", "daemon"])
def test_a_switch_that_would_keep_roots_uid_or_gid_is_refused(project, args, message, daemon):
    uid = str(free_uid())
    args = [uid if arg == "UID" else arg for arg in args]
    result = subprocess.run(
        [SCRIPT, *(["-d"] if daemon else []), "-R", "redis://127.0.0.1:1/0", *args],
        cwd=project, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert (result.returncode, result.stderr) == (2, message.replace("UID", uid))
    assert not (project / "tmp").exists() and not (project / "log").exists()  # nothing started


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
def test_a_uid_without_a_passwd_entry_runs_with_the_group_given(project):
    uid = free_uid()
    result = subprocess.run(
        [SCRIPT, "--user", str(uid), "--group", str(uid), "--dry-run"],
        cwd=project, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert (result.returncode, result.stdout) == (0, '{"foo": 1}\n'), result.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="handing files over needs root")
def test_log_files_are_handed_to_the_user_only_if_they_are_its_own_or_new(project, redis_url):
    nobody = pwd.getpwnam("nobody")
    other = 1  # a third user's (daemon's) file: never given to nobody
    os.chmod(project, 0o777)
    (project / "log").mkdir()
    os.chown(project / "log", nobody.pw_uid, nobody.pw_gid)  # the user's own log directory
    secret = project / "shadow"
    secret.write_text("root:secret\n")
    os.chmod(secret, 0o600)
    stderr_log = project / "log/qless-pool.stderr.log"
    stdout_log = project / "log/qless-pool.stdout.log"
    start = [SCRIPT, "-d", "-R", redis_url, "-i", "0.2", "--user", "nobody", "--group", str(nobody.pw_gid)]  # fmt: skip

    # What the user can do in its log directory: a symlink in place of a log file.
    stderr_log.symlink_to(secret)
    os.lchown(stderr_log, nobody.pw_uid, nobody.pw_gid)
    refused = subprocess.run(start, cwd=project, capture_output=True, text=True, timeout=30)
    assert (refused.returncode, refused.stderr) == (
        73, "qless-pool: log file log/qless-pool.stderr.log is a symlink; refusing to follow it\n"
    )  # fmt: skip
    assert (os.stat(secret).st_uid, secret.read_text()) == (0, "root:secret\n")

    # A log file of a third user is written to, and left its own; a new one is the user's.
    stderr_log.unlink()
    stdout_log.write_text("")
    os.chown(stdout_log, other, other)
    result = subprocess.run(start, cwd=project, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    pid = int((project / "tmp/pids/qless-pool.pid").read_text())
    try:
        assert (os.stat(stdout_log).st_uid, os.stat(stdout_log).st_gid) == (other, other)
        assert (os.stat(stderr_log).st_uid, os.stat(stderr_log).st_gid) == (
            nobody.pw_uid, nobody.pw_gid,
        )  # fmt: skip
        log = stderr_log.read_text()
        assert (
            "log file log/qless-pool.stdout.log belongs to uid 1: not handing it to uid 65534"
            in log
        )
        assert "dropped privileges" in log
    finally:
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: not alive(pid), message="the pool to stop")


# --- the allowlist, resolved as qless-py resolves it ---------------------------------------------


@pytest.mark.parametrize("fork_per_job", [True, False], ids=["fork", "in-process"])
@pytest.mark.parametrize(
    ("queue", "klass", "message"),
    [
        ("system", "testjobs.os", "job class 'testjobs.os' is the module 'os', outside"),
        ("dumps", "testjobs.json", "job class 'testjobs.json' is the module 'json', outside"),
        ("foo", "testjobs.Borrowed", "testjobs.Borrowed.process is defined in module 'posixpath'"),
    ],
)
def test_an_attribute_path_that_leaves_the_allowed_modules_is_refused(
    start_pool, client, redis_conn, fork_per_job, queue, klass, message
):
    args = ["--allow-module", "testjobs", *([] if fork_per_job else ["--no-fork-per-job"])]
    start_pool(*args, config=f"{queue}: 1\n", expect={queue: 1})
    jid = client.queues[queue].put(klass, {})
    wait_state(client, jid, "failed")
    failure = client.jobs[jid].failure
    assert failure["group"] == f"{queue}-ForbiddenClass"
    assert message in failure["message"]
    assert "--allow-module testjobs" in failure["message"]
