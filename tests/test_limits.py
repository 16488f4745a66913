"""--max-memory for job children where /proc will not show their smaps: after --user (a process
that changed its user is not dumpable) and under hidepid. Real processes, real setuid."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import time

import pytest
import testjobs  # noqa: F401  (imported before dropping privileges: the job child needs it)
from processes import as_unprivileged, in_child, kill_tree, reap_orphans, wait_for
from redis_server import RedisServer
from workers import put, wait_state

from qless_pool import logs
from qless_pool.client import connect
from qless_pool.logs import logger
from qless_pool.ops.state import private_bytes
from qless_pool.worker import Worker
from qless_pool.worker.limits import Limits

MB = 1024 * 1024
NOBODY = 65534

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")


def hold_memory(megabytes: int) -> tuple[int, int]:
    """Fork a child that holds ``megabytes`` of its own (touched) memory until killed (or 60 s
    pass); returns its pid and a pipe to close when done."""
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(ready_r)
            ballast = bytearray(megabytes * MB)
            for i in range(0, len(ballast), 4096):
                ballast[i] = 1
            os.write(ready_w, b"x")
            time.sleep(60)
        finally:
            os._exit(0)
    os.close(ready_w)
    os.read(ready_r, 1)  # it holds the memory now
    return pid, ready_r


def end(pid: int, pipe: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    os.close(pipe)


@needs_root
def test_a_child_of_a_process_that_changed_its_user_is_measured_from_statm():
    def measure() -> dict:
        # As nobody after setuid: this process and its children are not dumpable.
        pid, pipe = hold_memory(64)
        try:
            try:
                with open(f"/proc/{pid}/smaps_rollup") as file:
                    file.read()
                readable = True
            except PermissionError:
                readable = False
            return {"smaps_readable": readable, "measured": private_bytes(pid)}
        finally:
            end(pid, pipe)

    result = as_unprivileged(measure)
    assert result["smaps_readable"] is False  # what made --max-memory do nothing
    assert result["measured"] is not None and result["measured"] >= 64 * MB


def _mount_proc_with_hidepid() -> None:
    """In a mount namespace of this process's own: /proc with hidepid=2 (a process sees only
    what it may ptrace: not a non-dumpable child)."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    ms_rec, ms_private, clone_newns = 1 << 14, 1 << 18, 0x00020000
    if libc.unshare(clone_newns) != 0:
        raise OSError(ctypes.get_errno(), "unshare")
    if libc.mount(None, b"/", None, ms_rec | ms_private, None) != 0:
        raise OSError(ctypes.get_errno(), "mount --make-rprivate /")
    if libc.mount(b"proc", b"/proc", b"proc", 0, b"hidepid=2") != 0:
        raise OSError(ctypes.get_errno(), "mount proc hidepid=2")


@needs_root
def test_a_child_that_cannot_be_measured_at_all_is_said_once():
    def measure() -> dict:
        try:
            _mount_proc_with_hidepid()
        except OSError as error:
            return {"skip": f"cannot mount /proc with hidepid here: {error}"}
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
        said = []
        handler = logging.Handler()
        handler.emit = lambda record: said.append(record.getMessage())
        logger.addHandler(handler)
        limits = Limits(max_memory=1)
        pid, pipe = hold_memory(8)
        try:
            verdicts = [limits.child_over(pid) for _ in range(3)]
        finally:
            end(pid, pipe)
        limits.child_over(pid)  # gone now: nothing more to say
        return {"verdicts": verdicts, "said": said}

    result = in_child(measure)
    if "skip" in result:
        pytest.skip(result["skip"])
    assert result["verdicts"] == [None, None, None]
    [warning] = result["said"]
    assert "--max-memory: cannot measure the memory of job child" in warning
    assert "job children are not held to the limit" in warning


@pytest.fixture
def open_redis():
    """A Redis of this test's own whose socket any user may connect to."""
    server = RedisServer().start()
    os.chmod(server.directory, 0o711)
    os.chmod(server.socket, 0o777)
    yield server
    server.remove()


@needs_root
def test_max_memory_kills_a_job_child_of_a_worker_that_changed_its_user(open_redis, tmp_path):
    # The pool's workers after --user, without the pool: the pool's own start as nobody cannot
    # import what it needs when Python lives under /root (see test_security.py).
    url = open_redis.url()
    client = connect(url, "test-producer")
    with open("/proc/self/statm") as file:
        resident, shared = (int(n) for n in file.read().split()[1:3])
    # A job child's measure from statm counts its worker's memory too (shared copy-on-write).
    limit = (resident - shared) * os.sysconf("SC_PAGE_SIZE") // MB + 100
    jid = put(client, "foo", "Hog", {"mb": 300, "seconds": 30}, retries=1)
    log = tmp_path / "worker.log"
    log.write_text("")
    os.chown(log, NOBODY, NOBODY)
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            os.setsid()
            stream = open(log, "a", buffering=1)  # noqa: SIM115  (until os._exit)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            logs.configure("INFO", stream=stream)
            status = Worker(["foo"], url, interval=0.2, max_memory=limit).work()
        finally:
            os._exit(status)
    try:
        wait_state(client, jid, "failed", timeout=20)
        failure = client.jobs[jid].failure
        assert failure["group"] == "foo-DirtyExit"
        assert f"went above --max-memory {limit} MB" in failure["message"], failure
        assert uid_of(pid) == NOBODY
    finally:
        os.kill(pid, signal.SIGTERM)
        try:
            wait_for(lambda: os.waitpid(pid, os.WNOHANG)[0] == pid, message="the worker to exit")
        finally:
            kill_tree(pid)
            reap_orphans()
            print(f"--- {log} ---\n{log.read_text()}")


def uid_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as file:
        return int(next(line for line in file if line.startswith("Uid:")).split()[1])
