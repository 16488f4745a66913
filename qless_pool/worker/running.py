"""Running one job: qless-py's ``Job.process``, the client that sees how the job settled, and
the report of the run (outcome.Report); in a job child (jobchild.py), or in the worker process
itself (inprocess.py).

*Settling.* A job function that fails, retries, moves or cancels its job settles it itself.
One that returns without settling it (most do), or that completes it plainly (``job.complete()``
with no next queue), is reported ``returned``, with its data, and the worker completes it in one
round trip with its next pop: ``job.complete()`` returns ``"complete"`` at once, and the job's
later attempts to settle it are refused as qless would refuse them. If Redis was down when the
job settled itself, the report carries the command for the worker to replay (settling.py).
"""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any, Optional

import qless
from qless.exceptions import QlessException

from ..client import REDIS_DOWN, redis_is_down
from ..logs import cap, logger
from .outcome import Report
from .reservation import forbidden_target

__all__ = ["MAX_RETURNED_DATA", "JobClient", "cap_message", "describe_job", "run_job"]

log = logger.getChild("worker")

#: Data a returned job's report carries back for the worker's ``complete``; a job whose data
#: grew bigger completes itself.
MAX_RETURNED_DATA = 32 * 1024


def describe_job(job: dict[str, Any]) -> str:
    return f"job {job['jid']} ({job['klass']}) from {job['queue']}"


# --- the job's client ---------------------------------------------------------------------------


class JobClient(qless.Client):  # type: ignore[misc]  # qless-py has no type information
    """The job's client: it notices the command that settles its job.

    complete, fail, retry, cancel, or a put of the job to another queue settle a job. Once one
    reached Redis the job is *settled* (even if qless refused it: then the job is no longer this
    worker's to settle), and ``outcome`` names it. A plain complete is not sent but kept
    (``deferred``: the job's data) for the worker to send with its next pop. When Redis is down
    the command is kept as ``unreported``, for the worker to replay when Redis is back; the job's
    further attempts to settle are refused. Failure messages are capped (logs.MAX_MESSAGE).
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        # Told at once when the job settles itself (before the command is sent): a job child
        # tells its worker parent, which then neither kills it for qless's news of that (a
        # cancel, a move) nor loses a deferred complete if the child dies before it reports.
        self.on_settled: Optional[Callable[[dict[str, Any]], None]] = None
        self.track_job(None)

    def track_job(self, jid: Optional[str]) -> None:
        """Watch the commands that settle ``jid`` (None: watch nothing)."""
        self.jid = jid
        self.outcome: Optional[str] = None  # "complete", "fail", "retry", "move", "cancel"
        self.group: Optional[str] = None  # of a fail or retry
        self.unreported: Optional[list[Any]] = None
        self.deferred: Optional[str] = None  # a plain complete's data, for the worker to send

    @property
    def settled(self) -> bool:
        return self.outcome is not None

    def _settles_job(self, command: str, args: tuple[Any, ...]) -> Optional[str]:
        if self.jid is None:
            return None
        if command in ("complete", "fail", "retry"):
            return command if args and args[0] == self.jid else None
        if command == "put":  # Job.move
            return "move" if len(args) > 1 and args[1] == self.jid else None
        if command == "cancel":
            return "cancel" if self.jid in args else None
        return None

    def __call__(self, command: str, *args: Any) -> Any:
        if command in ("fail", "retry"):
            args = cap_message(command, args)
        outcome = self._settles_job(command, args)
        if outcome is None:
            return super().__call__(command, *args)
        if self.deferred is not None:  # as qless answers once the job is complete
            raise QlessException(
                f"{command.capitalize()}(): Job is not currently running: complete"
            )
        if self.unreported is not None:
            raise REDIS_DOWN[0]("Redis was unreachable; the job's outcome is kept for the worker")
        if command == "complete" and len(args) == 4 and len(args[3]) <= MAX_RETURNED_DATA:
            # complete(jid, worker, queue, data): sent by the worker with its next pop.
            self.outcome, self.deferred = "complete", args[3]
            if self.on_settled is not None:
                self.on_settled({"completed": args[3]})
            return "complete"
        self.outcome = outcome
        if self.on_settled is not None:
            self.on_settled({"settled": outcome})
        if command == "fail" and len(args) > 2:
            self.group = args[2]
        elif command == "retry" and len(args) > 4:
            self.group = args[4]
        try:
            return super().__call__(command, *args)
        except Exception as error:
            if redis_is_down(error):  # down, or refusing writes (a failover): not a refusal
                self.unreported = [command, *args]
            raise


def cap_message(command: str, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """fail(jid, worker, group, message, ...) and retry(jid, queue, worker, delay, group,
    message) with the message capped (logs.MAX_MESSAGE)."""
    index = 3 if command == "fail" else 5
    if len(args) > index and isinstance(args[index], str):
        args = (*args[:index], cap(args[index]), *args[index + 1 :])
    return args


# --- running one job ----------------------------------------------------------------------------


def run_job(client: JobClient, fields: dict[str, Any], allowed: Sequence[str] = ()) -> Report:
    """Run one job with qless-py; returns the report for the worker. ``allowed``: the modules
    (--allow-module) what qless-py resolves the job's class to must come from.

    Outcome ``returned``: the job function returned without settling its job, or completed it
    plainly; the worker completes it with ``data`` (a job whose data is too big to report is
    completed here). Outcome ``complete``, ``fail`` ...: the job settled itself.
    ``unreported``: it settled while Redis was down. ``seconds``: the time the job ran.
    """
    started = time.monotonic()
    client.track_job(fields["jid"])
    queue = fields["queue"]
    report = Report()
    try:
        try:
            job = qless.Job(client, **fields)  # parses the job's data
        except (TypeError, ValueError) as error:
            # Not retried: the data will be just as broken the next time.
            client(
                "fail",
                fields["jid"],
                client.worker_name,
                f"{queue}-BadJobData",
                f"the job's data is not valid JSON ({error}): {cap(str(fields['data']), 1024)}",
            )
        else:
            refusal = forbidden_target(job, allowed)
            if refusal is not None:
                log.warning("%s: %s; failed as %s-ForbiddenClass", describe_job(fields), refusal,
                            queue)  # fmt: skip
                _fail(client, job, f"{queue}-ForbiddenClass", refusal)
            else:
                report = _process(job, client)
    except (*REDIS_DOWN, QlessException):
        if not client.settled:
            raise
    settled = settled_report(client)
    if settled.said_anything:
        report = settled
    report.seconds = time.monotonic() - started
    return report


def settled_report(client: JobClient) -> Report:
    """The report of how the job settled itself, as far as it has (empty: not at all)."""
    if client.unreported is not None:
        return Report(unreported=client.unreported)
    if client.deferred is not None:
        return Report(outcome="returned", data=client.deferred)
    if client.settled:
        return Report(outcome=client.outcome, group=client.group)
    return Report()


def _process(job: qless.Job, client: JobClient) -> Report:
    try:
        job.process()
    except (TypeError, ValueError) as error:
        # Escaped qless-py's own handling: failing the job for what the job function raised,
        # its fail() could not save the job's data as JSON. Failed as qless-py meant to, with
        # the data left as it was.
        if not client.settled:  # else it settled first; the later attempt is moot
            raised = error.__context__ or error
            _fail(
                client,
                job,
                f"{job.queue_name}-{type(raised).__name__}",
                f"{_unsaveable(error)}\n{''.join(traceback.format_exception(raised))}",
            )
        return Report()
    except (SystemExit, KeyboardInterrupt) as exit:
        # qless-py catches Exception only. Running it again would exit again: fail it.
        what = f"{type(exit).__name__}({exit.args[0]!r})" if exit.args else type(exit).__name__
        _fail(
            client,
            job,
            f"{job.queue_name}-SystemExit",
            f"the job function raised {what}, which ends the process it runs in; a job must "
            f"return or raise an exception instead\n{traceback.format_exc()}",
        )
        return Report()
    if client.settled:
        return Report()
    # qless's Ruby workers complete a job whose function returned; qless-py leaves it running
    # until its lock expires and then hands it to another worker.
    try:
        data = json.dumps(job.data)
    except (TypeError, ValueError) as error:  # say a datetime: it cannot be saved
        _fail(client, job, f"{job.queue_name}-BadJobData", _unsaveable(error, "returned"))
        return Report()
    if len(data) > MAX_RETURNED_DATA:
        job.complete()  # sent here: too big for the report
        return Report()
    return Report(outcome="returned", data=data)


def _unsaveable(error: Exception, returned: str = "failed") -> str:
    return f"the job {returned}, but its data cannot be saved as JSON ({error})"


def _fail(client: JobClient, job: qless.Job, group: str, message: str) -> None:
    """Job.fail(), which also saves the job's data: without it if it cannot be saved."""
    try:
        data = [json.dumps(job.data)]
    except (TypeError, ValueError):
        data = []  # left as it was in qless
    client("fail", job.jid, client.worker_name, group, message, *data)
