"""What ``qless-pool status`` reads, it reads safely: a pidfile that is a symlink, a FIFO, someone
else's file or not a pid is refused in one line that shows nothing of it, at once; and the
pool's state holds no password."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest
from processes import as_unprivileged
from workers import put, wait_state

from qless_pool.ops.state import pool_directory

SCRIPT = os.path.join(os.path.dirname(sys.executable), "qless-pool")
SECRET_LINE = "root:$6$saltsalt$" + "h" * 86 + ":19000:0:99999:7:::"


def status(directory, *args, env=None, timeout=10):
    return subprocess.run(
        [SCRIPT, "status", *args], cwd=directory, capture_output=True, text=True,
        timeout=timeout, env={**os.environ, **(env or {})},
    )  # fmt: skip


@pytest.mark.parametrize("args", [[], ["--json"], ["--check"]], ids=["text", "json", "check"])
def test_a_pidfile_that_is_a_symlink_is_not_followed(tmp_path, args):
    secret = tmp_path / "shadow"
    secret.write_text(SECRET_LINE + "\n")
    (tmp_path / "x.pid").symlink_to(secret)
    result = status(tmp_path, "-p", "x.pid", *args)
    assert result.returncode == 3
    assert "hhhh" not in result.stdout + result.stderr
    if "--check" not in args:
        assert (
            result.stderr == "qless-pool status: pidfile x.pid is a symbolic link; not followed\n"
        )


@pytest.mark.parametrize("args", [[], ["--json"], ["--check"]], ids=["text", "json", "check"])
def test_a_fifo_as_pidfile_does_not_hang_status(tmp_path, args):
    os.mkfifo(tmp_path / "x.pid")
    result = status(tmp_path, "-p", "x.pid", *args, timeout=10)
    assert result.returncode == 3
    if "--check" not in args:
        assert result.stderr == "qless-pool status: pidfile x.pid is not a regular file\n"


def test_a_pidfile_that_holds_no_pid_is_not_shown(tmp_path):
    (tmp_path / "x.pid").write_text(SECRET_LINE + "\n")
    result = status(tmp_path, "-p", "x.pid")
    assert result.returncode == 3
    assert result.stderr == "qless-pool status: pidfile x.pid does not hold a pid\n"
    (tmp_path / "y.pid").write_text("1" * 100)
    assert status(tmp_path, "-p", "y.pid").stderr == (
        "qless-pool status: pidfile y.pid does not hold a pid\n"
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="a file of another user needs root to make")
def test_a_pidfile_of_another_user_is_not_trusted(tmp_path):
    path = tmp_path / "x.pid"
    path.write_text(f"{os.getpid()}\n")
    os.chown(path, 65534, 65534)
    result = status(tmp_path, "-p", "x.pid")
    assert result.returncode == 3
    assert result.stderr == (
        "qless-pool status: pidfile x.pid belongs to uid 65534, not to this user or root; "
        "not trusted (give --pid?)\n"
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="a file of root's needs root to make")
def test_a_pidfile_of_root_is_read_by_another_user():
    """A daemon started by root drops to its user after writing the pidfile: that user's status
    trusts root's file."""
    from qless_pool.ops.finding import NoPool, read_pidfile

    directory = tempfile.mkdtemp(prefix="qless-pool-pidfile-")
    try:
        os.chmod(directory, 0o755)
        path = os.path.join(directory, "x.pid")
        with open(path, "w") as file:
            file.write("12345\n")
        os.chmod(path, 0o644)

        def read():
            try:
                return read_pidfile(path)
            except NoPool as error:
                return str(error)

        assert as_unprivileged(read) == 12345
    finally:
        shutil.rmtree(directory)


def test_the_state_holds_no_password_and_status_finds_it_in_the_environment(
    start_pool, redis_with_password
):
    url = redis_with_password.url()
    pool = start_pool(url=url, config="foo: 1\n", expect={"foo": 1})
    from qless_pool.client import connect

    client = connect(url, "test-producer")
    wait_state(client, put(client, "foo", "Noop"), "complete")
    directory = pool_directory(pool.pid, os.getuid())
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            with open(path, "rb") as file:
                assert b"secretpw" not in file.read(), name
    with open(os.path.join(directory, "manager.json")) as file:
        assert json.load(file)["redis_shown"] == url.replace("secretpw", "***")

    environ = {k: v for k, v in os.environ.items() if k not in ("QLESS_URL", "REDIS_URL")}
    without = subprocess.run(
        [SCRIPT, "status", "--pid", str(pool.pid), "--json"],
        capture_output=True, text=True, timeout=30, env=environ,
    )  # fmt: skip
    assert without.returncode == 0, without.stderr
    snapshot = json.loads(without.stdout)
    assert snapshot["queues"] == {}
    assert "has a password, which the pool does not keep" in snapshot["redis_error"]
    assert "give -R URL, or set $QLESS_URL" in snapshot["redis_error"]
    assert "secretpw" not in without.stdout

    found = subprocess.run(
        [SCRIPT, "status", "--pid", str(pool.pid), "--json"],
        capture_output=True, text=True, timeout=30, env={**environ, "QLESS_URL": url},
    )  # fmt: skip
    snapshot = json.loads(found.stdout)
    assert snapshot["redis_error"] is None
    assert "foo" in snapshot["queues"]
    assert "secretpw" not in found.stdout
