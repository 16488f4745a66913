"""How fast the dashboard's pages answer with a big qless: 1,000 queues and 20,000 failed jobs.

    python benchmarks/web_pages.py [--failed 20000] [--queues 1000] [--runs 7]

Starts its own redis-server (on a socket in a temporary directory) and ``qless-pool web`` (the
real server, waitress), fills qless, then asks for each page ``--runs`` times over HTTP and
reports the median and the slowest. Last, it retries all 20,000 failed jobs with one POST and
meanwhile times the overview, to show the server keeps answering during a bulk action. Writes
benchmarks/web-results.json; docs/BENCHMARKS.md ("The web dashboard") quotes it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import redis

from qless_pool.client import connect, pipelined

HERE = Path(__file__).resolve().parent
SCRIPT = str(Path(sys.executable).parent / "qless-pool")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--failed", type=int, default=20_000)
    parser.add_argument("--queues", type=int, default=1_000)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    directory = tempfile.mkdtemp(prefix="qless-pool-webbench-")
    sock = os.path.join(directory, "redis.sock")
    server = subprocess.Popen(
        [shutil.which("redis-server") or "redis-server", "--port", "0", "--unixsocket", sock,
         "--save", "", "--dir", directory],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"unix://{sock}?db=0"
    web = None
    try:
        _wait(lambda: os.path.exists(sock) and redis.Redis(unix_socket_path=sock).ping())
        client = connect(url, worker_name="bench-worker")
        jid = _fill(client, args.queues, args.failed)
        port = _free_port()
        web = subprocess.Popen(
            [SCRIPT, "web", "-R", url, "--port", str(port)], stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        base = f"http://127.0.0.1:{port}"
        _wait(lambda: _get(base + "/api/failed") is not None)
        pages = [
            "/", "/queues/q-0500", "/queues/q-0500?state=scheduled", f"/jobs/{jid}", "/failed",
            "/failed/big-Err", "/failed/big-Err?offset=10000", "/failed/big-Err/retry",
            "/workers", "/pools", "/api/queues", "/api/failed/big-Err?offset=19975&limit=25",
        ]  # fmt: skip
        results = {}
        for page in pages:
            times = [_timed(base + page) for _ in range(args.runs)]
            results[page] = {"median_ms": statistics.median(times), "max_ms": max(times)}
            print(f"{page:45} median {results[page]['median_ms']:7.1f} ms  "
                  f"max {results[page]['max_ms']:7.1f} ms")  # fmt: skip
        bulk = _bulk_retry(base, args.failed)
        print(
            f"retry all {args.failed:,}: {bulk['seconds']:.2f} s; overview meanwhile: "
            f"median {bulk['overview_median_ms']:.1f} ms, max {bulk['overview_max_ms']:.1f} ms"
        )
        report = {
            "queues": args.queues, "failed": args.failed, "runs": args.runs, "pages": results,
            "bulk_retry": bulk, "cpus": os.cpu_count(),
        }  # fmt: skip
        (HERE / "web-results.json").write_text(json.dumps(report, indent=2) + "\n")
    finally:
        if web is not None:
            web.send_signal(signal.SIGTERM)
            web.wait(timeout=10)
        server.terminate()
        server.wait(timeout=10)
        shutil.rmtree(directory, ignore_errors=True)
    return 0


def _fill(client, queues: int, failed: int) -> str:
    """One waiting and one scheduled job in each of ``queues`` queues; ``failed`` failed jobs in
    one group (big-Err), as a worker fails them. Returns a failed job's jid."""
    puts = []
    for n in range(queues):
        puts.append(["put", f"q-{n:04d}", f"w-{n}", "jobs.Work", '{"n": 1}', 0])
        puts.append(["put", f"q-{n:04d}", f"s-{n}", "jobs.Work", '{"n": 1}', 3600])
    pipelined(client, puts)
    for start in range(0, failed, 1000):
        jids = [f"f-{n}" for n in range(start, min(failed, start + 1000))]
        body = json.dumps({"order": 1, "lines": list(range(20))})
        pipelined(client, [["put", "failing", j, "jobs.Work", body, 0] for j in jids])
        pipelined(client, [["pop", "failing", "bench-worker", len(jids)]])
        message = "Traceback (most recent call last):\n" + "  File x, line 1\n" * 20 + "Err: no"
        pipelined(client, [["fail", j, "bench-worker", "big-Err", message, body] for j in jids])
    return "f-0"


def _bulk_retry(base: str, failed: int) -> dict:
    times: list[float] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            times.append(_timed(base + "/"))

    watcher = threading.Thread(target=watch)
    request = urllib.request.Request(base + "/failed/big-Err/retry", method="GET")
    with urllib.request.urlopen(request) as answer:  # the confirmation: a session and its CSRF
        cookie = answer.headers["Set-Cookie"].split(";", 1)[0]
        page = answer.read().decode()
    csrf = page.split('name="csrf" value="', 1)[1].split('"', 1)[0]
    started = time.perf_counter()
    watcher.start()
    post = urllib.request.Request(
        base + "/api/failed/big-Err/retry", method="POST",
        headers={"Cookie": cookie, "X-CSRF-Token": csrf},
    )  # fmt: skip
    with urllib.request.urlopen(post, timeout=300) as answer:
        count = json.loads(answer.read())["count"]
    seconds = time.perf_counter() - started
    done.set()
    watcher.join()
    assert count == failed, count
    return {
        "seconds": seconds, "count": count, "overview_median_ms": statistics.median(times),
        "overview_max_ms": max(times), "overview_requests": len(times),
    }  # fmt: skip


def _timed(url: str) -> float:
    started = time.perf_counter()
    with urllib.request.urlopen(url, timeout=60) as answer:
        answer.read()
    return (time.perf_counter() - started) * 1000


def _get(url: str):
    try:
        with urllib.request.urlopen(url, timeout=2) as answer:
            return answer.read()
    except OSError:
        return None


def _wait(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():
                return
        except (OSError, redis.RedisError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("timed out")
        time.sleep(0.05)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


if __name__ == "__main__":
    raise SystemExit(main())
