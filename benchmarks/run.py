"""Benchmark qless-pool against its peers, side by side, in one run.

    python benchmarks/run.py                      # everything (invoke bench), ~20 minutes
    python benchmarks/run.py --quick              # everything, smaller (invoke bench --quick)
    python benchmarks/run.py --scenario throughput --contenders qless-pool-fork,rq-fork --workers 2
    python benchmarks/run.py --list               # the scenarios and their contenders

Each scenario starts its own redis-server, runs every contender in turn (interleaved rounds),
and the results (the machine, the versions, every repetition) go to a JSON file: a full run
writes benchmarks/results.json and rewrites the generated part of docs/BENCHMARKS.md and its
plots; any other run writes benchmarks/results-last.json and changes no docs unless --docs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from typing import Any, Optional

import report
import scenarios
from contenders import CONTENDERS
from harness import (
    ROOT,
    Processes,
    RedisServer,
    become_subreaper,
    log,
    machine,
    redis_server_binary,
)

SCENARIOS = [
    "throughput", "throughput-quiet", "cpu", "pickup", "startup", "memory", "respawn", "hup",
    "reload", "idle", "fork",
]  # fmt: skip

#: Who runs in each scenario unless --contenders says otherwise.
DEFAULT_CONTENDERS = {
    "throughput": [
        "qless-pool-fork",
        "qless-pool-inproc",
        "qless-py-worker",
        "reqless-py-worker",
        "rq-fork",
        "rq-simple",
        "floor",
        "floor-batch",
        "floor-fork",
    ],
    # The same with jobs that make no Redis command of their own (the in-process target).
    "throughput-quiet": [
        "qless-pool-inproc",
        "qless-py-worker",
        "reqless-py-worker",
        "floor",
        "floor-batch",
    ],
    "cpu": [
        "qless-pool-fork",
        "floor-fork",
        "rq-fork",
        "qless-pool-inproc",
        "qless-py-worker",
        "floor",
        "floor-batch",
    ],
    "pickup": [
        "qless-pool-fork",
        "qless-pool-inproc",
        "qless-py-worker",
        "reqless-py-worker",
        "rq-fork",
        "rq-simple",
        "floor-listen",
        "floor-listen-fork",
    ],
    "startup": [
        "qless-pool-fork",
        "qless-pool-independent",
        "qless-py-worker",
        "reqless-py-worker",
        "rq-fork",
    ],
    "memory": [
        "qless-pool-fork",
        "qless-pool-inproc",
        "qless-pool-fork-nofreeze",
        "qless-pool-inproc-nofreeze",
        "qless-pool-fork-nopreload",
        "qless-py-worker",
        "reqless-py-worker",
        "rq-fork",
        "rq-simple",
    ],
    "respawn": ["qless-pool-fork", "qless-py-worker", "reqless-py-worker", "rq-fork"],
    "hup": ["qless-pool-fork", "qless-pool-inproc"],
    "reload": ["qless-pool-fork"],
    "idle": [
        "qless-pool-fork",
        "qless-pool-inproc",
        "qless-py-worker",
        "reqless-py-worker",
        "rq-fork",
        "rq-simple",
    ],
    "fork": [],
}

#: The sizes of each mode. --rounds, --jobs, --workers and --puts override them.
PRESETS: dict[str, dict[str, Any]] = {
    "full": {
        "rounds": 3,
        "jobs": 5000,
        # A run ends when its 5,000 jobs are done or 6 s after its first job started: the
        # contenders that fork per job would take 20-80 s for 5,000, and a rate needs a steady
        # window, not a count. Keeps the full run near 20 minutes.
        "max_window": 6.0,
        "floor_iterations": 500,
        "workers": [1, 2, 4, 8],
        # CPU per job, one worker: N jobs by where a contender runs them (about 10 s each).
        "cpu_jobs": {"child": 1500, "worker": 10000},
        "cpu_rounds": 3,
        "puts": 300,
        "pickup_workers": 2,
        "gap_ms": (10.0, 40.0),
        "intervals": ["default", "1"],
        # 300 puts per contender and interval are enough for p99; the default-interval runs of
        # qless-py-worker and reqless-py-worker take a minute each (they sleep 60 s).
        "pickup_rounds": 1,
        "skip_slow_default": False,
        "startup_workers": 8,
        "import_cost": 1.0,
        "startup_rounds": 3,
        "memory_workers": 8,
        "ballast_mb": 200,
        "jobs_per_worker": 50,
        # The memory figures repeat to within 0.5% from round to round: one round.
        "memory_rounds": 1,
        "respawn_workers": 8,
        "kills": 10,
        "respawn_rounds": 2,
        "min_age": 5.5,
        "hup_counts": (4, 8),
        "hup_reps": 6,
        "hup_rounds": 2,
        # qless-pool reload beside a stop and a start, on a stream of a job every 20 ms.
        "reload_workers": 4,
        "reload_import_cost": 2.0,
        "reload_gap_ms": 20.0,
        "reload_rounds": 2,
        "idle_workers": 8,
        "idle_seconds": 60.0,
        "fork_iterations": 1000,
        "fork_rounds": 3,
    },
    "quick": {
        "rounds": 1,
        "jobs": 1000,
        "max_window": 3.0,
        "floor_iterations": 200,
        "workers": [2],
        "cpu_jobs": {"child": 300, "worker": 2000},
        "cpu_rounds": 1,
        "puts": 25,
        "pickup_workers": 2,
        "gap_ms": (20.0, 60.0),
        "intervals": ["default", "1"],
        "pickup_rounds": 1,
        "skip_slow_default": True,
        "startup_workers": 8,
        "import_cost": 0.5,
        "startup_rounds": 1,
        "memory_workers": 4,
        "ballast_mb": 30,
        "jobs_per_worker": 10,
        "memory_rounds": 1,
        "respawn_workers": 4,
        "kills": 3,
        "respawn_rounds": 1,
        "min_age": 5.5,
        "hup_counts": (2, 4),
        "hup_reps": 2,
        "hup_rounds": 1,
        "reload_workers": 4,
        "reload_import_cost": 1.0,
        "reload_gap_ms": 20.0,
        "reload_rounds": 1,
        "idle_workers": 8,
        "idle_seconds": 5.0,
        "fork_iterations": 300,
        "fork_rounds": 1,
    },
    # The CI smoke test: every script runs, nothing is measured in earnest.
    "tiny": {
        "rounds": 1,
        "jobs": 50,
        "max_window": None,
        "floor_iterations": 20,
        "workers": [1],
        # In process the completes come in batches of up to 32 (the pool's and floor-batch's
        # pops): the window between the two readings must span several, or both readings may
        # fall after the last batch and count no job at all.
        "cpu_jobs": {"child": 20, "worker": 400},
        "cpu_rounds": 1,
        "puts": 3,
        "pickup_workers": 1,
        "gap_ms": (5.0, 10.0),
        "intervals": ["1"],
        "pickup_rounds": 1,
        "skip_slow_default": True,
        "startup_workers": 2,
        "import_cost": 0.05,
        "startup_rounds": 1,
        "memory_workers": 2,
        "ballast_mb": 5,
        "jobs_per_worker": 2,
        "memory_rounds": 1,
        "respawn_workers": 2,
        "kills": 1,
        "respawn_rounds": 1,
        "min_age": 0.0,
        "hup_counts": (1, 2),
        "hup_reps": 1,
        "hup_rounds": 1,
        "reload_workers": 2,
        "reload_import_cost": 0.05,
        "reload_gap_ms": 50.0,
        "reload_rounds": 1,
        "idle_workers": 2,
        "idle_seconds": 1.0,
        "fork_iterations": 20,
        "fork_rounds": 1,
    },
}


def applicable(scenario: str, name: str) -> bool:
    contender = CONTENDERS[name]
    if scenario in ("throughput", "cpu"):
        return True
    if scenario == "throughput-quiet":
        return contender.family in ("qless", "reqless")
    if scenario == "fork":
        return False
    if scenario == "hup":
        return name.startswith("qless-pool") and name != "qless-pool-independent"
    if scenario == "reload":
        return name in ("qless-pool-fork", "qless-pool-inproc")
    return contender.ready is not None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="benchmarks/run.py",
        description="Benchmark qless-pool against its peers, side by side, in one run.",
    )
    parser.add_argument("--quick", action="store_true", help="every scenario, small (< 2 min)")
    parser.add_argument(
        "--tiny", action="store_true", help="every scenario, tiny numbers (the CI smoke test)"
    )
    parser.add_argument(
        "--scenario",
        help=f"comma-separated, of: {', '.join(SCENARIOS)} (default: all)",
    )
    parser.add_argument("--contenders", help="comma-separated contender names (see --list)")
    parser.add_argument("--workers", help="throughput worker counts, comma-separated")
    parser.add_argument("--jobs", type=int, help="throughput jobs per run")
    parser.add_argument("--puts", type=int, help="pickup puts per run")
    parser.add_argument("--rounds", type=int, help="rounds (repetitions) of every scenario")
    parser.add_argument("--out", help="the results file")
    parser.add_argument(
        "--docs",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="rewrite docs/BENCHMARKS.md's tables and plots (default: only for a full run)",
    )
    parser.add_argument("--seed", type=int, default=1, help="seed of the pickup gaps")
    parser.add_argument("--keep", action="store_true", help="keep the run's temp directory")
    parser.add_argument("--list", action="store_true", help="list scenarios and contenders")
    return parser


def plan(
    args: argparse.Namespace,
) -> tuple[str, dict[str, Any], dict[str, list[str]], list[str]]:
    """The mode, its sizes, the contenders of each scenario, and those not installed."""
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    params = dict(PRESETS[mode])
    if args.rounds:
        for key in list(params):
            if key == "rounds" or key.endswith("_rounds"):
                params[key] = args.rounds
    if args.jobs:
        params["jobs"] = args.jobs
    if args.workers:
        params["workers"] = [int(w) for w in args.workers.split(",")]
    if args.puts:
        params["puts"] = args.puts
    chosen = args.scenario.split(",") if args.scenario else list(SCENARIOS)
    unknown = [s for s in chosen if s not in SCENARIOS]
    if unknown:
        raise SystemExit(f"unknown scenario(s): {', '.join(unknown)}; choose from {SCENARIOS}")
    wanted = args.contenders.split(",") if args.contenders else None
    if wanted:
        unknown = [c for c in wanted if c not in CONTENDERS]
        if unknown:
            raise SystemExit(f"unknown contender(s): {', '.join(unknown)}; see --list")
    selected: dict[str, list[str]] = {}
    unavailable: set[str] = set()
    for scenario in chosen:
        if wanted is None:
            names = list(DEFAULT_CONTENDERS[scenario])
        else:
            names = [c for c in wanted if applicable(scenario, c)]
            if not names and scenario != "fork":
                continue
        selected[scenario] = [c for c in names if CONTENDERS[c].available()]
        unavailable |= {c for c in names if not CONTENDERS[c].available()}
    if not selected:
        raise SystemExit("nothing to run: no chosen scenario applies to those contenders")
    return mode, params, selected, sorted(unavailable)


def print_list() -> None:
    print("Scenarios and their contenders (default ones first, * = default):\n")
    for scenario in SCENARIOS:
        names = [f"*{n}" for n in DEFAULT_CONTENDERS[scenario]] + [
            n
            for n in CONTENDERS
            if applicable(scenario, n) and n not in DEFAULT_CONTENDERS[scenario]
        ]
        print(f"  {scenario:<11} {', '.join(names) or '(no contenders: a bare fork loop)'}")
    print("\nContenders:\n")
    for contender in CONTENDERS.values():
        print(f"  {contender.name:<28} {contender.summary}")


def run_scenario(
    scenario: str,
    ctx: scenarios.Context,
    names: list[str],
    p: dict[str, Any],
    redis_binary: str,
) -> dict[str, Any]:
    if scenario == "throughput":
        both_modes = {"qless-pool-fork", "qless-pool-inproc"} <= set(names)
        return scenarios.throughput(
            ctx,
            names,
            p["jobs"],
            p["workers"],
            p["rounds"],
            p["max_window"],
            p["floor_iterations"] if both_modes else 0,
        )
    if scenario == "throughput-quiet":
        return scenarios.throughput(
            ctx, names, p["jobs"], p["workers"], p["rounds"], p["max_window"], kind="quiet"
        )
    if scenario == "cpu":
        return scenarios.cpu_per_job(
            ctx, names, p["cpu_jobs"], p["cpu_rounds"], p["floor_iterations"]
        )
    if scenario == "pickup":
        return scenarios.pickup(
            ctx,
            names,
            p["puts"],
            p["pickup_workers"],
            p["intervals"],
            p["gap_ms"],
            p["pickup_rounds"],
            p["skip_slow_default"],
        )
    if scenario == "startup":
        return scenarios.startup(
            ctx, names, p["startup_workers"], p["import_cost"], p["startup_rounds"]
        )
    if scenario == "memory":
        return scenarios.memory(
            ctx,
            names,
            p["memory_workers"],
            p["ballast_mb"],
            p["jobs_per_worker"],
            p["memory_rounds"],
        )
    if scenario == "respawn":
        return scenarios.respawn(
            ctx, names, p["respawn_workers"], p["kills"], p["respawn_rounds"], p["min_age"]
        )
    if scenario == "hup":
        return scenarios.hup(ctx, names, p["hup_counts"], p["hup_reps"], p["hup_rounds"])
    if scenario == "reload":
        return scenarios.reload(
            ctx, names, p["reload_workers"], p["reload_import_cost"], p["reload_gap_ms"],
            p["reload_rounds"],
        )  # fmt: skip
    if scenario == "idle":
        return scenarios.idle_cpu(ctx, names, p["idle_workers"], p["idle_seconds"], redis_binary)
    if scenario == "fork":
        return scenarios.fork_floor(ctx, p["fork_iterations"], p["fork_rounds"])
    raise ValueError(scenario)


def _stop_on_term(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.list:
        print_list()
        return 0
    mode, params, selected, missing = plan(args)
    customised = any(
        [args.scenario, args.contenders, args.workers, args.jobs, args.puts, args.rounds]
    )
    full = mode == "full" and not customised
    last = str(ROOT / "benchmarks" / "results-last.json")
    out = args.out or (str(ROOT / "benchmarks" / "results.json") if full else last)
    # Progress goes to the file of the last run; a full run's results.json (the committed one)
    # is only replaced once the run is complete.
    progress = last if out != last and not args.out else out
    docs = full if args.docs is None else args.docs

    signal.signal(signal.SIGTERM, _stop_on_term)
    become_subreaper()
    binary = redis_server_binary()
    started = time.time()
    results: dict[str, Any] = {
        "schema": "qless-pool-bench/1",
        "mode": mode if not customised else f"{mode}, customised",
        "command": " ".join(["benchmarks/run.py", *(argv if argv is not None else sys.argv[1:])]),
        "started_at": datetime.datetime.fromtimestamp(started, datetime.timezone.utc).isoformat(
            timespec="seconds"
        ),
        "complete": False,
        "machine": machine(binary),
        "params": {k: list(v) if isinstance(v, tuple) else v for k, v in params.items()},
        "contenders": {
            name: CONTENDERS[name].summary for names in selected.values() for name in names
        },
        "scenarios": {},
    }
    log(
        f"qless-pool benchmarks ({results['mode']}): "
        + "; ".join(f"{s}: {', '.join(n) or '-'}" for s, n in selected.items())
    )
    if missing:
        results["unavailable"] = {n: f"{CONTENDERS[n].requires} is not installed" for n in missing}
        log(f"not run, not installed (pip install -e '.[bench]'): {', '.join(missing)}")
    log(f"redis-server {results['machine']['redis_server']} ({binary}); results -> {out}")
    directory = tempfile.mkdtemp(prefix="qless-pool-bench-")
    processes = Processes(directory)
    try:
        for scenario, names in selected.items():
            began = time.time()
            log(f"{scenario}:")
            # A redis-server of its own for each scenario (flushed before every run in it).
            with RedisServer(binary) as server:
                ctx = scenarios.Context(server, processes, seed=args.seed)
                data = run_scenario(scenario, ctx, names, params, binary)
            data["duration_s"] = time.time() - began
            results["scenarios"][scenario] = data
            _write(progress, results, started)
        results["complete"] = True
    finally:
        processes.stop_all()
        if args.keep:
            log(f"kept {directory}")
        else:
            shutil.rmtree(directory, ignore_errors=True)
        _write(progress, results, started)
    summary = report.summarize_results(results)
    results["summary"] = summary
    _write(progress, results, started)
    if progress != out:
        _write(out, results, started)
    print()
    print(report.markdown(results, summary))
    if docs:
        report.write_docs(results, summary)
        log(f"updated {os.path.relpath(report.DOC)} and its plots")
    errors = sum(1 for s in results["scenarios"].values() for r in s["runs"] if "error" in r)
    log(f"done in {(time.time() - started) / 60:.1f} min; {errors} failed run(s); results in {out}")
    return 1 if errors else 0


def _write(path: str, results: dict[str, Any], started: float) -> None:
    results["duration_s"] = time.time() - started
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temporary = f"{path}.tmp"
    with open(temporary, "w") as file:
        json.dump(results, file, indent=1, sort_keys=False)
        file.write("\n")
    os.replace(temporary, path)


if __name__ == "__main__":
    sys.exit(main())
