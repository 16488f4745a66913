"""The operator's commands: ``qless-pool queues | failed | job | retry | cancel | pause |
unpause | stop | reload``, over operations.py (``stop`` and ``reload`` act on the pool's
processes: poolcommands.py; what every command shares: commandkit.py).

Each reads qless's Redis from ``-R URL``, else $QLESS_URL, else $REDIS_URL, else
redis://localhost:6379/0, prints text (or one JSON document with ``--json``), and answers bad
input with one line on stderr and an exit status:

    0   done
    1   not found (a job, a failure group, a queue), or qless refused some of the action, or the
        action was declined at the prompt, or ``stop`` timed out, or ``reload`` failed (the
        new code did not start; the running pool serves on) or was refused
    2   bad usage: an unknown flag, a bad number, a Redis URL that cannot work, a bulk action
        without ``--yes`` and without a terminal to ask on
    3   ``stop``, ``reload``: no pool is running
    69  Redis is unreachable (EX_UNAVAILABLE)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Optional

import redis

from ..logs import printable
from ..outage import redis_is_down
from ..urls import check_redis_url, mask_argument, mask_secrets, redis_url_and_origin
from .commandkit import (
    EX_NOT_FOUND,
    EX_UNAVAILABLE,
    EX_USAGE,
    Failed,
    command_parser,
    print_json,
    print_text,
    whole,
)
from .operations import Done, NotFound, Operations, Page
from .poolcommands import reload, reload_parser, stop, stop_parser

__all__ = ["COMMANDS", "EX_UNAVAILABLE", "main"]

#: Characters of a failure message shown in a list (``job JID`` shows it whole).
MESSAGE_WIDTH = 60


def _bulk_parser(name: str, verb: str) -> argparse.ArgumentParser:
    parser = command_parser(
        name, f"{verb.capitalize()} jobs by jid, or every failed job of a group."
    )
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("jids", nargs="*", default=[], metavar="JID", help=f"the jobs to {verb}")
    what.add_argument("--group", metavar="GROUP", help=f"{verb} every failed job of GROUP")
    parser.add_argument(
        "-y", "--yes", action="store_true",
        help="do not ask (a --group action asks on a terminal, and needs --yes without one)",
    )  # fmt: skip
    return parser


# --- the commands ---------------------------------------------------------------------------------


def queues_parser() -> argparse.ArgumentParser:
    return command_parser("queues", "Every queue qless knows, with its jobs by state.")


def queues(args: argparse.Namespace, ops: Operations) -> int:
    found = ops.queues()
    groups = ops.failure_groups()
    if args.json:
        return print_json({"queues": [asdict(q) for q in found], "failed": groups})
    columns = ("waiting", "running", "scheduled", "stalled", "depends", "recurring")
    width = max([len("QUEUE"), *(len(q.name) for q in found)]) + 2
    lines = [f"{'QUEUE':<{width}}" + "".join(f"{c.upper():>11}" for c in columns)]
    for counts in found:
        paused = "  paused" if counts.paused else ""
        lines.append(
            f"{counts.name:<{width}}" + "".join(f"{getattr(counts, c):>11,}" for c in columns)
            + paused
        )  # fmt: skip
    if not found:
        lines = ["no queues yet (a queue appears with its first job)"]
    failed = sum(groups.values())
    lines.append(f"failed: {failed:,} in {len(groups)} group(s) (qless-pool failed)")
    return print_text("\n".join(lines))


def failed_parser() -> argparse.ArgumentParser:
    parser = command_parser(
        "failed", "The failure groups, or the failed jobs of one, newest first."
    )
    parser.add_argument("group", nargs="?", metavar="GROUP", help="the jobs of this group")
    parser.add_argument("--limit", type=whole(1, 1000), default=25, metavar="N",
                        help="jobs to show (default 25)")  # fmt: skip
    parser.add_argument("--offset", type=whole(0, 10**9), default=0, metavar="N",
                        help="skip the first N (default 0)")  # fmt: skip
    return parser


def failed(args: argparse.Namespace, ops: Operations) -> int:
    if args.group is None and (args.limit != 25 or args.offset != 0):
        raise Failed("--limit and --offset page the jobs of a GROUP: name one", EX_USAGE)
    if args.group is None:
        groups = ops.failure_groups()
        if args.json:
            return print_json(groups)
        if not groups:
            return print_text("no failed jobs")
        width = max(len(g) for g in groups) + 2
        lines = [f"{'GROUP':<{width}}{'JOBS':>9}"]
        lines += [f"{group:<{width}}{count:>9,}" for group, count in groups.items()]
        lines.append(f"{'':<{width}}{sum(groups.values()):>9,} in all")
        return print_text("\n".join(lines))
    page = ops.failed(args.group, args.offset, args.limit)
    if args.json:
        return print_json(asdict(page))
    return print_text(_render_failed(args.group, page))


def _render_failed(group: str, page: Page) -> str:
    last = page.offset + len(page.jobs)
    lines = [f"{group}: {page.total:,} failed job(s); {page.offset + 1} to {last}, newest first"]
    if not page.jobs:
        lines[0] = f"{group}: {page.total:,} failed job(s); none from {page.offset + 1} on"
    for job in page.jobs:
        failure = job.get("failure") or {}
        # The last line says the most: of a traceback, the exception itself.
        said = [line.strip() for line in str(failure.get("message", "")).splitlines()]
        message = next((line for line in reversed(said) if line), "")
        if len(message) > MESSAGE_WIDTH:
            message = message[: MESSAGE_WIDTH - 3] + "..."
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(failure.get("when", 0)))
        lines.append(
            f"{job['jid']}  {when}  {job['klass']} ({job['queue']})  {_printable(message)}"
        )
    if last < page.total:
        lines.append(f"more: --offset {last}")
    return "\n".join(lines)


def job_parser() -> argparse.ArgumentParser:
    parser = command_parser("job", "One job, as qless keeps it.")
    parser.add_argument("jid", metavar="JID")
    return parser


def job(args: argparse.Namespace, ops: Operations) -> int:
    found = ops.job(args.jid)
    if args.json:
        return print_json(found)
    return print_text(render_job(found))


def render_job(found: dict[str, Any]) -> str:
    lines = [f"{found['jid']}  {found.get('klass')}"]
    rows = [
        ("state", found.get("state")),
        ("queue", found.get("queue")),
        ("priority", found.get("priority")),
        ("tags", ", ".join(found.get("tags") or []) or "-"),
        (
            "retries",
            f"{found['remaining']} of {found.get('retries')} left"
            if found.get("remaining") is not None
            else f"{found.get('retries')} a job",
        ),
        ("worker", found.get("worker") or "-"),
        ("depends on", ", ".join(found.get("dependencies") or []) or "-"),
        ("needed by", ", ".join(found.get("dependents") or []) or "-"),
        ("data", json.dumps(found.get("data"))),
    ]
    if found.get("interval"):  # a recurring job's template
        rows.append(("every", f"{found['interval']}s"))
    lines += [f"  {name + ':':<12}{_printable(str(value))}" for name, value in rows]
    failure = found.get("failure") or {}
    if failure:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(failure.get("when", 0)))
        lines.append(
            f"  {'failed:':<12}{failure.get('group')} at {when} on {failure.get('worker')}"
        )
        message = str(failure.get("message", ""))
        lines += ["    " + _printable(line) for line in message.splitlines()]
    history = found.get("history") or []
    if history:
        lines.append("  history:")
        for entry in history[-10:]:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry.get("when", 0)))
            extra = entry.get("worker") or entry.get("q") or ""
            lines.append(f"    {when}  {entry.get('what')}  {extra}".rstrip())
    return "\n".join(lines)


def retry(args: argparse.Namespace, ops: Operations) -> int:
    return _bulk("retry", "retried", args, ops, Operations.retry, Operations.retry_group)


def cancel(args: argparse.Namespace, ops: Operations) -> int:
    return _bulk("cancel", "canceled", args, ops, Operations.cancel, Operations.cancel_group)


def _bulk(
    name: str,
    did: str,
    args: argparse.Namespace,
    ops: Operations,
    on_jobs: Callable[[Operations, list[str]], Done],
    on_group: Callable[[Operations, str], Done],
) -> int:
    if args.group is not None:
        count = ops.failure_groups().get(args.group, 0)
        if not count:
            raise Failed(f"no failed jobs in group {args.group!r}", EX_NOT_FOUND)
        _confirm(f"{name} {count:,} failed job(s) of {args.group}?", args.yes, name)
        done = on_group(ops, args.group)
        what = f"of {args.group}"
    else:
        done = on_jobs(ops, args.jids)
        what = ""
    _say_done(done, did, what, args.json)
    return 1 if done.refusals else 0


def _say_done(done: Done, did: str, what: str, as_json: bool) -> None:
    """What a bulk action did on stdout; the jobs it could not act on, and why, on stderr."""
    if as_json:
        print_json({"acted": done.acted, "refusals": done.refusals, "refused": done.refused})
    else:
        print_text(f"{did} {done.acted:,} job(s) {what}".rstrip())
    if done.refusals:
        lines = [f"not {did}: {done.refusals:,}"]
        lines += [f"  {jid}: {_printable(why)}" for jid, why in done.refused.items()]
        if done.refusals > len(done.refused):
            lines.append(f"  ... and {done.refusals - len(done.refused):,} more")
        print("\n".join(lines), file=sys.stderr)


def _confirm(question: str, yes: bool, name: str) -> None:
    if yes:
        return
    if not sys.stdin.isatty():
        raise Failed(f"{name} --group acts on many jobs: give --yes (no terminal to ask on)",
                     EX_USAGE)  # fmt: skip
    # Asked on stderr: stdout is the command's answer (--json, a redirect).
    sys.stderr.write(f"{question} [y/N] ")
    sys.stderr.flush()
    answer = sys.stdin.readline()
    if answer.strip().lower() not in ("y", "yes"):
        raise Failed("nothing done", EX_NOT_FOUND)


def pausing_parser(name: str) -> argparse.ArgumentParser:
    what = "no worker pops from it until unpaused" if name == "pause" else "its jobs run again"
    parser = command_parser(name, f"{name.capitalize()} a queue: {what}.")
    parser.add_argument("queue", metavar="QUEUE")
    return parser


def pause(args: argparse.Namespace, ops: Operations) -> int:
    ops.pause(args.queue)
    return _paused(args, True)


def unpause(args: argparse.Namespace, ops: Operations) -> int:
    ops.unpause(args.queue)
    return _paused(args, False)


def _paused(args: argparse.Namespace, paused: bool) -> int:
    if args.json:
        return print_json({"queue": args.queue, "paused": paused})
    return print_text(f"{'paused' if paused else 'unpaused'} {args.queue}")


@dataclass(frozen=True)
class Command:
    parser: Callable[[], argparse.ArgumentParser]
    run: Callable[[argparse.Namespace, Any], int]
    redis: bool = True  # it reads qless's Redis


COMMANDS: dict[str, Command] = {
    "queues": Command(queues_parser, queues),
    "failed": Command(failed_parser, failed),
    "job": Command(job_parser, job),
    "retry": Command(lambda: _bulk_parser("retry", "retry"), retry),
    "cancel": Command(lambda: _bulk_parser("cancel", "cancel"), cancel),
    "pause": Command(lambda: pausing_parser("pause"), pause),
    "unpause": Command(lambda: pausing_parser("unpause"), unpause),
    "stop": Command(stop_parser, stop, redis=False),
    "reload": Command(reload_parser, reload, redis=False),
}


def main(name: str, argv: Sequence[str]) -> int:
    """Run the command ``name``; every failure is one line on stderr and an exit status."""
    from .operations import Interrupted

    for argument in argv:
        try:
            argument.encode()
        except UnicodeEncodeError:
            return _fail(name, f"an argument is not UTF-8 text: {argument!r}", EX_USAGE)
    command = COMMANDS[name]
    args = command.parser().parse_args(argv)  # a usage error exits 2, as argparse does
    url = None
    try:
        ops = None
        if command.redis:
            url, ops = _operations(args.redis)
        return command.run(args, ops)
    except Failed as failure:
        return _fail(name, str(failure), failure.status)
    except NotFound as error:
        return _fail(name, _printable(str(error)), EX_NOT_FOUND)
    except Interrupted as cut:  # a bulk action Redis cut short: what it did, then why
        assert url is not None
        flight = f"of {cut.total:,} (and up to {cut.in_flight:,} more, sent as Redis went away)"
        _say_done(cut.done, "done", flight, getattr(args, "json", False))
        left = cut.total - cut.done.acted - cut.done.refusals
        message = (
            f"{_unreachable(url, cut.error)}; at most {left:,} job(s) not done: run it again "
            "(only the jobs still failed are acted on)"
        )
        return _fail(name, message, EX_UNAVAILABLE)
    except Exception as error:
        if url is None or not (isinstance(error, redis.RedisError) or redis_is_down(error)):
            raise  # (a closed stdout's BrokenPipeError too: __main__ ends quietly on it)
        return _fail(name, _unreachable(url, error), EX_UNAVAILABLE)


def _unreachable(url: str, error: BaseException) -> str:
    """Redis at URL is unreachable, or did not answer as Redis; the password masked (also one
    with a space, which no URL pattern finds in a message)."""
    shown = mask_argument(url)
    said = mask_secrets(str(error).replace(url, shown))
    if isinstance(error, (redis.exceptions.InvalidResponse, redis.exceptions.ResponseError)):
        return f"Redis at {shown} did not answer as Redis: {said}"
    return f"Redis at {shown} is unreachable: {said}"


def _printable(text: str) -> str:
    return printable(text, keep="\t")  # a tab in a traceback stays a tab on the terminal


def _fail(name: str, message: str, status: int) -> int:
    print(f"qless-pool {name}: {message}", file=sys.stderr)
    return status


# --- helpers --------------------------------------------------------------------------------------


def _operations(given: Optional[str]) -> tuple[str, Operations]:
    """The URL to use (-R, $QLESS_URL, $REDIS_URL, the default) and operations over it."""
    from ..client import control_client

    url, origin = redis_url_and_origin(given)
    try:
        check_redis_url(url)
    except ValueError as error:
        raise Failed(f"bad Redis URL (from {origin}): {error}", EX_USAGE) from None
    return url, Operations(control_client(url, "ops"))
