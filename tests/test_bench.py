"""The benchmark harness keeps working: ``invoke bench --quick --tiny`` runs every scenario with
every installed contender on tiny numbers and writes a well-formed results file.

Nothing here asserts a timing: the numbers of a tiny run on a busy CI machine mean nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
INVOKE = os.path.join(os.path.dirname(sys.executable), "invoke")
SCENARIOS = {
    "throughput",
    "throughput-quiet",
    "cpu",
    "pickup",
    "startup",
    "memory",
    "respawn",
    "hup",
    "reload",
    "idle",
    "fork",
}


def processes_under(directory: Path) -> list[int]:
    root = os.path.realpath(directory)
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cwd = os.readlink(f"/proc/{entry}/cwd")
            except OSError:
                continue
            if cwd == root or cwd.startswith(root + os.sep):
                found.append(int(entry))
    return found


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_invoke_bench_tiny_runs_every_scenario_and_writes_the_results(tmp_path):
    out = tmp_path / "results.json"
    doc = ROOT / "docs" / "BENCHMARKS.md"
    doc_before = doc.read_bytes() if doc.exists() else None
    # The harness's temp directories (and so every process it starts) land in this one; a
    # short path, for redis-server's unix socket.
    scratch = Path(tempfile.mkdtemp(prefix="qpb-"))
    try:
        completed = subprocess.run(
            [INVOKE, "bench", "--quick", "--tiny", "--out", str(out)],
            cwd=ROOT,
            env={**os.environ, "TMPDIR": str(scratch)},
            capture_output=True,
            text=True,
            timeout=170,
        )
        left_running = processes_under(scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert "### Targets of the speed work" in completed.stdout

    results = json.loads(out.read_text())
    assert results["schema"] == "qless-pool-bench/1"
    assert results["complete"] is True
    assert set(results["scenarios"]) == SCENARIOS
    machine = results["machine"]
    for key in ("cpu_model", "cores", "kernel", "python", "redis_server", "packages"):
        assert machine[key], key
    for name, scenario in results["scenarios"].items():
        assert scenario["params"], name
        assert scenario["runs"], name
        for run in scenario["runs"]:
            assert "error" not in run, (name, run.get("contender"), run.get("log_tail"))
    ran = {run["contender"] for run in results["scenarios"]["throughput"]["runs"]}
    unavailable = set(results.get("unavailable", {}))
    expected = {"qless-pool-fork", "qless-pool-inproc", "qless-py-worker", "floor", "floor-fork",
                "floor-batch"}  # fmt: skip
    expected |= {"rq-fork", "rq-simple", "reqless-py-worker"} - unavailable
    assert ran == expected
    for scenario in ("throughput", "throughput-quiet"):
        runs = results["scenarios"][scenario]["runs"]
        assert all(run["jobs"] == results["params"]["jobs"] for run in runs), scenario
    quiet = {run["contender"] for run in results["scenarios"]["throughput-quiet"]["runs"]}
    assert quiet == {"qless-pool-inproc", "qless-py-worker", "floor", "floor-batch"} | (
        {"reqless-py-worker"} - unavailable
    )
    cpu = results["scenarios"]["cpu"]["runs"]
    assert {run["contender"] for run in cpu} == {
        "qless-pool-fork", "floor-fork", "qless-pool-inproc", "qless-py-worker", "floor",
        "floor-batch",
    } | ({"rq-fork"} - unavailable)  # fmt: skip
    # (CPU is read in clock ticks of 10 ms: a tiny run's reading may be 0.)
    assert all(run["jobs"] > 0 and run["total_ms"] >= run["redis_ms"] >= 0 for run in cpu)
    summary = results["summary"]
    measured = {row["target"]: row for row in summary["targets"] if row["measured"]}
    assert set(measured) >= {
        "fork per job: CPU a job (all processes and Redis) vs fork + a command on a new "
        "connection + exit + wait",
        "in process vs qless-py-worker, jobs without",
        "in process vs qless-py-worker, jobs with a Redis command",
        "private memory per idle worker (with its standby), qless-pool-fork",
    }
    # Beside each in-process ratio: the floor with batching, the same ratio for it.
    for target in ("in process vs qless-py-worker, jobs without",
                   "in process vs qless-py-worker, jobs with a Redis command"):  # fmt: skip
        assert "; floor-batch " in measured[target]["measured"], target
        limits = measured[target]["limit"]["floor-batch"]
        assert {int(w) for w in limits} == set(results["params"]["workers"])

    # A run that is not the full one leaves the committed docs alone, and nothing running.
    assert (doc.read_bytes() if doc.exists() else None) == doc_before
    assert left_running == []


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    "args",
    [
        ["profile_worker.py", "qless-pool-inproc"],
        ["profile_worker.py", "qless-py-worker"],
        ["profile_worker.py", "qless-pool-fork", "--timeline"],
        ["profile_worker.py", "qless-pool-fork", "--child-profile"],
        ["profile_worker.py", "qless-pool-fork", "--cpu"],
        ["profile_worker.py", "floor-fork", "--cpu"],
        ["cow_pages.py", "--ballast-mb", "5", "--children", "1"],
    ],
    ids=lambda args: " ".join(args),
)
def test_the_profiling_tools_of_benchmarks_md_run(args):
    """docs/BENCHMARKS.md's profiling commands, with 50 jobs: they run and print a report."""
    extra = ["--jobs", "50"] if args[0] == "profile_worker.py" else []
    completed = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / args[0]), *args[1:], *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=170,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert completed.stdout.strip()


def test_each_pickup_target_shows_the_floor_of_its_run_mode_beside_it():
    # (A tiny run measures pickup at a 1 s interval only, where the floors, which do not poll,
    # do not run: so the report is given a summary here.)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import report
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))

    def measured(p50, p95):
        return {"default": {"p50_ms": p50, "p95_ms": p95}}

    rows = report.targets({"pickup": {
        "qless-pool-inproc": measured(1.9, 2.5), "floor-listen": measured(1.8, 3.0),
        "qless-pool-fork": measured(2.8, 4.0), "floor-listen-fork": measured(2.7, 4.5),
    }})  # fmt: skip
    pickup = {row["target"]: row for row in rows if row["target"].startswith("pickup")}
    inproc = pickup["pickup, idle pool, default interval, qless-pool-inproc"]
    assert inproc["measured"] == "p50 1.90 ms, p95 2.50 ms; floor-listen p50 1.80, p95 3.00"
    assert inproc["met"] is True
    assert inproc["limit"] == {"floor-listen": {"p50_ms": 1.8, "p95_ms": 3.0}}
    fork = pickup["pickup, idle pool, default interval, qless-pool-fork"]
    assert fork["met"] is False
    assert fork["limit"] == {"floor-listen-fork": {"p50_ms": 2.7, "p95_ms": 4.5}}
    # Without its floor in the run, a target stands alone.
    alone = report.targets({"pickup": {"qless-pool-inproc": measured(1.9, 2.5)}})
    row = next(r for r in alone if r["target"].endswith("qless-pool-inproc"))
    assert row["measured"] == "p50 1.90 ms, p95 2.50 ms" and "limit" not in row


def test_a_pss_ratio_within_what_the_figures_repeat_to_is_no_worse_than_rqs():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import report
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))

    def memory(ratio):
        return {"pss_over_manager_rss": {"median": ratio}, "total_pss_mb": {"median": 311.0},
                "manager_rss_mb": {"median": 237.5}, "private_per_worker_mb": 6.1}  # fmt: skip

    def pss_row(ours, rq):
        rows = report.targets({"memory": {"qless-pool-fork": memory(ours), "rq-fork": memory(rq)}})
        return next(
            r for r in rows if r["target"] == "total PSS vs the manager's RSS, qless-pool-fork"
        )

    # 2026-12-03's run: 1.30879 against 1.30874, 12 KB apart in 311 MB.
    tie = pss_row(1.30879, 1.30874)
    assert tie["met"] is True
    assert tie["measured"] == "1.309x (311 MB vs 238 MB); rq-fork 1.309x"
    assert pss_row(1.30, 1.35)["met"] is True
    assert pss_row(1.32, 1.30)["met"] is False  # 1.5% worse: a difference measured
