"""A chaos run: a real pool on real jobs while its processes are killed, signals storm and its
Redis restarts; afterwards every job is accounted for from qless's own state.

    python tests/chaos.py --jobs 1200 --seconds 90     # the runs behind docs/RELIABILITY.md
    python tests/chaos.py --jobs 1200 --seconds 90 --in-process

The test suite runs it small, in both run modes (tests/test_chaos.py, under a minute each).

During the run, on a pool of 5 workers (--job-timeout 2, 3 s locks; a child per job, or jobs in
the worker process with --in-process):

- jobs are put on three queues while everything below happens: quick ones, slow ones, ones that
  raise, ones that os._exit (2 retries), ones that hang past the job timeout;
- random job children (with a child per job) and random worker parents are SIGKILLed;
- a HUP storm (20 in a second) with USR2 and CONT between the HUPs (CONT last), then USR2,
  a second later CONT;
- Redis (append-only file, fsync always) is shut down and started again;
- three ``qless-pool reload`` (new code without a stop), each handing the pool over to a new
  manager while the kills go on; the process started first stays as the keeper.

While it runs, the manager never has more live workers than the config asks for, and a worker
it retires (HUP) that has no job to finish exits at once; after each CONT no worker stays
paused.

Afterwards every jid must be complete, failed with a group that says why, or waiting; none
running (the pool has stopped, so nobody could own it), none vanished. Every run of a job body
is counted (an INCR in Redis); a job that ran more often than its kind implies must have been
interrupted by one of our kills or have lost its lock (qless history ``timed-out``). No process
of the pool may be left after QUIT.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))

from processes import (  # noqa: E402
    alive,
    children,
    descendants,
    kill_processes_in,
    successor_of,
    title,
    wait_for,
)
from redis_server import RedisServer  # noqa: E402

from qless_pool.client import connect  # noqa: E402

SCRIPT = os.path.join(os.path.dirname(sys.executable), "qless-pool")
CONFIG = '"q1": 2\n"q2,q1": 2\n"q3,q2": 1\n'
QUEUE_GROUPS = ("q1", "q2,q1", "q3,q2")
WORKERS = 5
QUEUES = ("q1", "q2", "q3")
JOB_TIMEOUT = 2
HEARTBEAT = 3
#: (kind, share of the jobs, expected runs without interference)
KINDS = [("Quick", 0.70, 1), ("Slow", 0.15, 1), ("Failing", 0.05, 1), ("Exit", 0.05, 3),
         ("Hang", 0.05, 1)]  # fmt: skip
EXPECTED_FAILURE = {"Failing": "ValueError", "Exit": "DirtyExit", "Hang": "TimeoutError"}
WORKER_TITLE = re.compile(r"^qless-[0-9.]+: (Waiting|Forked|Paused)")
WAITING_TITLE = re.compile(r"^qless-[0-9.]+: (Waiting|Paused)")
MANAGER_TITLE = re.compile(
    r"^qless-pool-manager\[[^\]]*\]: managing \[([0-9, ]*)\]( retiring \[([0-9, ]*)\])?"
)
JOB_TITLE = re.compile(r"^qless-[0-9.]+: Processing ")


@dataclass
class Report:
    jobs: int = 0
    seconds: float = 0.0
    states: Counter = field(default_factory=Counter)
    groups: Counter = field(default_factory=Counter)
    children_killed: int = 0
    workers_killed: int = 0
    hups: int = 0
    pauses: int = 0
    redis_restarts: int = 0
    reloads: int = 0
    runs: int = 0
    duplicates: Counter = field(default_factory=Counter)  # cause -> extra runs
    problems: list[str] = field(default_factory=list)  # each one is a failure of the run
    worker_recovery: list[float] = field(default_factory=list)
    redis_recovery: list[float] = field(default_factory=list)
    left_running: list[int] = field(default_factory=list)
    most_parents: int = 0  # worker parents seen at once (the retiring ones included)
    most_finishing: int = 0  # of them, retiring with a job to finish, at that moment

    @property
    def lost(self) -> int:
        return self.states["running"] + self.states["vanished"]

    def table(self) -> str:
        def median(values):
            return f"{statistics.median(values):.2f} s (max {max(values):.2f} s)" if values else "-"

        dup = ", ".join(f"{n} after {cause}" for cause, n in self.duplicates.items()) or "none"
        rows = [
            ("jobs", f"{self.jobs} on {len(QUEUES)} queues, {self.runs} runs of job bodies"),
            ("outcome", ", ".join(f"{n} {state}" for state, n in sorted(self.states.items()))),
            ("failure groups", ", ".join(f"{n} {g}" for g, n in sorted(self.groups.items()))),
            ("job children SIGKILLed", str(self.children_killed)),
            ("worker parents SIGKILLed", str(self.workers_killed)),
            ("HUPs / USR2+CONT", f"{self.hups} / {self.pauses}"),
            (
                "worker parents at most (of them finishing a job)",
                f"{self.most_parents} ({self.most_finishing}) for {WORKERS} slots",
            ),
            ("Redis restarts (AOF)", str(self.redis_restarts)),
            ("reloads (qless-pool reload)", str(self.reloads)),
            ("lost (running with no owner, or vanished)", str(self.lost)),
            ("duplicate runs", dup),
            ("unexplained", str(len(self.problems))),
            ("worker killed -> replacement spawned", median(self.worker_recovery)),
            ("Redis back -> first job completed", median(self.redis_recovery)),
            ("pool processes left after QUIT", str(len(self.left_running))),
            ("chaos phase", f"{self.seconds:.0f} s"),
        ]
        return "\n".join(["| | |", "| --- | --- |", *(f"| {a} | {b} |" for a, b in rows)])


class Chaos:
    def __init__(
        self, directory: Path, jobs: int, seconds: float, seed: int, fork_per_job: bool = True
    ):
        self.directory = directory
        self.fork_per_job = fork_per_job
        self.jobs = jobs
        self.seconds = seconds
        self.random = random.Random(seed)
        self.redis = RedisServer(aof=True)
        self.report = Report(jobs=jobs, seconds=seconds)
        self.kinds: dict[str, str] = {}  # jid -> kind
        self.kills: list[tuple[str, int, float]] = []  # ("child" | "worker", pid, when)
        self.pool: subprocess.Popen | None = None
        self.log = directory / "pool.log"
        self.idle_retiring: dict[int, float] = {}  # pid -> first seen retiring with no job
        self.reloading: subprocess.Popen | None = None

    # --- the run --------------------------------------------------------------------------------

    def run(self) -> Report:
        self.redis.start()
        try:
            self.client = connect(self.redis.url(), "chaos-producer")
            self.client.config["heartbeat"] = HEARTBEAT
            self.client.config["grace-period"] = 0
            self.start_pool()
            self.make_chaos()
            self.wait_for_the_jobs()
            self.stop_pool()
            self.account()
        finally:
            if self.pool is not None and self.pool.poll() is None:
                for pid in [*descendants(self.pool.pid), self.pool.pid]:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                self.pool.wait()
            if self.reloading is not None and self.reloading.poll() is None:
                self.reloading.kill()
                self.reloading.wait()
            # A manager a reload started may have left the tree it was in (its parent gone):
            # every process that runs in the run's directory goes.
            kill_processes_in(self.directory)
            self.redis.remove()
        return self.report

    def start_pool(self) -> None:
        (self.directory / "qless-pool.yml").write_text(CONFIG)
        command = [SCRIPT, "-R", self.redis.url(), "-I", str(TESTS), "-a", "chaos", "-i", "0.2",
                   "--job-timeout", str(JOB_TIMEOUT), "--allow-module", "chaosjobs",
                   *([] if self.fork_per_job else ["--no-fork-per-job"])]  # fmt: skip
        with open(self.log, "w") as log:
            self.pool = subprocess.Popen(
                command, cwd=self.directory, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        wait_for(lambda: len(self.workers()) == WORKERS, 30, message="the workers")

    def managers(self) -> list[int]:
        """The pool's managers: the process started (until its first reload hands over: then
        it keeps the terminal, and the manager is its child), and during a hand-over the new
        one too."""
        assert self.pool is not None
        if MANAGER_TITLE.match(title(self.pool.pid)):
            found = [self.pool.pid]
        else:  # the keeper forks nothing but its manager
            found = [pid for pid in children(self.pool.pid) if MANAGER_TITLE.match(title(pid))]
        for manager in list(found):
            new = successor_of(manager)
            if new is not None and new not in found:
                found.append(new)
        return found

    def workers(self) -> list[int]:
        return [
            pid
            for manager in self.managers()
            for pid in children(manager)
            if WORKER_TITLE.match(title(pid))
        ]

    def job_children(self) -> list[int]:
        return [
            pid
            for manager in self.managers()
            for worker in children(manager)
            for pid in children(worker)
            if JOB_TITLE.match(title(pid))
        ]

    def make_chaos(self) -> None:
        assert self.pool is not None
        start = time.monotonic()
        put_until = start + self.seconds * 0.7
        events = {0.15: self.reload, 0.30: self.hup_storm, 0.45: self.pause, 0.55: self.reload,
                  0.65: self.restart_redis, 0.80: self.reload}  # fmt: skip
        next_child_kill = start + 0.5
        next_worker_kill = start + 1.5
        while (now := time.monotonic()) < start + self.seconds:
            due = int(self.jobs * min(1.0, (now - start) / (put_until - start)))
            self.put_jobs(due - len(self.kinds))
            for at, event in list(events.items()):
                # One at a time: a HUP or a second reload during a hand-over is not acted on.
                if now >= start + at * self.seconds and self.reload_done():
                    del events[at]
                    event()
            self.watch_workers(now)
            if now >= next_child_kill:
                self.kill("child", self.job_children())
                next_child_kill = now + self.random.uniform(0.3, 1.0)
            if now >= next_worker_kill:
                self.kill("worker", self.workers())
                next_worker_kill = now + self.random.uniform(2.0, 4.0)
            time.sleep(0.05)
        self.put_jobs(self.jobs - len(self.kinds))
        for event in events.values():  # held back by a long reload: each still happens
            while not self.reload_done():
                time.sleep(0.05)
            event()
        while not self.reload_done():
            time.sleep(0.05)

    def put_jobs(self, count: int) -> None:
        for _ in range(max(0, count)):
            kind = self.random.choices([k for k, *_ in KINDS], [w for _, w, _ in KINDS])[0]
            data = {"seconds": round(self.random.uniform(0.05, 0.5), 2)} if kind == "Slow" else {}
            try:
                jid = self.client.queues[self.random.choice(QUEUES)].put(
                    f"chaosjobs.{kind}", data, retries=2 if kind == "Exit" else 5
                )
            except Exception:  # Redis is restarting: put it later
                return
            self.kinds[jid] = kind

    def kill(self, what: str, pids: list[int]) -> None:
        if not pids:
            return
        victim = self.random.choice(pids)
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGKILL)
            self.kills.append((what, victim, time.time()))
            if what == "child":
                self.report.children_killed += 1
            else:
                self.report.workers_killed += 1

    def watch_workers(self, now: float) -> None:
        """The manager's title lists its workers, and the retiring ones apart: it never has more
        live workers than the config's 5 (during a reload's hand-over, the two managers one
        more), and a retiring worker with no job exits at once."""
        live, retiring = [], []
        for manager in self.managers():
            match = MANAGER_TITLE.match(title(manager))
            if match:
                # Its own children only: forked, a new manager bears the old one's title until
                # it executes.
                own = set(children(manager))
                live += [int(pid) for pid in match.group(1).split(", ") if pid and int(pid) in own]
                retiring += [
                    int(pid)
                    for pid in (match.group(3) or "").split(", ")
                    if pid and int(pid) in own
                ]
        most = WORKERS + (len(QUEUE_GROUPS) if self.reloading is not None else 0)
        live = [pid for pid in live if alive(pid)]
        if len(live) > most:
            self.report.problems.append(f"{len(live)} live workers for {WORKERS} slots: {live}")
        parents = [pid for pid in [*live, *retiring] if alive(pid)]
        finishing = [pid for pid in retiring if alive(pid) and not WAITING_TITLE.match(title(pid))]
        if len(parents) > self.report.most_parents:
            self.report.most_parents, self.report.most_finishing = len(parents), len(finishing)
        idle = {pid for pid in retiring if alive(pid) and WAITING_TITLE.match(title(pid))}
        for pid in list(self.idle_retiring):
            if pid not in idle:
                del self.idle_retiring[pid]
        for pid in idle:
            since = self.idle_retiring.setdefault(pid, now)
            if now - since > 5.0:
                self.report.problems.append(f"retiring worker {pid} idle for 5 s, not exiting")
                self.idle_retiring[pid] = float("inf")  # said once

    def none_paused(self, after: str) -> None:
        """After CONT (the last of the pause signals), no worker stays paused."""
        paused = lambda: [pid for pid in self.workers() if "Paused" in title(pid)]  # noqa: E731
        try:
            wait_for(lambda: not paused(), 5)
        except AssertionError:
            self.report.problems.append(f"workers {paused()} still paused after {after}")

    def logged(self, text: str, before: int, what: str) -> None:
        """Wait for the pool's log to say ``text`` once more than the ``before`` times."""
        try:
            wait_for(lambda: self.log.read_text().count(text) > before, 10, message=what)
        except AssertionError:
            self.report.problems.append(f"not seen within 10 s: {what}")

    def hup_storm(self) -> None:
        """20 HUPs in a second, with USR2 and CONT between them, CONT last."""
        assert self.pool is not None
        reloads = self.log.read_text().count("INFO: HUP: reloading ")
        for n in range(20):
            self.pool.send_signal(signal.SIGHUP)
            self.report.hups += 1
            if n % 4 == 1:
                self.pool.send_signal(signal.SIGUSR2)
                time.sleep(self.random.uniform(0, 0.02))
                self.pool.send_signal(signal.SIGCONT)
                self.report.pauses += 1
            time.sleep(0.05)
        self.logged("INFO: HUP: reloading ", reloads, "the burst's reload")
        self.none_paused("the HUP storm")

    def reload(self) -> None:
        """qless-pool reload, to the process started (a keeper passes it on); its outcome is
        looked at once it has exited (reload_done)."""
        assert self.pool is not None
        self.reloading = subprocess.Popen(
            [SCRIPT, "reload", "--pid", str(self.pool.pid), "--timeout", "30"],
            cwd=self.directory, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip

    def reload_done(self) -> bool:
        """No reload is running (one that has ended is counted, or its failure said)."""
        if self.reloading is None:
            return True
        if self.reloading.poll() is None:
            return False
        output = self.reloading.communicate()[0].strip()
        if self.reloading.returncode == 0:
            self.report.reloads += 1
        else:
            self.report.problems.append(f"reload failed ({self.reloading.returncode}): {output}")
        self.reloading = None
        return True

    def pause(self) -> None:
        assert self.pool is not None
        self.pool.send_signal(signal.SIGUSR2)
        paused = lambda: any("Paused" in title(pid) for pid in self.workers())  # noqa: E731
        try:
            wait_for(paused, 5)
        except AssertionError:
            self.report.problems.append("no worker paused within 5 s of USR2")
        self.pool.send_signal(signal.SIGCONT)
        self.report.pauses += 1
        self.none_paused("USR2, a worker paused, CONT")

    def restart_redis(self) -> None:
        said = self.log.read_text().count("Redis is unavailable")
        self.redis.stop()  # SIGTERM: Redis shuts down; the AOF was fsynced on every write
        self.logged("Redis is unavailable", said, "a worker to meet the outage")
        self.redis.start()
        self.report.redis_restarts += 1
        back = time.monotonic()
        completed = self.client.redis.zcard("ql:completed")
        with contextlib.suppress(AssertionError):
            wait_for(lambda: self.client.redis.zcard("ql:completed") > completed, 20)
            self.report.redis_recovery.append(time.monotonic() - back)

    def wait_for_the_jobs(self) -> None:
        def settled() -> bool:
            states = self.client.redis.eval(
                "local n = 0 for _, jid in ipairs(ARGV) do "
                "local s = redis.call('hget', 'ql:j:' .. jid, 'state') "
                "if s ~= 'complete' and s ~= 'failed' then n = n + 1 end end return n",
                0,
                *self.kinds,
            )
            return states == 0

        with contextlib.suppress(AssertionError):
            wait_for(settled, max(30.0, self.seconds), interval=0.2)

    def stop_pool(self) -> None:
        assert self.pool is not None
        tree = [self.pool.pid, *descendants(self.pool.pid)]
        self.pool.send_signal(signal.SIGQUIT)
        try:
            self.pool.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.report.problems.append("the pool did not stop within 60 s of QUIT")
        with contextlib.suppress(AssertionError):
            wait_for(lambda: not any(alive(pid) for pid in tree), 10)
        self.report.left_running = [pid for pid in tree if alive(pid)]

    # --- accounting -----------------------------------------------------------------------------

    def account(self) -> None:
        report = self.report
        redis = self.client.redis
        runs_of: dict[str, list[dict]] = {}
        for raw in redis.lrange("chaos:log", 0, -1):
            entry = json.loads(raw)
            runs_of.setdefault(entry["jid"], []).append(entry)
        report.runs = sum(len(runs) for runs in runs_of.values())
        hit = self.interrupted_runs(runs_of)
        for jid, kind in self.kinds.items():
            state, failure = redis.hmget(f"ql:j:{jid}", "state", "failure")
            if state is None:
                report.states["vanished"] += 1
                report.problems.append(f"{jid} ({kind}) vanished")
                continue
            report.states[state] += 1
            if state == "running":
                report.problems.append(f"{jid} ({kind}) left running with no owner")
            if state == "failed":
                group = json.loads(failure)["group"]
                report.groups[_kind_of_failure(group)] += 1
                expected = EXPECTED_FAILURE.get(kind)
                explained = group.endswith(("-DirtyExit", "-TimeoutError")) or group.startswith(
                    "failed-retries-"
                )
                # The job body's own Redis call failed while Redis restarted: its exception.
                outage = group.endswith("-ConnectionError") and report.redis_restarts
                # Or qless failed it when its lock expired out of retries (failed-retries): a
                # worker told to stop while Redis was away (a reload's old worker, during the
                # restart) leaves what it holds to expire, as documented.
                expired_in_outage = group.startswith("failed-retries-") and report.redis_restarts
                hit_or_expired = hit[jid] or expired_in_outage
                if group.split("-", 1)[-1] != expected and not (
                    (explained and hit_or_expired) or outage
                ):
                    report.problems.append(f"{jid} ({kind}) failed as {group}")
            counted = int(redis.get(f"chaos:runs:{jid}") or 0)
            expected_runs = next(n for k, _, n in KINDS if k == kind)
            extra = counted - expected_runs
            if extra <= 0:
                continue
            expired = sum(
                '"timed-out"' in entry for entry in redis.lrange(f"ql:j:{jid}-history", 0, -1)
            )
            causes = hit[jid] + expired
            if extra > causes:
                report.problems.append(
                    f"{jid} ({kind}) ran {counted} times; explained: {causes} "
                    f"(runs interrupted by our kills {hit[jid]}, lock expiries {expired}); "
                    f"runs {runs_of.get(jid)}; history "
                    f"{redis.lrange(f'ql:j:{jid}-history', 0, -1)}"
                )
            cause = "a kill of its job child or worker" if hit[jid] else "its lock expired"
            report.duplicates[cause] += extra
        report.worker_recovery = self.worker_recovery_times()

    def interrupted_runs(self, runs_of: dict[str, list[dict]]) -> Counter:
        """How many runs of each jid one of our kills interrupted: its job child was killed, or
        its worker parent while the run was that worker's latest."""
        hit: Counter = Counter()
        by_worker: dict[int, list[dict]] = {}
        for runs in runs_of.values():
            for run in runs:
                # A job child's parent is its worker; a job in process runs in the worker.
                worker = run["ppid"] if self.fork_per_job else run["pid"]
                by_worker.setdefault(worker, []).append(run)
        for what, pid, when in self.kills:
            if what == "child":
                for runs in runs_of.values():
                    hit.update(run["jid"] for run in runs if run["pid"] == pid)
            else:
                # SIGKILL takes effect when the worker is next scheduled, and its job child dies
                # only then (PR_SET_PDEATHSIG): a run that child began just after our kill was
                # sent (and recorded) is interrupted by it too.
                started = [run for run in by_worker.get(pid, []) if run["at"] <= when + 1.0]
                if started:
                    hit[max(started, key=lambda run: run["at"])["jid"]] += 1
        return hit

    def worker_recovery_times(self) -> list[float]:
        """For each worker we killed: from the manager logging its death to the next spawn."""
        stamps = []
        lines = self.log.read_text().splitlines()

        def when(line: str) -> float:
            return (
                time.mktime(time.strptime(line[:19], "%Y-%m-%d %H:%M:%S")) + int(line[20:23]) / 1000
            )

        victims = {pid for what, pid, _ in self.kills if what == "worker"}
        for index, line in enumerate(lines):
            match = re.search(r"worker (\d+) \(\S+\) died: killed by SIGKILL", line)
            if match and int(match.group(1)) in victims:
                spawn = next((later for later in lines[index:] if "spawned worker" in later), None)
                if spawn:
                    stamps.append(when(spawn) - when(line))
        return stamps


def _kind_of_failure(group: str) -> str:
    """``q1-DirtyExit`` -> ``DirtyExit``; ``failed-retries-q1`` (qless: out of retries after
    its lock expired) -> ``failed-retries``."""
    return "failed-retries" if group.startswith("failed-retries-") else group.split("-", 1)[-1]


def run_chaos(
    jobs: int, seconds: float, seed: int | None = None, fork_per_job: bool = True
) -> Report:
    seed = random.randrange(1 << 30) if seed is None else seed
    with tempfile.TemporaryDirectory(prefix="qless-pool-chaos-") as directory:
        report = Chaos(Path(directory), jobs, seconds, seed, fork_per_job).run()
        report_log = Path(directory) / "pool.log"
        if report.problems:
            print(report_log.read_text()[-20000:], file=sys.stderr)
    mode = "a child per job" if fork_per_job else "jobs in process"
    print(f"chaos run ({mode}), seed {seed}:\n{report.table()}")
    for problem in report.problems:
        print(f"PROBLEM: {problem}")
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1200)
    parser.add_argument("--seconds", type=float, default=90.0)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--in-process", action="store_true", help="--no-fork-per-job")
    args = parser.parse_args()
    report = run_chaos(args.jobs, args.seconds, args.seed, not args.in_process)
    return 1 if report.problems or report.lost or report.left_running else 0


if __name__ == "__main__":
    sys.exit(main())
