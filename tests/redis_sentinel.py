"""A Redis master, its replica and Redis Sentinels watching them, on loopback TCP ports (Sentinel
hands out host:port addresses, so no unix sockets here), each with its files in one temp dir.

Passwords everywhere, as in production: the data servers want ``MASTER_PASSWORD`` (and use it
with each other, so that a demoted master can follow the new one), the Sentinels want
``SENTINEL_PASSWORD``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import redis
from processes import wait_for
from redis_server import _die_with_parent, server_binary

SERVICE = "mymaster"
MASTER_PASSWORD = "master-secret-pw"
SENTINEL_PASSWORD = "sentinel-secret-pw"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Process:
    """One redis-server (a data server or a Sentinel) on 127.0.0.1."""

    def __init__(self, cluster: SentinelCluster, name: str, password: str):
        self.cluster = cluster
        self.name = name
        self.password = password
        self.port = 0
        self.process: subprocess.Popen | None = None

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def client(self, **options) -> redis.Redis:
        return redis.Redis(
            "127.0.0.1", self.port, password=self.password, socket_timeout=10, **options
        )

    def start(self, arguments: list[str], attempts: int = 3) -> Process:
        """Start on a free port (another one if that port was taken meanwhile)."""
        for _ in range(attempts):
            self.port = free_port()
            command = [server_binary(), *arguments, "--port", str(self.port)]
            log = os.path.join(self.cluster.directory, f"{self.name}.log")
            with open(log, "ab") as output:
                self.process = subprocess.Popen(
                    command,
                    cwd=self.cluster.directory,
                    stdin=subprocess.DEVNULL,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    preexec_fn=_die_with_parent,
                )
            deadline = time.monotonic() + 10
            while self.process.poll() is None and time.monotonic() < deadline:
                try:
                    self.client().ping()
                    return self
                except redis.ConnectionError:
                    time.sleep(0.02)
            self.stop()
        raise RuntimeError(
            f"{self.name} did not start; see {self.cluster.directory}/{self.name}.log"
        )

    def stop(self, signum: int | None = None) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            if signum is None:
                self.process.terminate()
            else:
                self.process.send_signal(signum)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


class SentinelCluster:
    """``master``, ``replica`` (of the master) and ``sentinels`` monitoring them as SERVICE."""

    def __init__(self, sentinels: int = 2):
        self.binary = server_binary()
        self.directory = tempfile.mkdtemp(prefix="qless-pool-sentinel-")
        self.master = Process(self, "master", MASTER_PASSWORD)
        self.replica = Process(self, "replica", MASTER_PASSWORD)
        self.sentinels = [
            Process(self, f"sentinel{i}", SENTINEL_PASSWORD) for i in range(sentinels)
        ]

    def url(self, extra_sentinels: tuple[str, ...] = (), db: int = 0) -> str:
        hosts = ",".join([*extra_sentinels, *(f"127.0.0.1:{s.port}" for s in self.sentinels)])
        return (
            f"redis+sentinel://:{MASTER_PASSWORD}@{hosts}/{SERVICE}/{db}"
            f"?sentinel_password={SENTINEL_PASSWORD}"
        )

    def _data_server(self, name: str) -> list[str]:
        return [
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", self.directory,
            "--dbfilename", f"{name}.rdb",
            "--requirepass", MASTER_PASSWORD,
            "--masterauth", MASTER_PASSWORD,
            "--repl-diskless-sync", "yes",
            "--repl-diskless-sync-delay", "0",
        ]  # fmt: skip

    def start(self) -> SentinelCluster:
        try:
            self.master.start(self._data_server("master"))
            self.replica.start(
                [*self._data_server("replica"), "--replicaof", *map(str, self.master.address)]
            )
            wait_for(
                lambda: self.replica.client().info("replication")["master_link_status"] == "up",
                message="the replica to sync",
            )
            for sentinel in self.sentinels:
                config = os.path.join(self.directory, f"{sentinel.name}.conf")
                with open(config, "w") as file:  # Sentinel rewrites its config file
                    file.write(
                        "bind 127.0.0.1\n"
                        f"dir {self.directory}\n"
                        f"requirepass {SENTINEL_PASSWORD}\n"
                        f"sentinel sentinel-pass {SENTINEL_PASSWORD}\n"
                        f"sentinel monitor {SERVICE} 127.0.0.1 {self.master.port} 1\n"
                        f"sentinel auth-pass {SERVICE} {MASTER_PASSWORD}\n"
                        f"sentinel down-after-milliseconds {SERVICE} 1000\n"
                        f"sentinel failover-timeout {SERVICE} 10000\n"
                    )
                sentinel.start([config, "--sentinel"])
            for sentinel in self.sentinels:
                wait_for(
                    lambda sentinel=sentinel: self._knows_the_replica(sentinel),
                    message=f"{sentinel.name} to know the replica",
                )
        except BaseException:
            self.remove()
            raise
        return self

    def _knows_the_replica(self, sentinel: Process) -> bool:
        replicas = sentinel.client().sentinel_slaves(SERVICE)
        # Listed, seen up, and its INFO read: a replica the Sentinel would promote.
        return any(
            (r["ip"], r["port"]) == self.replica.address
            and not r["is_sdown"]
            and r.get("master-link-status") == "ok"
            and int(r.get("info-refresh", 1e9)) < 5000
            for r in replicas
        )

    def master_address(self, sentinel: Process | None = None) -> tuple[str, int]:
        found = (sentinel or self.sentinels[0]).client().sentinel_get_master_addr_by_name(SERVICE)
        return (found[0].decode(), int(found[1]))

    def replicated(self) -> bool:
        """Has the replica processed everything the master has written?"""
        written = self.master.client().info("replication")["master_repl_offset"]
        applied = self.replica.client().info("replication")["slave_repl_offset"]
        return applied >= written

    def promoted(self) -> bool:
        """Does every Sentinel name the replica as the master, its failover over?"""
        for sentinel in self.sentinels:
            state = sentinel.client().sentinel_master(SERVICE)
            if (state["ip"], state["port"]) != self.replica.address or state["flags"] != "master":
                return False
        return True

    def fail_over(self, crash: bool) -> None:
        """Make the replica the master, losing no write: ``crash`` kills the master (SIGKILL)
        and lets the Sentinels notice; otherwise ``SENTINEL FAILOVER`` switches while both run,
        and the old master is demoted to a replica of the new one."""
        master = self.master.client()
        # Replication is asynchronous: a write the master has acknowledged may not have reached
        # the replica yet, and a failover loses it (Redis's trade-off, not the pool's: qless
        # would then forget, say, a completion, and run that job again once its lock expired).
        # So writes are paused first (a client's write waits, and is never executed if the
        # client gives up) and the failover starts only once the replica has applied
        # everything the master wrote. WAIT would not do: it waits for this client's writes.
        master.execute_command("CLIENT", "PAUSE", "60000", "WRITE")
        wait_for(self.replicated, message="the replica to catch up")
        if crash:
            self.master.stop(signal.SIGKILL)
        else:
            self.sentinels[0].client().execute_command("SENTINEL", "FAILOVER", SERVICE)
        wait_for(self.promoted, timeout=30, interval=0.05, message="the Sentinels to switch")
        if not crash:
            # The Sentinels demote the old master themselves, but only some seconds later (and
            # not while its writes are paused): do it now, as they would. Writes still waiting
            # on it are then refused (READONLY), never executed.
            master.execute_command("REPLICAOF", *map(str, self.replica.address))
            master.execute_command("CLIENT", "UNPAUSE")

    def remove(self) -> None:
        for process in [*self.sentinels, self.replica, self.master]:
            process.stop()
        shutil.rmtree(self.directory, ignore_errors=True)
