"""The commands that act on a running pool's processes: ``qless-pool stop`` and ``qless-pool
reload`` (the others, commands.py, act on qless's queues and jobs). They find the pool by its
pidfile or pid (finding.py) and follow it through its state (state.py), never through Redis."""

from __future__ import annotations

import argparse
import os
import signal
import time
from typing import Any, Optional

from .commandkit import (
    EX_NO_POOL,
    EX_NOT_FOUND,
    EX_USAGE,
    Failed,
    command_parser,
    print_json,
    print_text,
    whole,
)
from .operations import Operations

__all__ = ["reload", "reload_parser", "stop", "stop_parser"]


def _pool_arguments(parser: argparse.ArgumentParser) -> None:
    """-p FILE | --pid PID: which pool (``stop``, ``reload``)."""
    where = parser.add_mutually_exclusive_group()
    where.add_argument("-p", "--pidfile", metavar="FILE",
                       help="the pool's pidfile (default: tmp/pids/qless-pool.pid, else the pool "
                       "started in this directory)")  # fmt: skip
    where.add_argument("--pid", type=whole(1, 2**22), metavar="PID", help="the manager's pid")


def _the_pool(args: argparse.Namespace) -> int:
    """The manager's pid the arguments name (ops/finding.py); Failed with 2 or 3 if none."""
    from .finding import ManyPools, NoPool, find_pool

    try:
        return find_pool(args.pidfile, args.pid)
    except ManyPools as error:
        raise Failed(str(error), EX_USAGE) from None
    except NoPool as error:
        raise Failed(str(error), EX_NO_POOL) from None


def stop_parser() -> argparse.ArgumentParser:
    parser = command_parser("stop", "Stop a running pool and wait until it is gone.", redis=False)
    _pool_arguments(parser)
    parser.add_argument("--now", action="store_true",
                        help="stop the running jobs too (they are handed back to qless); "
                        "default: every worker finishes its job first")  # fmt: skip
    parser.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                        help="give up waiting after SECONDS (default 60)")  # fmt: skip
    return parser


def stop(args: argparse.Namespace, ops: Optional[Operations]) -> int:
    from .finding import PoolProcesses

    if not 0 < args.timeout < 10**7:
        raise Failed(f"--timeout: more than 0 seconds: {args.timeout}", EX_USAGE)
    pid = _the_pool(args)
    processes = PoolProcesses(pid)  # the manager and its workers, each with its start time
    sent = time.monotonic()
    try:
        os.kill(pid, signal.SIGQUIT)  # every worker finishes its job; the manager waits
        if args.now:
            # TERM while a QUIT waits stops the workers now, whatever --term-* says (INT would
            # only stop the waiting): sent once the QUIT is taken, as two signals sent at once
            # may arrive in either order.
            _wait_until_stopping(pid)
            os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass  # gone already: nothing left to wait for
    left = processes.alive()
    while left and time.monotonic() - sent < args.timeout:
        time.sleep(0.05)
        left = processes.alive()
    took = time.monotonic() - sent
    if left:
        stopped = [p for p in left if processes.stopped(p)]
        why = (
            f"stopped by SIGSTOP or a debugger: {', '.join(map(str, stopped))} (send them CONT)"
            if stopped
            else "their jobs may be long (qless-pool stop --now)"
        )
        raise Failed(
            f"pool {pid} is still running after {args.timeout:g}s: {len(left)} process(es) "
            f"({', '.join(map(str, left))}); {why}",
            EX_NOT_FOUND,
        )
    if args.json:
        return print_json({"pid": pid, "stopped": True, "seconds": round(took, 3)})
    how = "now" if args.now else "after its jobs"
    return print_text(f"stopped pool {pid} {how} in {took:.1f}s")


def _wait_until_stopping(pid: int, longest: float = 2.0) -> None:
    """Until the pool's state says it is stopping (or ``longest`` seconds, if it says nothing)."""
    from .state import pool_directory, read_manager

    directory = pool_directory(pid, os.stat(f"/proc/{pid}").st_uid)
    deadline = time.monotonic() + longest
    while time.monotonic() < deadline:
        if (read_manager(directory) or {}).get("stopping"):
            return
        time.sleep(0.02)


def reload_parser() -> argparse.ArgumentParser:
    parser = command_parser(
        "reload",
        "Run new code without a stop: the pool's manager starts a new one (the same command "
        "line, from the same directory), which reads the config and loads the application "
        "afresh and takes the workers over one by one. Exits 0 once the new manager serves "
        "every slot, 1 if the new code failed (the running pool serves on), 3 if no pool runs.",
        redis=False,
    )
    _pool_arguments(parser)
    parser.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                        help="how long the new manager has to load and serve every slot "
                        "(default 60); after it the reload fails")  # fmt: skip
    parser.add_argument("--wait", action="store_true",
                        help="wait too until the old manager has exited (its workers finish "
                        "their running jobs first)")  # fmt: skip
    return parser


def reload(args: argparse.Namespace, ops: Optional[Operations]) -> int:
    from ..pool.handover import write_request
    from ..pool.signals import RELOAD_SIGNAL
    from .finding import running
    from .state import pool_directory, read_manager

    if not 0 < args.timeout < 10**6:
        raise Failed(f"--timeout: more than 0 seconds: {args.timeout}", EX_USAGE)
    pid = _the_pool(args)
    try:
        directory = pool_directory(pid, os.stat(f"/proc/{pid}").st_uid)
    except OSError:
        raise Failed(f"pool {pid} has exited", EX_NO_POOL) from None
    sent = time.monotonic()
    try:
        request = write_request(directory, args.timeout)
        os.kill(pid, RELOAD_SIGNAL)
    except ProcessLookupError:
        raise Failed(f"pool {pid} has exited", EX_NO_POOL) from None
    except OSError as error:
        raise Failed(f"cannot ask pool {pid} to reload: {error}", EX_NOT_FOUND) from None
    # The manager keeps the timeout itself; this side waits a little longer for its verdict.
    deadline = sent + args.timeout + 10
    report: dict[str, Any] = {}
    while time.monotonic() < deadline:
        manager = read_manager(directory)
        found = [r for r in (manager or {}).get("reloads", []) if r.get("id") == request]
        report = found[-1] if found else report
        if report.get("phase") in ("handed-over", "failed", "refused"):
            break
        if manager is None:
            # The old manager may be gone already (its workers were idle): the new one says
            # which reload made it.
            gone = not running(pid)
            report = _taken_over(report, request)
            if report.get("phase") == "handed-over":
                break
            if gone:
                raise Failed(f"pool {pid} exited during the reload", EX_NOT_FOUND)
        time.sleep(0.05)
    phase = report.get("phase")
    if phase in ("failed", "refused"):
        raise Failed(f"reload {phase}: {report.get('error')}", EX_NOT_FOUND)
    if phase != "handed-over":
        raise Failed(f"pool {pid} did not answer the reload within {args.timeout:g}s", EX_NOT_FOUND)
    new = report["new_pid"]
    took = time.monotonic() - sent
    if args.wait:
        # Its state goes when its last worker has (a keeper stays on, without it).
        while os.path.exists(directory) and running(pid):
            time.sleep(0.05)
    if args.json:
        return print_json({"old_pid": pid, "new_pid": new, "seconds": round(took, 3),
                            "old_exited": bool(args.wait)})  # fmt: skip
    waited = f"; the old manager has exited ({time.monotonic() - sent:.1f}s)" if args.wait else ""
    return print_text(f"reloaded: pool {pid} handed over to manager {new} in {took:.1f}s{waited}")


def _taken_over(report: dict[str, Any], request: str) -> dict[str, Any]:
    """The reload ``report`` as the new manager it names tells it (handed-over, if the new
    manager serves for this request)."""
    from .state import pool_directory, read_manager

    new = report.get("new_pid")
    if not isinstance(new, int):
        return report
    try:
        manager = read_manager(pool_directory(new, os.stat(f"/proc/{new}").st_uid))
    except OSError:
        return report
    if ((manager or {}).get("took_over") or {}).get("request") == request:
        return {**report, "phase": "handed-over"}
    return report
