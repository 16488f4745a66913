"""What the dashboard's tests share: failed jobs made fast, token files, a served dashboard."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

from processes import wait_for

from qless_pool.client import pipelined
from qless_pool.web.tokens import hash_token

SCRIPT = str(Path(sys.executable).parent / "qless-pool")
#: Tokens of the tests (at least 16 characters, as hash-token asks).
WRITE_TOKEN = "write-token-of-the-tests-0123456789"
READ_TOKEN = "read-token-of-the-tests-0123456789"


def make_failed(client, queue: str, group: str, count: int, *, data=None, message="boom"):
    """``count`` jobs of ``queue`` failed in ``group`` (put, popped, failed: as a worker does),
    in pipelined batches; returns their jids."""
    jids = []
    tag = hashlib.sha256(group.encode()).hexdigest()[:8]  # a group name may hold anything
    for start in range(0, count, 1000):
        batch = [f"{tag}-{n}" for n in range(start, min(count, start + 1000))]
        body = json.dumps(data or {"n": 1})
        # The highest priority: the pop takes these, not a job the test put there before.
        puts = [["put", queue, jid, "testjobs.Fail", body, 0, "priority", 10**6] for jid in batch]
        pipelined(client, puts)
        pipelined(client, [["pop", queue, "test-worker", len(batch)]])
        pipelined(
            client,
            [["fail", jid, "test-worker", group, message, body] for jid in batch],
        )
        jids += batch
    return jids


def token_file(directory: Path, *lines: str) -> Path:
    """A token file with a write token ("alice") and a read token ("grafana"), or ``lines``."""
    path = directory / "tokens"
    text = lines or (
        hash_token(WRITE_TOKEN, "write") + " alice",
        hash_token(READ_TOKEN, "read") + " grafana",
    )
    path.write_text("\n".join(text) + "\n")
    return path


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


class Served:
    """``qless-pool web`` as a process, on a port of its own."""

    def __init__(self, process: subprocess.Popen, base: str, log: Path):
        self.process, self.base, self.log = process, base, log

    def get(self, path: str, headers=None) -> tuple[int, dict[str, str], str]:
        return self.ask("GET", path, headers)

    def ask(
        self, method: str, path: str, headers=None, body: bytes | None = None
    ) -> tuple[int, dict[str, str], str]:
        request = urllib.request.Request(
            self.base + path, data=body, headers=headers or {}, method=method
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:
                return answer.status, dict(answer.headers), answer.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, dict(error.headers), error.read().decode()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def serve(redis_url: str, port: int, log: Path, *args: str, prefix: str = "") -> Served:
    """Start ``qless-pool web`` and wait until it answers."""
    command = [SCRIPT, "web", "-R", redis_url, "--port", str(port), *args]
    if prefix:
        command += ["--prefix", prefix]
    out = open(log, "wb")  # noqa: SIM115 (the process writes it while it runs)
    process = subprocess.Popen(
        command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    out.close()
    served = Served(process, f"http://127.0.0.1:{port}{prefix}", log)

    def answers() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"qless-pool web exited: {log.read_text()}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1).close()
        except urllib.error.HTTPError:
            return True  # it answers (a 404 outside the prefix, a 401)
        except OSError:
            return False
        return True

    try:
        wait_for(answers, timeout=15, message="qless-pool web answering")
    except BaseException:
        served.stop()
        raise
    return served
