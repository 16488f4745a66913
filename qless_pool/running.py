"""Running one job: qless-py's ``Job.process``, the client that sees how the job settled, and
the report of the run; in a job child, or in the worker process itself (--no-fork-per-job).

*Settling.* A job function that fails, retries, moves or cancels its job settles it itself.
One that returns without settling it (most do), or that completes it plainly (``job.complete()``
with no next queue), is reported ``returned``, with its data, and the worker completes it in one
round trip with its next pop: ``job.complete()`` returns ``"complete"`` at once, and the job's
later attempts to settle it are refused as qless would refuse them. If Redis was down when the
job settled itself, the report carries the command for the worker to replay (settling.py).

*In the worker process* (--no-fork-per-job) the worker's loop cannot turn while a job runs, so
TERM, INT and USR1 stop the job where it is: their handlers raise ``JobInterrupted`` into it
(a BaseException, which qless-py does not turn into a failure). SIGALRM does the same for the
job's timeout and for the deadline of a graceful stop (--graceful-timeout).
"""

from __future__ import annotations

import json
import signal
import time
import traceback
from typing import Any, Optional

import qless
from qless.exceptions import QlessException

from .client import REDIS_DOWN
from .logs import cap

__all__ = [
    "MAX_RETURNED_DATA",
    "InProcess",
    "JobClient",
    "JobInterrupted",
    "cap_message",
    "describe_job",
    "run_job",
]

#: Data a returned job's report carries back for the worker's ``complete``; a job whose data
#: grew bigger completes itself.
MAX_RETURNED_DATA = 32 * 1024


def describe_job(job: dict[str, Any]) -> str:
    return f"job {job['jid']} ({job['klass']}) from {job['queue']}"


# --- the job's client ---------------------------------------------------------------------------


class JobClient(qless.Client):
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
            return "complete"
        self.outcome = outcome
        if command == "fail" and len(args) > 2:
            self.group = args[2]
        elif command == "retry" and len(args) > 4:
            self.group = args[4]
        try:
            return super().__call__(command, *args)
        except REDIS_DOWN:
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


def run_job(client: JobClient, fields: dict[str, Any]) -> dict[str, Any]:
    """Run one job with qless-py; returns the report for the worker.

    ``{"outcome": "returned", "data": ...}``: the job function returned without settling its
    job, or completed it plainly; the worker completes it with that data (a job whose data is
    too big to report is completed here). ``{"outcome": "complete" | "fail" | ...}``: the job
    settled itself. ``{"unreported": [command, ...]}``: it settled while Redis was down. Every
    report has ``seconds``, the time the job ran.
    """
    started = time.monotonic()
    client.track_job(fields["jid"])
    queue = fields["queue"]
    report: dict[str, Any] = {}
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
            report = _process(job, client)
    except (*REDIS_DOWN, QlessException):
        if not client.settled:
            raise
    if client.unreported is not None:
        report = {"unreported": client.unreported}
    elif client.deferred is not None:
        report = {"outcome": "returned", "data": client.deferred}
    elif client.settled:
        report = {"outcome": client.outcome, "group": client.group}
    report["seconds"] = time.monotonic() - started
    return report


def _process(job: qless.Job, client: JobClient) -> dict[str, Any]:
    try:
        job.process()
    except (SystemExit, KeyboardInterrupt) as exit:
        # qless-py catches Exception only. Running it again would exit again: fail it.
        what = f"{type(exit).__name__}({exit.args[0]!r})" if exit.args else type(exit).__name__
        job.fail(
            f"{job.queue_name}-SystemExit",
            f"the job function raised {what}, which ends the process it runs in; a job must "
            f"return or raise an exception instead\n{traceback.format_exc()}",
        )
        return {}
    if client.settled:
        return {}
    # qless's Ruby workers complete a job whose function returned; qless-py leaves it running
    # until its lock expires and then hands it to another worker.
    data = json.dumps(job.data)
    if len(data) > MAX_RETURNED_DATA:
        job.complete()  # sent here: too big for the report
        return {}
    return {"outcome": "returned", "data": data}


# --- jobs in the worker process -----------------------------------------------------------------


class JobInterrupted(BaseException):
    """Raised into a job running in the worker process by TERM, INT, USR1 or SIGALRM."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class InProcess:
    """Runs jobs in the worker process; its signal handlers interrupt the job that runs.

    ``reason`` of an interruption: ``"timeout"`` (the job's --job-timeout), ``"graceful"`` (the
    graceful stop's deadline passed), or ``"interrupted by SIGTERM"`` (and INT, USR1).
    """

    INTERRUPTING = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

    def __init__(self, client: JobClient, job_timeout: Optional[float]):
        self.client = client
        self.job_timeout = job_timeout
        self.stop_deadline: Optional[float] = None  # monotonic
        self.job_deadline: Optional[float] = None  # monotonic
        self.running = False

    def install(self) -> None:
        for signum in self.INTERRUPTING:
            signal.signal(signum, self._interrupt)
        signal.signal(signal.SIGALRM, self._interrupt)

    def _interrupt(self, signum: int, frame: Any) -> None:
        # Python's C handler has already written the signal to the worker's wakeup pipe; the
        # loop acts on it once the job is over. This only stops the job where it is.
        if not self.running:
            return
        self.running = False
        if signum != signal.SIGALRM:
            raise JobInterrupted(f"interrupted by {signal.Signals(signum).name}")
        if self.stop_deadline is not None and time.monotonic() >= self.stop_deadline - 0.01:
            raise JobInterrupted("graceful")
        raise JobInterrupted("timeout")

    def stop_by(self, deadline: float) -> None:
        """A graceful stop must be over by ``deadline``: the job running now too."""
        self.stop_deadline = deadline
        if self.running:
            self._arm()

    def _arm(self) -> None:
        deadlines = [d for d in (self.job_deadline, self.stop_deadline) if d is not None]
        if deadlines:
            signal.setitimer(signal.ITIMER_REAL, max(0.001, min(deadlines) - time.monotonic()))

    def run(self, job: dict[str, Any]) -> tuple[dict[str, Any], Optional[str]]:
        """Run ``job``: its report, and why it was interrupted (None if it was not)."""
        started = time.monotonic()
        self.job_deadline = started + self.job_timeout if self.job_timeout else None
        alarm = self.job_deadline is not None or self.stop_deadline is not None
        if alarm:
            self._arm()
        self.running = True
        try:
            return run_job(self.client, job), None
        except JobInterrupted as interrupted:
            return {"seconds": time.monotonic() - started}, interrupted.reason
        finally:
            self.running = False
            if alarm or self.stop_deadline is not None:
                signal.setitimer(signal.ITIMER_REAL, 0)
            self.job_deadline = None
            self.client.track_job(None)
