"""The files a pool keeps for qless-pool status (state.py), where the machine is hostile: a full
tmpfs, a directory removed under the pool."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import sys
import time

import pytest
from pools import free_port, scrape
from workers import put, wait_state

from qless_pool.ops.state import WorkerSlot, read_worker

SCRIPT = os.path.join(os.path.dirname(sys.executable), "qless-pool")


@pytest.fixture
def full_tmpfs(tmp_path):
    """A small tmpfs (as Docker's 64 MB /dev/shm, smaller), filled up."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mountpoint = tmp_path / "shm"
    mountpoint.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k,mode=1777", "tmpfs", str(mountpoint)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        # Unbuffered: nothing left to flush (and fail) at close. ENOSPC ends it: full.
        with open(mountpoint / "ballast", "wb", buffering=0) as file, contextlib.suppress(OSError):
            while True:
                file.write(b"x" * 4096)
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], timeout=30, check=True)


def test_a_record_on_a_full_tmpfs_fails_when_it_is_made_not_with_sigbus_later(full_tmpfs):
    path = full_tmpfs / "worker-1"
    pid = os.fork()
    if pid == 0:  # what a worker does; SIGBUS would kill this child
        status = 3
        try:
            try:
                slot = WorkerSlot(str(path))
            except OSError as error:
                status = 0 if error.errno == errno.ENOSPC else 1
            else:
                slot.update("starting")
                status = 2  # made, and written: the tmpfs was not full after all
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    assert not os.WIFSIGNALED(status), signal.Signals(os.WTERMSIG(status)).name
    assert os.WEXITSTATUS(status) == 0
    assert not path.exists()  # nothing left half made


def test_a_worker_without_a_record_is_starting_then_unknown():
    from qless_pool.ops.state import STARTING, worker_state

    now = time.time()
    assert worker_state(None, now - 1, now) == "starting"  # its hooks run before it writes one
    assert worker_state(None, now - STARTING - 1, now) == "unknown"  # lost
    assert worker_state({"state": "waiting"}, now - 60, now) == "waiting"


def test_read_worker_of_a_missing_or_replaced_directory_is_none(tmp_path):
    (tmp_path / "afile").write_text("")
    assert read_worker(str(tmp_path / "gone" / "worker-1")) is None
    assert read_worker(str(tmp_path / "afile" / "worker-1")) is None


@pytest.mark.parametrize("full", ["state", "metrics"])
def test_a_pool_on_a_full_tmpfs_runs_jobs(full_tmpfs, start_pool, client, tmp_path, full):
    # The pool's state on it, or only the metrics' files (a $PROMETHEUS_MULTIPROC_DIR given).
    env = {"QLESS_POOL_RUNTIME_DIR": str(full_tmpfs if full == "state" else tmp_path)}
    if full == "metrics":
        env["PROMETHEUS_MULTIPROC_DIR"] = str(full_tmpfs)
    port = free_port()
    pool = start_pool("--metrics-port", str(port), config="foo: 2\n", env=env, expect={"foo": 2})
    jids = [put(client, "foo", "Noop") for _ in range(4)]
    for jid in jids:
        wait_state(client, jid, "complete")
    log = pool.log_text()
    assert "WARNING: cannot count jobs for the metrics: [Errno 28] No space left" in log
    assert " died: " not in log  # no worker killed by SIGBUS
    assert 'qless_pool_workers{state="waiting"}' in scrape(port)  # still served
    result = subprocess.run(
        [SCRIPT, "status", "--pid", str(pool.pid)],
        capture_output=True, text=True, timeout=30, env={**os.environ, **env},
    )  # fmt: skip
    if full == "metrics":
        assert result.returncode == 0, result.stderr
        return
    assert "cannot write the pool's state (for qless-pool status): " in log
    assert log.count("WARNING: no record for qless-pool status: [Errno 28] No space left") == 2
    assert result.returncode == 1
    assert f"pool {pool.pid} is running, but its state is not in " in result.stderr


@pytest.mark.timeout(20)  # a FIFO read the old way would block: fail, not hang
def test_records_are_read_only_from_regular_files_not_through_links(tmp_path):
    # qless-pool status may run as root; the directory is the pool's user's.
    from qless_pool.ops.state import PoolState, read_manager

    state = PoolState(4242, root=str(tmp_path))
    state.write_manager({"pid": 4242, "workers": []})
    real = WorkerSlot(state.worker_path(1))
    real.update("waiting")
    assert read_worker(state.worker_path(1))["state"] == "waiting"
    assert read_manager(state.directory) == {"pid": 4242, "workers": []}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "manager.json").write_text('{"secret": true}')
    os.symlink(state.worker_path(1), state.worker_path(2))  # a valid record, through a link
    os.mkfifo(state.worker_path(3))
    assert read_worker(state.worker_path(2)) is None
    assert read_worker(state.worker_path(3)) is None
    os.unlink(os.path.join(state.directory, "manager.json"))
    os.symlink(elsewhere / "manager.json", os.path.join(state.directory, "manager.json"))
    assert read_manager(state.directory) is None
    os.unlink(os.path.join(state.directory, "manager.json"))
    os.mkfifo(os.path.join(state.directory, "manager.json"))
    assert read_manager(state.directory) is None
    real.close()
    state.remove()


def test_folding_metrics_on_a_full_tmpfs_waits_rather_than_dying(full_tmpfs):
    from prometheus_client.mmap_dict import MmapedDict

    from qless_pool.ops.metrics import fold_dead_processes

    # Room for one page: an exited worker's file with a count in it; then full again.
    ballast = full_tmpfs / "ballast"
    os.truncate(ballast, ballast.stat().st_size - 8192)
    dead = full_tmpfs / "counter_999999999.db"
    counts = MmapedDict(str(dead))
    counts.write_value('["c", "c_total", {}, "help"]', 3.0, 0.0)
    counts.close()
    with open(ballast, "ab", buffering=0) as file, contextlib.suppress(OSError):
        while True:
            file.write(b"x" * 4096)
    pid = os.fork()
    if pid == 0:  # SIGBUS would kill this child
        status = 3
        try:
            problem = fold_dead_processes(str(full_tmpfs), alive=[])
            status = 0 if problem and "No space left on device" in problem else 1
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    assert not os.WIFSIGNALED(status), signal.Signals(os.WTERMSIG(status)).name
    assert os.WEXITSTATUS(status) == 0
    assert dead.exists()  # still there, to be folded once there is room
    assert not (full_tmpfs / "counter_archive.db").exists()
