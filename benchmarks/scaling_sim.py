"""The range rule in a model: worker-minutes and waits over a day and over a burst.

    python benchmarks/scaling_sim.py [--plot docs/scaling-simulation.png]

A small simulation beside the tests (docs/SCALING.md quotes it): jobs arrive (Poisson) at a
rate that follows a curve, each runs for a random time (exponential, mean SERVICE seconds), and
a pool runs them first come, first served. Three pools take the same arrivals:

    range    the pool's own rule (qless_pool.pool.scaling.Scaler, with the default options:
             a look every 1 s, up one worker a look while the next job has waited over 1 s,
             one idle worker retired every 30 s without a waiting job); a new worker is ready
             STARTUP seconds after the decision, and a worker retires only when idle
    range-fast  the same rule, tuned for latency: --scale-interval 0.5 --scale-up-after 0.5
             --scale-step 2
    peak     a fixed pool sized for the peak (the peak's load at 85% busy)
    mean     a fixed pool sized for the day's mean load (at 85% busy)

Two curves: a day (a quiet night, a morning ramp, a midday peak), and an hour with a burst (a
steady trickle, then 3,000 jobs at once). For each pool: worker-minutes, the worst wait and the
99th percentile. The goal: the range within 10% of the peak-sized pool's worst wait at under 60%
of its worker-minutes. Deterministic (a fixed seed).
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import random
from collections import deque
from collections.abc import Callable
from pathlib import Path

from qless_pool.config import Range
from qless_pool.pool.scaling import Scaler, ScaleSettings

HERE = Path(__file__).resolve().parent
SERVICE = 0.25  # seconds, the mean run time of a job
STARTUP = 0.3  # seconds from the decision to a new worker taking jobs (fork, connect)
STEP = 0.05  # the simulation's time step
BUSY = 0.85  # the fixed pools are sized for this share of their time busy


def day(t: float) -> float:
    """Jobs a second over a day: 2 at night, a ramp from 6 h, a peak of 40 at 12 h."""
    hour = t / 3600.0
    if hour < 6 or hour > 22:
        return 2.0
    return 2.0 + 38.0 * math.sin(math.pi * (hour - 6) / 16) ** 2


def burst(t: float) -> float:
    """An hour at 4 jobs a second, with 3,000 more in the second after 20 minutes."""
    return 4.0 + (3000.0 if 1200 <= t < 1201 else 0.0)


SETTINGS = {
    "range": ScaleSettings(),  # the defaults: a look every 1 s, up after 1 s, a step of 1
    "range-fast": ScaleSettings(interval=0.5, up_after=0.5, step=2),
}
POLICIES = ("range", "range-fast", "peak", "mean")

CURVES: dict[str, tuple[Callable[[float], float], float, float]] = {
    # name: (rate, length in seconds, the peak's rate the "peak" pool is sized for)
    "day": (day, 86400.0, 40.0),
    "burst": (burst, 3600.0, 40.0),
}


class Pool:
    def __init__(self, workers: int):
        self.idle = workers
        self.busy: list[float] = []  # when each busy worker frees up (a heap)
        self.starting: list[float] = []  # when each new worker is ready (a heap)
        self.retiring = 0

    @property
    def size(self) -> int:
        return self.idle + len(self.busy) + len(self.starting)

    def tick(self, now: float) -> None:
        while self.busy and self.busy[0] <= now:
            heapq.heappop(self.busy)
            self.idle += 1
        while self.starting and self.starting[0] <= now:
            heapq.heappop(self.starting)
            self.idle += 1

    def start(self, now: float, service: float) -> None:
        self.idle -= 1
        heapq.heappush(self.busy, now + service)


def simulate(curve: str, policy: str, seed: int = 7) -> dict:
    rate, length, peak = CURVES[curve]
    rng = random.Random(seed)
    mean_rate = sum(rate(t) for t in range(int(length))) / length
    peak_size = math.ceil(peak * SERVICE / BUSY)
    mean_size = math.ceil(mean_rate * SERVICE / BUSY)
    scaler = None
    if policy.startswith("range"):
        scaler = Scaler(SETTINGS[policy])
        low = max(1, math.ceil(rate(0) * SERVICE / BUSY))
        scaler.configure({("q",): Range(low, peak_size)})
        pool = Pool(low)
    else:
        pool = Pool(peak_size if policy == "peak" else mean_size)
    waiting: deque[float] = deque()
    waits: list[float] = []
    worker_seconds = 0.0
    next_look = 1.0
    trace = []  # (time, workers, the next job's wait) every minute
    steps = int(length / STEP)
    for index in range(steps):
        now = index * STEP
        for _ in range(_poisson(rng, rate(now) * STEP)):
            waiting.append(now + rng.random() * STEP)
        pool.tick(now)
        while pool.idle and waiting and waiting[0] <= now:
            waits.append(now - waiting.popleft())
            pool.start(now, rng.expovariate(1.0 / SERVICE))
        worker_seconds += pool.size * STEP
        if scaler is not None and now >= next_look:
            next_look += scaler.settings.interval
            _look(scaler, pool, waiting, now)
        if index % int(60 / STEP) == 0:
            trace.append((now, pool.size, now - waiting[0] if waiting else 0.0))
    waits.sort()
    return {
        "curve": curve,
        "policy": policy,
        "worker_minutes": worker_seconds / 60.0,
        "worst_wait": waits[-1] if waits else 0.0,
        "p99_wait": waits[int(len(waits) * 0.99)] if waits else 0.0,
        "jobs": len(waits),
        "trace": trace,
    }


def _look(scaler: Scaler, pool: Pool, waiting: deque[float], now: float) -> None:
    """One look of the sampler, and the manager acting on it."""
    wait = now - waiting[0] if waiting and waiting[0] <= now else None
    before = scaler.wanted()[("q",)]
    for decision in scaler.observe({("q",): wait}, 0, now):
        if decision.action == "down" and pool.idle:  # an idle worker retires; a busy one would not
            pool.idle -= 1
            scaler.retired(("q",), now)
    for _ in range(scaler.wanted()[("q",)] - before):
        heapq.heappush(pool.starting, now + STARTUP)


def _poisson(rng: random.Random, mean: float) -> int:
    if mean > 50:  # the burst's second: close enough, and fast
        return max(0, round(rng.gauss(mean, math.sqrt(mean))))
    limit, count, product = math.exp(-mean), 0, rng.random()
    while product > limit:
        count += 1
        product *= rng.random()
    return count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plot", help="write the day's plot (PNG) here")
    args = parser.parse_args()
    results = []
    for curve in CURVES:
        for policy in POLICIES:
            result = simulate(curve, policy)
            results.append(result)
        peak = results[-2]
        for result in results[-len(POLICIES) :]:
            print(
                f"{curve:6} {result['policy']:10} worker-minutes {result['worker_minutes']:9,.0f} "
                f"({result['worker_minutes'] / peak['worker_minutes']:5.0%} of peak)  worst wait "
                f"{result['worst_wait']:7.1f} s  p99 {result['p99_wait']:6.2f} s"
            )
    summary = [{k: v for k, v in r.items() if k != "trace"} for r in results]
    (HERE / "scaling-results.json").write_text(json.dumps(summary, indent=2) + "\n")
    if args.plot:
        _plot(results, args.plot)
    return 0


def _plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for axis, curve in zip(axes, CURVES):
        rate, length, _ = CURVES[curve]
        hours = curve == "day"
        scale = 3600.0 if hours else 60.0
        for result in results:
            if result["curve"] != curve:
                continue
            times = [t / scale for t, _, _ in result["trace"]]
            axis.step(times, [n for _, n, _ in result["trace"]], where="post",
                      label=f"{result['policy']} pool: workers")  # fmt: skip
        load = [rate(t) * SERVICE for t in range(0, int(length), 60)]
        axis.plot([t / scale for t in range(0, int(length), 60)], load, "k:",
                  label="load (busy workers needed)")  # fmt: skip
        axis.set_xlabel("hour of the day" if hours else "minute")
        axis.set_ylabel("workers")
        axis.set_ylim(0, 16)
        axis.set_title("A day" if hours else "An hour with a burst of 3,000 jobs")
    axes[0].legend(fontsize=8, loc="upper left")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
