"""``qless-pool status``: what a running pool is doing, as text, JSON or a health check.

    qless-pool status [-p PIDFILE | --pid PID] [--json] [--watch [SECONDS]] [--check] [-R URL]

The pool is found by its pidfile (default: the daemon's, tmp/pids/qless-pool.pid), its
manager's pid, or as the pool started in this directory (finding.py); what it does comes from
the files it keeps for this (state.py), its workers' memory from /proc, and its queues' counts
from Redis, read by this command itself (the manager never talks to Redis). ``--check`` reads
no Redis at all.

Exit status: 0; with ``--check``, 0 when the pool is healthy, 1 when it is not (see health():
a group short of workers, workers in respawn backoff or cut off from Redis, the pool stopping),
3 when no pool is running (a stale or missing pidfile). 1 too, with or without ``--check``,
when the manager is alive but its state cannot be read. 2 for a bad option.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any, Optional

from ..urls import DEFAULT_REDIS_URL, URL_VARIABLES, mask_secrets
from .daemon import DEFAULT_PIDFILE
from .finding import ManyPools, NoPool, find_manager, find_pool
from .state import (
    configured_queues,
    pool_directory,
    read_manager,
    read_worker,
    rss_bytes,
    worker_state,
)

__all__ = ["EX_NO_POOL", "collect", "main", "render"]

EX_USAGE = 2
EX_NO_POOL = 3
QUEUE_COLUMNS = ("waiting", "running", "scheduled", "stalled", "depends", "recurring")


class NoState(Exception):
    """The manager is running, but the state it keeps cannot be read."""


def _watch_interval(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not 0.1 <= seconds <= 3600:  # (NaN is no number of seconds either)
        raise argparse.ArgumentTypeError(f"seconds from 0.1 to 3,600: {text!r}")
    return seconds


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qless-pool status",
        description="Show what a running pool is doing: its manager, groups, workers and queues.",
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "-p",
        "--pidfile",
        metavar="FILE",
        help=f"the pool's pidfile (default: {DEFAULT_PIDFILE}, else the pool started in this "
        "directory)",
    )
    where.add_argument("--pid", type=int, metavar="PID", help="the manager's pid")
    parser.add_argument(
        "--json", action="store_true", help="one JSON object (see docs/operations.md)"
    )
    parser.add_argument(
        "--watch",
        nargs="?",
        const=2.0,
        type=_watch_interval,
        metavar="SECONDS",
        help="refresh in place every SECONDS (default 2) until Ctrl-C",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="no output; exit 0 if healthy, 1 if not (short of workers, workers in respawn "
        "backoff, workers that cannot reach Redis, stopping, its state unreadable), 3 if no "
        "pool",
    )
    parser.add_argument(
        "-R", "--redis", metavar="URL", help="qless's Redis (default: the pool's own)"
    )
    return parser


def collect(pid: int, redis_url: Optional[str] = None, queues: bool = True) -> dict[str, Any]:
    """Everything about the pool whose manager is ``pid``, as one JSON-ready dict."""
    try:
        uid = os.stat(f"/proc/{pid}").st_uid
    except OSError:
        uid = os.getuid()
    directory = pool_directory(pid, uid)
    manager = read_manager(directory)
    if manager is None:
        raise NoState(
            f"pool {pid} is running, but its state is not in {directory}: removed under it (the "
            "manager makes it again within a second, if it can), or $QLESS_POOL_RUNTIME_DIR "
            "is not the pool's"
        )
    now = time.time()
    workers = []
    for entry in manager.get("workers", []):
        record = read_worker(os.path.join(directory, f"worker-{entry['pid']}")) or {}
        job = record.get("job")
        if job and record.get("state") == "processing":
            job = {**job, "running_for": round(now - job["started"], 3)}
        else:
            job = None
        uptime = now - entry["started"]
        state = worker_state(record, entry["started"], now)
        workers.append(
            {
                "pid": entry["pid"],
                "queues": entry["queues"],
                "state": "retiring" if entry.get("retiring") else state,
                "retiring": bool(entry.get("retiring")),
                "uptime": round(uptime, 1),
                "job": job,
                "jobs_done": record.get("jobs_done", 0),
                "rss_bytes": rss_bytes(entry["pid"]),
                "job_child": record.get("job_child"),
                "standby": record.get("standby"),
                "held": record.get("held", 0),
                "redis_down_since": record.get("redis_down_since"),
                "redis_error": record.get("redis_error"),
            }
        )
    groups = [
        {
            "queues": group["queues"],
            "desired": group["desired"],
            "live": group["live"],
            "backoff_until": group["backoff_until"],
            **_range_of(group),
        }
        for group in manager.get("groups", [])
    ]
    problems, warnings = health(manager, groups, workers, now)
    snapshot: dict[str, Any] = {
        "manager": {
            "pid": pid,
            "started": manager["started"],
            "uptime": round(now - manager["started"], 1),
            "appname": manager.get("appname"),
            "config": manager.get("config"),
            "environment": manager.get("environment"),
            "redis": manager.get("redis_shown"),
            "stopping": manager.get("stopping"),
            "restarts": manager.get("restarts", {}),
            "last_reload": manager.get("last_reload"),
            "reloads": manager.get("reloads", []),
            "directory": manager.get("directory"),
            "options": manager.get("options", {}),
            "rss_bytes": rss_bytes(pid),
        },
        "groups": groups,
        "workers": workers,
        "healthy": not problems,
        "problems": problems,
        "warnings": warnings,
    }
    if queues:
        snapshot.update(_queues(manager, redis_url, uid))
    return snapshot


def health(
    manager: dict[str, Any],
    groups: list[dict[str, Any]],
    workers: list[dict[str, Any]],
    now: float,
) -> tuple[list[str], list[str]]:
    """What is wrong with the pool: problems (they fail ``--check``) and warnings (they do
    not). Problems: it is stopping; a group is short of workers (in respawn backoff, or one just
    died); workers cannot reach Redis (their jobs do not run). Warnings: the last reload was
    rejected; the pool runs the config it had (restarting it would not help: the start would
    refuse the same file); a reload of new code (qless-pool reload) runs, or the last one
    failed."""
    problems, warnings = [], []
    if _process_state(manager.get("pid")) == "T":
        problems.append("the manager is stopped (SIGSTOP or a debugger): send it CONT")
    if manager.get("stopping"):
        problems.append(f"the pool is stopping ({manager['stopping']})")
    for group in groups:
        if group["live"] < group["desired"]:
            why = " (respawn backoff)" if group["backoff_until"] else ""
            problems.append(
                f"{','.join(group['queues'])}: {group['live']} of {group['desired']} workers{why}"
            )
    cut_off = [w for w in workers if w.get("redis_down_since")]
    if cut_off:
        since = min(w["redis_down_since"] for w in cut_off)
        errors = sorted({w["redis_error"] for w in cut_off if w.get("redis_error")})
        said = f": {errors[0]}" if errors else ""
        problems.append(
            f"Redis unreachable from {len(cut_off)} of {len(workers)} workers for "
            f"{_duration(now - since)}{said}"
        )
    reload = manager.get("last_reload")
    if isinstance(reload, dict) and not reload.get("ok"):
        when = time.strftime("%H:%M:%S", time.localtime(reload.get("at", 0)))
        warnings.append(
            f"the reload at {when} was rejected, the pool runs the config it had: "
            f"{reload.get('error')}"
        )
    reloads = [r for r in manager.get("reloads") or [] if isinstance(r, dict)]
    latest = next((r for r in reversed(reloads) if r.get("phase") != "refused"), None)
    if latest is not None and latest.get("phase") in ("starting", "handing-over"):
        warnings.append(
            f"reloading: new manager {latest.get('new_pid')} is taking the pool over "
            f"({latest.get('phase')}, {_duration(now - latest.get('at', now))})"
        )
    elif latest is not None and latest.get("phase") == "failed":
        when = time.strftime("%H:%M:%S", time.localtime(latest.get("at", 0)))
        warnings.append(
            f"the reload at {when} failed, the pool runs the code it had: {latest.get('error')}"
        )
    return problems, warnings


def _process_state(pid: Any) -> Optional[str]:
    """A process's state letter from /proc (R, S, T ...), None if it cannot be read."""
    try:
        with open(f"/proc/{int(pid)}/stat", "rb") as file:
            return file.read().rsplit(b")", 1)[1].split()[0].decode()
    except (OSError, ValueError, TypeError, IndexError):
        return None


def pool_redis_url(
    manager: dict[str, Any], given: Optional[str] = None, owner: Optional[int] = None
) -> str:
    """The URL to read the pool's queues with: ``given`` (-R), else the pool's own. The pool's
    state shows its URL with the password masked; one that had a password is taken from
    $QLESS_URL or $REDIS_URL when that is the same URL (ValueError otherwise). The state of a
    pool of another user (``owner``) is not trusted for a URL: that user could make root's
    status connect anywhere (a root-only socket, TLS files opened as root)."""
    if given:
        return given
    if owner is not None and owner != os.getuid():
        raise ValueError(
            f"the pool runs as uid {owner}, not as this user: its state is not trusted for the "
            "Redis URL; give -R URL"
        )
    shown = manager.get("redis_shown") or DEFAULT_REDIS_URL
    if not manager.get("redis_masked"):
        return shown
    for variable in URL_VARIABLES:
        url = os.environ.get(variable)
        if url and mask_secrets(url) == shown:
            return url
    raise ValueError(
        f"the pool's Redis URL ({shown}) has a password, which the pool does not keep where "
        "status reads: give -R URL, or set $QLESS_URL to it"
    )


def _queues(manager: dict[str, Any], redis_url: Optional[str], owner: int) -> dict[str, Any]:
    from ..client import control_client

    names = configured_queues(manager)
    try:
        client = control_client(pool_redis_url(manager, redis_url, owner), "status")
        failed = json.loads(client("failed"))
        counts = {}
        for name in names:
            queue = json.loads(client("queues", name))
            counts[name] = {column: queue.get(column, 0) for column in QUEUE_COLUMNS}
            counts[name]["failed"] = {
                group: count
                for group, count in failed.items()
                if group.startswith(f"{name}-") or group == f"failed-retries-{name}"
            }
    except Exception as error:
        return {"queues": {}, "redis_error": f"{type(error).__name__}: {error}"}
    return {"queues": counts, "redis_error": None}


def render(snapshot: dict[str, Any]) -> str:
    """The snapshot as text for a terminal."""
    manager = snapshot["manager"]
    app = f"[{manager['appname']}]" if manager.get("appname") else ""
    environment = f" ({manager['environment']})" if manager.get("environment") else ""
    lines = [
        f"qless-pool-manager{app} pid {manager['pid']}, up {_duration(manager['uptime'])}, "
        f"config {manager['config']}{environment}, Redis {manager['redis']}",
    ]
    restarts = manager.get("restarts") or {}
    if any(restarts.values()):
        lines.append(
            "restarts: " + ", ".join(f"{n} {reason}" for reason, n in restarts.items() if n)
        )
    lines.append(_health_line(snapshot))
    lines += ["", "GROUP" + " " * 21 + "WORKERS"]
    for group in snapshot["groups"]:
        backoff = ""
        if group["backoff_until"]:
            backoff = f"  (respawn backoff, {max(0, group['backoff_until'] - time.time()):.0f}s)"
        lines.append(
            f"{','.join(group['queues']):<25} {group['live']}/{group['desired']}{backoff}"
            + _scaling_text(group)
        )
    lines += ["", f"{'PID':<8}{'QUEUES':<20}{'STATE':<12}{'DONE':>7}{'RSS':>8}  JOB"]
    for worker in snapshot["workers"]:
        rss = f"{worker['rss_bytes'] >> 20}M" if worker["rss_bytes"] else "-"
        job = worker["job"]
        what = (
            f"{job['jid']} ({job['klass']}) from {job['queue']}, {_duration(job['running_for'])}"
            if job
            else ""
        )
        lines.append(
            f"{worker['pid']:<8}{','.join(worker['queues'])[:19]:<20}{worker['state']:<12}"
            f"{worker['jobs_done']:>7}{rss:>8}  {what}"
        )
    if "queues" in snapshot:
        lines.append("")
        if snapshot.get("redis_error"):
            lines.append(f"queues: Redis unreachable ({snapshot['redis_error']})")
        else:
            header = f"{'QUEUE':<20}" + "".join(f"{c.upper():>10}" for c in QUEUE_COLUMNS)
            lines.append(header + "  FAILED")
            for name, counts in snapshot["queues"].items():
                failed = ", ".join(f"{g} {n}" for g, n in counts["failed"].items()) or "0"
                lines.append(
                    f"{name[:19]:<20}" + "".join(f"{counts[c]:>10}" for c in QUEUE_COLUMNS)
                    + f"  {failed}"
                )  # fmt: skip
    return "\n".join(lines)


def _health_line(snapshot: dict[str, Any]) -> str:
    problems, warnings = snapshot["problems"], snapshot.get("warnings", [])
    text = "health: NOT OK: " + "; ".join(problems) if problems else "health: ok"
    if warnings:
        text += ("; " if problems else ", but ") + "; ".join(warnings)
    return text


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{seconds:02d}s"


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        pid = find_pool(args.pidfile, args.pid)
        if args.check:
            return 0 if collect(pid, queues=False)["healthy"] else 1
        if args.watch is None:
            snapshot = collect(pid, args.redis)
            print(json.dumps(snapshot, indent=2) if args.json else render(snapshot))
            return 0
        while True:
            try:
                snapshot = collect(pid, args.redis)
                text = json.dumps(snapshot, indent=2) if args.json else render(snapshot)
            except NoState as error:  # the manager makes it again: keep watching
                text = f"qless-pool status: {error}"
            # Home, then clear: the screen is redrawn in place, like top.
            sys.stdout.write("\x1b[H\x1b[2J" + text + "\n")
            sys.stdout.flush()
            time.sleep(args.watch)
            find_manager(None, pid)
    except NoPool as error:
        if not args.check:
            print(f"qless-pool status: {error}", file=sys.stderr)
        # Several pools here is not "no pool": a monitor must not start another on it.
        return EX_USAGE if isinstance(error, ManyPools) else EX_NO_POOL
    except NoState as error:  # a pool, in an unknown state: not healthy
        if not args.check:
            print(f"qless-pool status: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


def _range_of(group: dict[str, Any]) -> dict[str, Any]:
    """A range group's range, wanted count and the scaler's view (the last decision and why)."""
    if "range" not in group:
        return {}
    scaling = group.get("scaling") or {}
    return {
        "range": group["range"],
        "wanted": group["desired"],
        "scaling": {
            "wait": scaling.get("wait"),
            "last": scaling.get("last"),
            "ups": scaling.get("ups", 0),
            "downs": scaling.get("downs", 0),
            "redis_down": scaling.get("redis_down"),
        },
    }


def _scaling_text(group: dict[str, Any]) -> str:
    if "range" not in group:
        return ""
    scaling = group["scaling"]
    text = f"  range {group['range']}"
    if scaling["redis_down"]:
        return text + " (holding: Redis unreachable)"
    last = scaling["last"]
    if last:
        ago = _duration(max(0.0, time.time() - last["at"]))
        text += f"; {last['action']} to {last['wanted']} {ago} ago: {last['reason']}"
    return text
