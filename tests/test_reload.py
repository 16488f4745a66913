"""qless-pool reload: new code without a stop. The old manager re-executes its command line;
the new one imports the application afresh and takes the slots over one by one; the old one's
workers finish their jobs and it exits (or, in the foreground, stays as the keeper)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time

import pytest
from commands import INVOKE, SCRIPT, one_line
from pools import MANAGER, free_port, scrape
from processes import (
    alive,
    children,
    kill_processes_in,
    reap_orphans,
    successor_of,
    title,
    wait_for,
)
from workers import FORKED, TESTS, WAITING, python_path, wait_state

# The application: its version and import time are read from files beside it when it is
# imported, so a test "deploys" by writing them. Each job records who ran it, and when.
RELOAD_APP = """\
import json, os, time

HERE = os.path.dirname(os.path.abspath(__file__))


def setting(name, default=""):
    try:
        with open(os.path.join(HERE, name)) as file:
            return file.read().strip()
    except FileNotFoundError:
        return default


VERSION = setting("version.txt", "v1")
if VERSION == "broken":
    import relapp_dependency_that_is_not_installed  # noqa
time.sleep(float(setting("import-seconds.txt", "0")))
if VERSION == "hang":
    time.sleep(3600)


class Record:
    @staticmethod
    def process(job):
        started = time.time()
        job.client.redis.rpush("test:reload", json.dumps({
            "jid": job.jid, "version": VERSION, "put": job.data.get("put"), "started": started,
            "pid": os.getpid(), "ppid": os.getppid(),
        }))
        time.sleep(job.data.get("seconds", 0))
"""

APP_ARGS = ("-m", "relapp", "--allow-module", "relapp")


def deploy(directory, version: str, import_seconds: float = 0.0) -> None:
    (directory / "relapp.py").write_text(RELOAD_APP)
    (directory / "version.txt").write_text(version)
    (directory / "import-seconds.txt").write_text(str(import_seconds))


def records(redis_conn) -> list[dict]:
    return [json.loads(item) for item in redis_conn.lrange("test:reload", 0, -1)]


def reload(directory, *args, timeout=90, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([SCRIPT, "reload", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=directory, env=env)  # fmt: skip


def start_reload(directory, *args) -> subprocess.Popen:
    return subprocess.Popen(
        [SCRIPT, "reload", *args], cwd=directory, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip


def pidfile_pid(path) -> int:
    return int(path.read_text())


def managers_under(pid: int) -> list[int]:
    """The manager a reload of ``pid`` started, or (``pid`` a keeper) the one it keeps."""
    if MANAGER.match(title(pid)):
        new = successor_of(pid)
        return [new] if new is not None else []
    return [child for child in children(pid) if MANAGER.match(title(child))]


def start_daemon(start_pool, tmp_path, *args, config="foo: 2\n", workers=2, env=None) -> int:
    """A daemonized pool (the common production case); returns its manager's pid."""
    launcher = start_pool("-d", "-p", "pool.pid", *APP_ARGS, *args, config=config, env=env)
    assert launcher.process.wait(timeout=30) == 0, launcher.log_text()
    manager = pidfile_pid(tmp_path / "pool.pid")
    wait_for(lambda: len([c for c in children(manager) if "qless-0" in title(c)]) == workers,
             message="the daemon's workers")  # fmt: skip
    return manager


class Stream:
    """A steady stream of short jobs, one every ``every`` seconds, each with its put time."""

    def __init__(self, client, every: float = 0.05):
        self.client, self.every = client, every
        self.jids: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            self.jids.append(put_job(self.client))
            self.stop.wait(self.every)

    def __enter__(self) -> Stream:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(timeout=10)


def put_job(client, **data) -> str:
    return client.queues["foo"].put("relapp.Record", {"put": time.time(), **data})


# --- the rolling hand-over ------------------------------------------------------------------------


def test_a_reload_runs_new_code_without_a_gap_in_service(start_pool, tmp_path, client, redis_conn):
    deploy(tmp_path, "v1", import_seconds=2.0)
    old = start_daemon(start_pool, tmp_path)
    old_workers = set(children(old))
    with Stream(client) as stream:
        time.sleep(0.5)  # a stream before the reload
        deploy(tmp_path, "v2", import_seconds=2.0)
        result = reload(tmp_path)
        assert result.returncode == 0, result.stderr
        new = pidfile_pid(tmp_path / "pool.pid")
        assert new != old
        assert (
            result.stdout
            == f"reloaded: pool {old} handed over to manager {new} in "
            + (result.stdout.split(" in ")[1])
        )
        reloaded_at = time.time()
        time.sleep(0.5)  # and after it
    for jid in stream.jids:
        wait_state(client, jid, "complete", timeout=30)
    ran = records(redis_conn)
    assert sorted(r["jid"] for r in ran) == sorted(stream.jids)  # each ran once, none failed
    waits = [r["started"] - r["put"] for r in ran]
    # A stop and start would leave the queue without a worker for the 2 s import.
    assert max(waits) < 1.5, max(waits)
    after = [r for r in ran if r["put"] > reloaded_at]
    assert after and {r["version"] for r in after} == {"v2"}
    assert {r["version"] for r in ran} == {"v1", "v2"}
    wait_for(lambda: not alive(old), timeout=30, message="the old manager to exit")
    assert not old_workers & set(children(new))
    assert len([c for c in children(new) if "qless-0" in title(c)]) == 2


def test_the_old_workers_finish_their_running_jobs_and_capacity_never_drops(
    start_pool, tmp_path, client, redis_conn
):
    deploy(tmp_path, "v1", import_seconds=0.5)
    old = start_daemon(start_pool, tmp_path)
    busy = put_job(client, seconds=3)
    wait_for(lambda: records(redis_conn), message="the long job to start")
    reloading = start_reload(tmp_path, "--wait")
    managers = {old}
    takers, serving = [], []  # sampled during the reload

    def taking_jobs(manager: int) -> int:
        """The manager's workers that take jobs (not those told to QUIT), by its title (of its
        own children: forked, a new manager bears the old one's title until it executes)."""
        match = MANAGER.match(title(manager))
        listed = {int(p) for p in match.group(2).split(", ")} if match and match.group(2) else set()
        return len(listed & set(children(manager)))

    def reserving(manager: int) -> int:
        return sum(
            1 for c in children(manager) if WAITING.match(title(c)) or FORKED.match(title(c))
        )

    while reloading.poll() is None:
        managers.update(managers_under(old))  # the new one, remembered once the old has gone
        new = sorted(managers - {old})
        # The old pool only lets workers go, the new one only adds: looked at in this order,
        # the sums are bounds of what both were at one moment.
        takers.append(sum(map(taking_jobs, new)) + taking_jobs(old))
        serving.append(taking_jobs(old) + sum(map(reserving, new)))
        time.sleep(0.005)
    assert reloading.returncode == 0, reloading.stderr.read()
    assert "the old manager has exited" in reloading.stdout.read()
    wait_state(client, busy, "complete")  # not killed by the hand-over
    [run] = [r for r in records(redis_conn) if r["jid"] == busy]
    assert run["version"] == "v1"
    assert not alive(old)
    assert min(serving) >= 2  # never below the configured count
    assert max(takers) <= 3  # the surge: one per group


# --- new code that cannot serve -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "timeout", "said"),
    [
        ("broken", "60", "reload failed: preloading relapp failed: ModuleNotFoundError"),
        ("hang", "3", "was not ready within 3s"),
    ],
)
def test_new_code_that_fails_leaves_the_running_pool_serving(
    start_pool, tmp_path, client, redis_conn, version, timeout, said
):
    deploy(tmp_path, "v1")
    old = start_daemon(start_pool, tmp_path)
    workers = sorted(c for c in children(old) if "qless-0" in title(c))
    deploy(tmp_path, version)
    result = reload(tmp_path, "--timeout", timeout)
    assert result.returncode == 1
    assert said in one_line(result)
    assert pidfile_pid(tmp_path / "pool.pid") == old
    # The new manager is gone (a hanging one killed), and left nothing behind.
    wait_for(lambda: not managers_under(old), message="the new manager to be gone")
    assert sorted(c for c in children(old) if "qless-0" in title(c)) == workers
    jid = put_job(client)
    wait_state(client, jid, "complete")
    assert records(redis_conn)[-1]["version"] == "v1"
    status = subprocess.run([SCRIPT, "status", "-p", "pool.pid"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=30)  # fmt: skip
    assert status.returncode == 0  # a warning: the pool serves
    assert "failed, the pool runs the code it had: " in status.stdout
    # A good release after a bad one goes through.
    deploy(tmp_path, "v2")
    assert reload(tmp_path).returncode == 0


def test_a_reload_with_no_pool_exits_3(tmp_path):
    result = reload(tmp_path)
    assert result.returncode == 3
    assert "no pool is running here" in one_line(result)


# --- signals during a hand-over -------------------------------------------------------------------


def test_term_during_a_hand_over_stops_both_pools_and_leaves_nothing(start_pool, tmp_path, client):
    deploy(tmp_path, "v1")
    old = start_daemon(start_pool, tmp_path)
    deploy(tmp_path, "v2", import_seconds=2.0)
    reloading = start_reload(tmp_path)
    [new] = wait_for(lambda: managers_under(old), message="the new manager")
    os.kill(old, signal.SIGTERM)
    assert reloading.wait(timeout=30) == 1
    wait_for(lambda: not alive(old) and not alive(new), timeout=20, message="both managers gone")
    wait_for(lambda: not _processes_in(tmp_path), timeout=20, message="no process left")
    assert not (tmp_path / "pool.pid").exists()


def test_a_second_reload_during_a_hand_over_is_refused_and_hup_ignored(start_pool, tmp_path):
    deploy(tmp_path, "v1")
    old = start_daemon(start_pool, tmp_path)
    deploy(tmp_path, "v2", import_seconds=2.0)
    first = start_reload(tmp_path)
    wait_for(lambda: managers_under(old), message="the new manager")
    second = reload(tmp_path, "--pid", str(old))
    assert second.returncode == 1
    assert "reload refused: a reload is in progress (new manager" in one_line(second)
    os.kill(old, signal.SIGHUP)
    assert first.wait(timeout=30) == 0, first.stderr.read()
    log = (tmp_path / "log/qless-pool.stderr.log").read_text()
    assert "HUP ignored: a reload is in progress" in log


def test_a_reload_is_refused_in_drain_mode(start_pool, tmp_path, client):
    deploy(tmp_path, "v1")
    put_job(client, seconds=30)
    pool = start_pool(*APP_ARGS, "--drain", config="foo: 1\n")
    wait_for(lambda: pool.workers(), message="the worker")
    result = reload(tmp_path, "--pid", str(pool.pid))
    assert result.returncode == 1
    assert "a --drain pool stops once its queues are empty" in one_line(result)


# --- the pool's files and its supervisor ----------------------------------------------------------


def test_the_pidfile_and_the_lock_pass_without_a_window(start_pool, tmp_path, client):
    deploy(tmp_path, "v1")
    lock = tmp_path / "pool.lock"
    old = start_daemon(start_pool, tmp_path, "-l", str(lock))
    deploy(tmp_path, "v2", import_seconds=1.0)
    reloading = start_reload(tmp_path, "--wait")
    seen_pids, lock_free = set(), 0
    while reloading.poll() is None:
        # What a reader (or a deploy script's `flock -n -x`) sees at every moment.
        text = (tmp_path / "pool.pid").read_text()
        assert text.strip().isdigit(), repr(text)
        seen_pids.add(int(text))
        fd = os.open(lock, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            lock_free += 1
        except BlockingIOError:
            pass
        finally:
            os.close(fd)
    assert reloading.returncode == 0, reloading.stderr.read()
    new = pidfile_pid(tmp_path / "pool.pid")
    assert seen_pids <= {old, new}
    assert lock_free == 0
    assert not alive(old)
    # The new manager holds both: a second start is refused.
    second = subprocess.run([SCRIPT, "-d", "-p", "pool.pid", "-R", "unix:///nowhere.sock"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=30)  # fmt: skip
    assert second.returncode != 0
    assert f"names a running qless-pool (pid {new})" in second.stderr or "is held" in second.stderr
    stop = subprocess.run([SCRIPT, "stop", "-p", "pool.pid"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert stop.returncode == 0, stop.stderr
    assert not (tmp_path / "pool.pid").exists()


@pytest.fixture
def notify_socket(tmp_path):
    """A fake $NOTIFY_SOCKET: (its address, the bound datagram socket)."""
    address = str(tmp_path / "notify.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(address)
    listener.settimeout(20)
    yield address, listener
    listener.close()


def test_systemd_hears_the_new_main_pid(start_pool, tmp_path, notify_socket):
    deploy(tmp_path, "v1")
    address, listener = notify_socket
    pool = start_pool(*APP_ARGS, config="foo: 2\n", env={"NOTIFY_SOCKET": address})
    messages = []

    def heard(text: str) -> bool:
        while not any(text in m for m in messages):
            messages.append(listener.recv(4096).decode())
        return True

    heard("READY=1")
    deploy(tmp_path, "v2")
    result = reload(tmp_path, "--pid", str(pool.pid), "--wait", "--json")
    assert result.returncode == 0, result.stderr
    new = json.loads(result.stdout)["new_pid"]
    heard(f"MAINPID={new}")
    [ready] = [m for m in messages if f"MAINPID={new}" in m]
    assert "READY=1" in ready
    assert any("RELOADING=1" in m for m in messages)
    # Under systemd the old manager exits (systemd follows MAINPID): no keeper.
    assert pool.process.wait(timeout=20) == 0
    assert not any("STOPPING=1" in m for m in messages)
    assert alive(new)


def test_metrics_are_served_across_a_reload(start_pool, tmp_path, client):
    deploy(tmp_path, "v1")
    port = free_port()
    # A runtime directory of its own: the metrics directories in it are this pool's only.
    runtime = tmp_path / "run"
    runtime.mkdir()
    env = {**os.environ, "QLESS_POOL_RUNTIME_DIR": str(runtime)}
    old = start_daemon(start_pool, tmp_path, "--metrics-port", str(port), env=env)
    wait_for(lambda: scrape(port).get('qless_pool_workers{state="waiting"}') == 2,
             message="the old pool's metrics")  # fmt: skip
    # A new manager killed while it loads leaves no metrics directory behind.
    [base] = runtime.iterdir()

    def metrics_directories() -> set[str]:
        return {p.name for p in base.iterdir() if p.name.startswith("metrics-")}

    before = metrics_directories()
    assert len(before) == 1
    deploy(tmp_path, "hang")
    assert reload(tmp_path, "--timeout", "2", env=env).returncode == 1
    wait_for(lambda: metrics_directories() == before, message="the new manager's directory gone")
    deploy(tmp_path, "v2")
    assert reload(tmp_path, "--wait", env=env).returncode == 0
    # The old manager's directory went with it; the new one has its own.
    assert len(metrics_directories()) == 1 and metrics_directories() != before
    assert not alive(old)
    jid = put_job(client)
    wait_state(client, jid, "complete")
    wait_for(lambda: scrape(port).get('qless_pool_jobs_total{outcome="completed",queue="foo"}'),
             message="the new pool's metrics")  # fmt: skip


# --- the foreground: the keeper -------------------------------------------------------------------


def test_in_the_foreground_the_old_process_keeps_the_terminal(
    start_pool, tmp_path, client, redis_conn
):
    deploy(tmp_path, "v1")
    pool = start_pool(*APP_ARGS, config="foo: 2\n")
    wait_for(lambda: len(pool.workers()) == 2, message="the workers")
    for version in ("v2", "v3"):  # a reload of a reloaded pool too
        deploy(tmp_path, version)
        result = reload(tmp_path, "--wait")
        assert result.returncode == 0, result.stderr
        [manager] = wait_for(lambda: managers_under(pool.pid), message="the current manager")
        # The process the terminal waits for stays, and says whom it keeps: a bare Python
        # (keeper.py), not a copy of the old application (it titles itself once it has
        # exec'd: a moment after the reload is reported).
        keeper = f"qless-pool-keeper[testapp]: manager {manager}"
        wait_for(lambda k=keeper: title(pool.pid) == k, message=f"the title {keeper!r}")
        assert _rss_kb(pool.pid) < _rss_kb(manager) / 2
        jid = put_job(client)
        wait_state(client, jid, "complete")
        assert records(redis_conn)[-1]["version"] == version
    # status finds the pool by the directory, and by the keeper's pid.
    for args in ([], ["--pid", str(pool.pid)]):
        found = subprocess.run([SCRIPT, "status", "--json", *args], cwd=tmp_path,
                               capture_output=True, text=True, timeout=30)  # fmt: skip
        assert json.loads(found.stdout)["manager"]["pid"] == manager, found.stderr
    # A signal to the keeper is the pool's: TERM stops it, and the keeper exits with it.
    pool.send(signal.SIGTERM)
    assert pool.process.wait(timeout=20) == 0
    wait_for(lambda: not _processes_in(tmp_path), timeout=20, message="no process left")


def _processes_in(directory) -> list[int]:
    root = os.path.realpath(directory)
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cwd = os.readlink(f"/proc/{entry}/cwd")
            except OSError:
                continue
            if (cwd == root or cwd.startswith(root + "/")) and alive(int(entry)):
                found.append(int(entry))
    return found


# --- under Invoke ---------------------------------------------------------------------------------


def test_invoke_qless_pool_reloads_with_its_setup_tasks_run_afresh(invoke_project, redis_url):
    project = invoke_project
    (project / "invoke.yaml").write_text("qless_pool:\n  preload: [chainapp]\n  interval: 0.2\n")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("INVOKE_", "QLESS_"))},
        "CHAIN_LOG": str(project / "chain.log"),
        "QLESS_URL": redis_url,
        "PYTHONPATH": python_path(TESTS, project),
    }
    process = subprocess.Popen(
        [INVOKE, "qless.pool"], cwd=project, env=env, stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        wait_for(lambda: len(_workers_of(process.pid)) == 2, message="the pool's workers")
        result = subprocess.run([INVOKE, "qless.pool.reload", "--wait"], cwd=project, env=env,
                                capture_output=True, text=True, timeout=90)  # fmt: skip
        assert result.returncode == 0, result.stderr
        [manager] = managers_under(process.pid)
        # The keeper titles itself once it has exec'd: a moment after the reload is reported.
        keeper = f"qless-pool-keeper[{project.name}]: manager {manager}"
        wait_for(lambda: title(process.pid) == keeper, message=f"the title {keeper!r}")
        # The new manager ran the user's setup tasks and preloaded the application itself.
        steps = [line.split()[:2] for line in (project / "chain.log").read_text().splitlines()]
        assert ["environment", str(manager)] in steps and ["preload", str(manager)] in steps
        wait_for(lambda: len(_workers_of(manager)) == 2, message="the new pool's workers")
        process.send_signal(signal.SIGQUIT)  # the keeper passes it on; both end
        _, stderr = process.communicate(timeout=30)
        assert process.returncode == 0, stderr
    finally:
        process.kill()
        process.wait()
        kill_processes_in(project)  # a new manager and its workers, if the test failed
        reap_orphans()


def _workers_of(manager: int) -> list[int]:
    return [c for c in children(manager) if WAITING.match(title(c)) or FORKED.match(title(c))]


# --- releases in directories ----------------------------------------------------------------------


def test_a_current_symlink_repointed_by_a_deploy_is_followed(
    tmp_path, redis_url, client, redis_conn
):
    releases = tmp_path / "releases"
    for number, version, count in ((1, "v1", 1), (2, "v2", 3)):
        (releases / str(number)).mkdir(parents=True)
        deploy(releases / str(number), version)
        (releases / str(number) / "qless-pool.yml").write_text(f"foo: {count}\n")
    current = tmp_path / "current"
    current.symlink_to(releases / "1")
    env = {**os.environ, "PWD": str(current)}  # as a shell started in it says
    with open(tmp_path / "pool.log", "w") as log:
        pool = subprocess.Popen(
            [SCRIPT, "-R", redis_url, "-i", "0.2", *APP_ARGS], cwd=current, env=env,
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        wait_for(lambda: len(_workers_of(pool.pid)) == 1, message="release 1's worker")
        current.unlink()
        current.symlink_to(releases / "2")  # the deploy
        # Run where the operator is: in `current`, the new release now; the pool is found as
        # the one started in `current` as given.
        result = subprocess.run([SCRIPT, "reload"], cwd=current, env=env, capture_output=True,
                                text=True, timeout=90)  # fmt: skip
        assert result.returncode == 0, result.stderr
        [manager] = managers_under(pool.pid)
        assert os.readlink(f"/proc/{manager}/cwd") == str(releases / "2")
        wait_for(lambda: len(_workers_of(manager)) == 3, message="release 2's config: 3 workers")
        jid = put_job(client)
        wait_state(client, jid, "complete")
        assert records(redis_conn)[-1]["version"] == "v2"
    finally:
        pool.kill()
        pool.wait()
        kill_processes_in(tmp_path)
        reap_orphans()


def test_a_release_with_a_bad_config_is_refused_and_said(start_pool, tmp_path, client):
    deploy(tmp_path, "v1")
    old = start_daemon(start_pool, tmp_path)
    (tmp_path / "qless-pool.yml").write_text("foo: many\n")
    result = reload(tmp_path)
    assert result.returncode == 1
    assert one_line(result).startswith(
        "qless-pool reload: reload failed: config error: qless-pool.yml: key 'foo': the worker "
        "count must be a whole number"
    )
    assert pidfile_pid(tmp_path / "pool.pid") == old
    jid = put_job(client)
    wait_state(client, jid, "complete")


def test_new_workers_that_never_come_up_fail_the_reload_and_leave_nothing(
    start_pool, tmp_path, client, redis_conn
):
    deploy(tmp_path, "v1")
    old = start_daemon(start_pool, tmp_path)
    workers = sorted(c for c in children(old) if "qless-0" in title(c))
    # The new release's after_prefork hook fails: its workers die as they start.
    (tmp_path / "relapp.py").write_text(
        RELOAD_APP + "\nimport qless_pool\n\n@qless_pool.after_prefork\n"
        "def broken(worker):\n    raise RuntimeError('no database')\n"
    )
    result = reload(tmp_path, "--timeout", "4")
    assert result.returncode == 1
    assert "was not serving every slot within 4s" in one_line(result)
    # The new manager was sent QUIT: it and its workers go; the old pool serves on as it was.
    wait_for(lambda: not managers_under(old), message="the new manager to be gone")
    wait_for(lambda: sorted(c for c in children(old) if "qless-0" in title(c)) == workers,
             message="only the old workers")  # fmt: skip
    assert pidfile_pid(tmp_path / "pool.pid") == old
    jid = put_job(client)
    wait_state(client, jid, "complete")
    assert records(redis_conn)[-1]["version"] == "v1"


# --- a container: the pool is PID 1 ---------------------------------------------------------------


def _can_unshare_pid() -> bool:
    try:
        probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"],
                               capture_output=True, timeout=10)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


@pytest.mark.skipif(not _can_unshare_pid(), reason="needs unshare --pid (root, or user namespaces)")
def test_as_pid_1_of_a_container_the_pool_keeps_pid_1(tmp_path, redis_url, client, redis_conn):
    deploy(tmp_path, "v1")
    (tmp_path / "qless-pool.yml").write_text("foo: 2\n")
    with open(tmp_path / "pool.log", "w") as log:
        outer = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--mount-proc", SCRIPT, "-R", redis_url, "-i", "0.2",
             *APP_ARGS], cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        [init] = wait_for(lambda: children(outer.pid), message="PID 1 of the namespace")
        wait_for(lambda: len(_workers_of(init)) == 2, message="the workers")
        deploy(tmp_path, "v2")
        # As `docker exec CONTAINER qless-pool reload --pid 1` would.
        inside = ["nsenter", "--target", str(init), "--pid", "--mount"]
        result = subprocess.run([*inside, SCRIPT, "reload", "--pid", "1", "--wait"], cwd=tmp_path,
                                capture_output=True, text=True, timeout=90)  # fmt: skip
        assert result.returncode == 0, result.stderr
        # PID 1 stays, as the keeper: the container lives (its title set as it hands over).
        wait_for(lambda: title(init).startswith("qless-pool-keeper["), message="the keeper")
        [manager] = [c for c in children(init) if MANAGER.match(title(c))]
        wait_for(lambda: len(_workers_of(manager)) == 2, message="the new workers")
        jid = put_job(client)
        wait_state(client, jid, "complete")
        assert records(redis_conn)[-1]["version"] == "v2"
        os.kill(init, signal.SIGTERM)  # `docker stop`
        assert outer.wait(timeout=30) == 0
        wait_for(lambda: not _processes_in(tmp_path), timeout=20, message="no process left")
    finally:
        outer.kill()
        outer.wait()
        print((tmp_path / "pool.log").read_text())  # shown if the test failed
        kill_processes_in(tmp_path)
        reap_orphans()


# --- what the review found ------------------------------------------------------------------------


def test_a_release_with_other_counts_and_groups_takes_over(start_pool, tmp_path, client):
    deploy(tmp_path, "v1")
    old = start_daemon(start_pool, tmp_path, config="foo: 2\nbar: 1\n", workers=3)
    (tmp_path / "qless-pool.yml").write_text("foo: 1\nbaz: 2\n")  # fewer, one gone, one new
    result = reload(tmp_path, "--timeout", "30")
    assert result.returncode == 0, result.stderr
    new = pidfile_pid(tmp_path / "pool.pid")
    wait_for(lambda: not alive(old), message="the old manager to exit")
    wait_for(
        lambda: sorted(WAITING.match(title(c)).group(1) for c in _workers_of(new)
                       if WAITING.match(title(c))) == ["baz", "baz", "foo"],
        message="the new release's workers",
    )  # fmt: skip


def test_a_pause_sent_while_the_new_code_loads_reaches_the_new_pool(start_pool, tmp_path):
    deploy(tmp_path, "v1")
    old = start_daemon(start_pool, tmp_path)
    deploy(tmp_path, "v2", import_seconds=1.5)
    reloading = start_reload(tmp_path)
    wait_for(lambda: managers_under(old), message="the new manager")
    os.kill(old, signal.SIGUSR2)  # held by the loading manager, not its death
    assert reloading.wait(timeout=60) == 0, reloading.stderr.read()
    new = pidfile_pid(tmp_path / "pool.pid")
    paused = re.compile(r"^qless-[0-9.]+: Paused$")
    wait_for(lambda: [paused.match(title(c)) is not None for c in children(new)
                      if "qless-0" in title(c)] == [True, True], message="the new pool paused")  # fmt: skip
    os.kill(new, signal.SIGCONT)
    wait_for(lambda: len(_workers_of(new)) == 2, message="the new pool working again")


def test_two_reloads_at_once_one_runs_the_other_is_refused(start_pool, tmp_path):
    deploy(tmp_path, "v1")
    start_daemon(start_pool, tmp_path)
    deploy(tmp_path, "v2", import_seconds=1.0)
    first, second = start_reload(tmp_path), start_reload(tmp_path)
    codes = sorted([first.wait(timeout=60), second.wait(timeout=60)])
    assert codes == [0, 1]
    refused = (first if first.returncode else second).stderr.read()
    assert "reload refused" in refused


def test_a_failed_reload_tells_systemd_nothing_but_ready(start_pool, tmp_path, notify_socket):
    deploy(tmp_path, "v1")
    address, listener = notify_socket
    pool = start_pool(*APP_ARGS, config="foo: 2\n", env={"NOTIFY_SOCKET": address})
    while "READY=1" not in listener.recv(4096).decode():
        pass
    # The new release's workers never come up: the new manager is QUIT after the timeout.
    (tmp_path / "relapp.py").write_text(
        RELOAD_APP + "\nimport qless_pool\n\n@qless_pool.after_prefork\n"
        "def broken(worker):\n    raise RuntimeError('no database')\n"
    )
    result = reload(tmp_path, "--pid", str(pool.pid), "--timeout", "3")
    assert result.returncode == 1
    [new] = [json.loads(r)["new_pid"] for r in [_last_reload(pool.pid)]]
    wait_for(lambda: not alive(new), message="the failed new manager to be gone")
    listener.settimeout(0.5)
    heard = []
    with contextlib.suppress(TimeoutError, socket.timeout):
        while True:
            heard.append(listener.recv(4096).decode())
    assert not any("STOPPING=1" in m or "MAINPID=" in m for m in heard), heard
    assert any("RELOADING=1" in m for m in heard) and "READY=1" in heard[-1]
    assert pool.process.poll() is None


def _last_reload(manager: int) -> str:
    from qless_pool.ops.state import pool_directory, read_manager

    state = read_manager(pool_directory(manager, os.getuid())) or {}
    return json.dumps(state["reloads"][-1])


def test_a_pidfile_the_new_manager_cannot_replace_is_rewritten_in_place(tmp_path):
    # A pool run as --user keeps its pidfile in a directory root owns: the new manager cannot
    # make a file beside it, and rewrites it through the descriptor (and lock) handed over.
    from qless_pool.ops.daemon import DaemonError
    from qless_pool.ops.pidfile import Pidfile

    path = tmp_path / "pool.pid"
    old = Pidfile(str(path))
    old.acquire()
    handed = os.dup(old.fd)
    child = os.fork()
    if child == 0:  # the new manager
        status = 1
        try:
            (tmp_path / f".pool.pid.{os.getpid()}").write_text("")  # its new file cannot be made
            new = Pidfile(str(path))
            new.adopt(handed)
            new.take_over()
            status = 0 if path.read_text().strip() == str(os.getpid()) else 2
        finally:
            os._exit(status)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert int(path.read_text()) == child
    old.disown()  # the old manager lets go: the file stays, naming the new one
    assert int(path.read_text()) == child
    with pytest.raises(DaemonError, match="is held by a running qless-pool"):
        Pidfile(str(path)).acquire()  # the handed descriptor still holds the lock
    os.close(handed)
    # Every copy of the descriptor closed: the lock is free, and the pid stale.
    third = Pidfile(str(path))
    third.acquire()
    assert int(path.read_text()) == os.getpid()
    third.release()


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as file:
        return int(next(line for line in file if line.startswith("VmRSS:")).split()[1])


def test_the_keeper_passes_on_every_signal_the_manager_acts_on():
    from qless_pool.pool import keeper
    from qless_pool.pool.signals import MANAGER_SIGNALS

    assert set(keeper.FORWARDED) == set(MANAGER_SIGNALS) - {signal.SIGCHLD}


def test_a_failed_reload_rolls_back_without_leaving_a_queue_short(start_pool, tmp_path, client):
    # Every worker takes half a second to start (it connects to its database, say).
    slow_start = "\nimport time, qless_pool\n\n@qless_pool.after_prefork\ndef connect(worker):\n"
    slow_start += "    time.sleep(0.5)\n"
    deploy(tmp_path, "v1")
    (tmp_path / "relapp.py").write_text(RELOAD_APP + slow_start)
    old = start_daemon(start_pool, tmp_path, config="foo: 2\nbar: 1\n", workers=3)
    # The new release's workers for bar never come up; those for foo do, and take over foo's
    # slots before the reload fails.
    (tmp_path / "relapp.py").write_text(
        RELOAD_APP + slow_start + "    if 'bar' in worker.queues:\n"
        "        raise RuntimeError('no bar database')\n"
    )
    reloading = start_reload(tmp_path, "--timeout", "3")
    managers, foo = {old}, []
    waiting_foo = re.compile(r"^qless-[0-9.]+: Waiting for foo$")
    while reloading.poll() is None or len(managers) > 1:
        managers.update(managers_under(old))
        managers = {m for m in managers if alive(m)} | {old}
        foo.append(sum(1 for m in managers for c in children(m) if waiting_foo.match(title(c))))
        if reloading.poll() is not None and len(managers) > 1 and len(foo) > 20_000:
            break
        time.sleep(0.003)
    assert reloading.returncode == 1
    assert "was not serving every slot within 3s" in reloading.stderr.read()
    assert min(foo) >= 2  # the old pool's foo workers were back before the new ones went
    wait_for(lambda: len([c for c in children(old) if "qless-0" in title(c)]) == 3,
             message="the old pool whole again")  # fmt: skip
