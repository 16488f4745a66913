"""The README's screenshots of the web dashboard (docs/images/web-*.png), made from the demo.

    python examples/demo/screenshots.py     # needs the web and demo extras, playwright, chromium

An embedded Redis, the demo's jobs (some failing), a pool of the demo's config running slow jobs
(so the pools page shows work in progress), ``qless-pool web``, and Debian's chromium driven by
Playwright. Everything it started is stopped at the end.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from demo import CONFIG, HERE, ROOT, EmbeddedRedis

import qless_pool

IMAGES = ROOT / "docs" / "images"
BIN = Path(sys.executable).parent


def main() -> int:
    from playwright.sync_api import sync_playwright

    server = EmbeddedRedis().start()
    started: list[subprocess.Popen] = []
    try:
        client = qless_pool.connect(server.url)
        for n in range(12):
            client.queues[("demo_foo", "demo_bar", "demo_baz")[n % 3]].put(
                "demo_jobs.Failing", {"order": 1000 + n, "customer": f"c-{n}"}, retries=0
            )
        env = {**os.environ, "PYTHONPATH": str(HERE), "QLESS_URL": server.url}
        started.append(subprocess.Popen(
            [str(BIN / "qless-pool"), "-c", str(CONFIG), "-E", "production", "-a", "demo"],
            cwd=HERE, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        ))  # fmt: skip
        _wait(lambda: sum(client.jobs.failed().values()) == 12)
        for n in range(40):
            client.queues["demo_bar"].put("demo_jobs.Slow", {"seconds": 60, "n": n})
        for n in range(30):
            client.queues["demo_foo"].put("demo_jobs.Quick", {"n": n}, delay=3600)
        port = _free_port()
        started.append(subprocess.Popen(
            [str(BIN / "qless-pool"), "web", "-R", server.url, "--port", str(port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        ))  # fmt: skip
        base = f"http://127.0.0.1:{port}"
        _wait(lambda: urllib.request.urlopen(base + "/api/pools").read() != b"[]\n")
        _wait(lambda: b"demo_jobs.Slow" in urllib.request.urlopen(base + "/api/pools").read())
        group = next(iter(client.jobs.failed()))
        failed = client.jobs.failed(group)["jobs"][0]
        IMAGES.mkdir(exist_ok=True)
        chromium = shutil.which("chromium") or shutil.which("chromium-browser")
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1200, "height": 760})
            for path, name in (("/", "overview"), (f"/jobs/{failed.jid}", "job"),
                               ("/pools", "pools")):  # fmt: skip
                page.goto(base + path)
                page.screenshot(path=str(IMAGES / f"web-{name}.png"), full_page=False)
                print(f"docs/images/web-{name}.png")
            browser.close()
    finally:
        for process in reversed(started):
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=30)
        server.stop()
    return 0


def _wait(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("timed out")
        time.sleep(0.1)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


if __name__ == "__main__":
    raise SystemExit(main())
