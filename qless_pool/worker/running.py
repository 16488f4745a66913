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
import logging
import math
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any, Optional

import qless
from qless.exceptions import QlessException

from ..client import REDIS_DOWN, redis_is_down
from ..logs import cap, logger
from .reservation import forbidden_target

__all__ = [
    "MAX_RETURNED_DATA",
    "InProcess",
    "JobClient",
    "JobInterrupted",
    "Keeper",
    "cap_message",
    "describe_job",
    "run_job",
]

log = logger.getChild("worker")

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


def run_job(
    client: JobClient, fields: dict[str, Any], allowed: Sequence[str] = ()
) -> dict[str, Any]:
    """Run one job with qless-py; returns the report for the worker. ``allowed``: the modules
    (--allow-module) what qless-py resolves the job's class to must come from.

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
    report = settled_report(client) or report
    report["seconds"] = time.monotonic() - started
    return report


def settled_report(client: JobClient) -> dict[str, Any]:
    """The report of how the job settled itself, as far as it has (empty: not at all)."""
    if client.unreported is not None:
        return {"unreported": client.unreported}
    if client.deferred is not None:
        return {"outcome": "returned", "data": client.deferred}
    if client.settled:
        return {"outcome": client.outcome, "group": client.group}
    return {}


def _process(job: qless.Job, client: JobClient) -> dict[str, Any]:
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
        return {}
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
        return {}
    if client.settled:
        return {}
    # qless's Ruby workers complete a job whose function returned; qless-py leaves it running
    # until its lock expires and then hands it to another worker.
    try:
        data = json.dumps(job.data)
    except (TypeError, ValueError) as error:  # say a datetime: it cannot be saved
        _fail(client, job, f"{job.queue_name}-BadJobData", _unsaveable(error, "returned"))
        return {}
    if len(data) > MAX_RETURNED_DATA:
        job.complete()  # sent here: too big for the report
        return {}
    return {"outcome": "returned", "data": data}


def _unsaveable(error: Exception, returned: str = "failed") -> str:
    return f"the job {returned}, but its data cannot be saved as JSON ({error})"


def _fail(client: JobClient, job: qless.Job, group: str, message: str) -> None:
    """Job.fail(), which also saves the job's data: without it if it cannot be saved."""
    try:
        data = [json.dumps(job.data)]
    except (TypeError, ValueError):
        data = []  # left as it was in qless
    client("fail", job.jid, client.worker_name, group, message, *data)


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

    A job that swallows the interruption (``except BaseException``) is interrupted again
    ``kill_grace`` seconds later; if it swallows that too, the worker process exits at once
    (status 70) after another ``kill_grace``: nothing else can stop it. The manager's settler
    hands its job back (will.py); the manager starts a new worker.
    """

    INTERRUPTING = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
    #: Interruptions a job may swallow before the worker gives up on it and exits.
    MAX_INTERRUPTIONS = 3

    def __init__(
        self,
        client: JobClient,
        job_timeout: Optional[float],
        kill_grace: float = 5.0,
        allowed: Sequence[str] = (),
    ):
        self.client = client
        self.allowed = allowed
        self.job_timeout = job_timeout
        self.kill_grace = kill_grace
        self.stop_deadline: Optional[float] = None  # monotonic
        self.job_deadline: Optional[float] = None  # monotonic
        self.running = False  # the job's own code runs: a signal interrupts it
        self.stop_requested: Optional[str] = None  # TERM or INT came: start no job
        self.interrupted: Optional[str] = None  # why the running job was first interrupted
        self.interruptions = 0

    def install(self) -> None:
        for signum in self.INTERRUPTING:
            signal.signal(signum, self._interrupt)
        signal.signal(signal.SIGALRM, self._interrupt)

    def _interrupt(self, signum: int, frame: Any) -> None:
        # Python's C handler has already written the signal to the worker's wakeup pipe; the
        # loop acts on it once the job is over. This only stops the job where it is.
        if signum in (signal.SIGTERM, signal.SIGINT):
            # Also between two jobs: the loop may be about to start one before it reads this.
            self.stop_requested = f"interrupted by {signal.Signals(signum).name}"
        if not self.running:
            return
        if signum != signal.SIGALRM:
            reason = f"interrupted by {signal.Signals(signum).name}"
        elif self.stop_deadline is not None and time.monotonic() >= self.stop_deadline - 0.01:
            reason = "graceful"
        elif self.job_deadline is not None and time.monotonic() >= self.job_deadline - 0.01:
            reason = "timeout"
        else:
            reason = self.interrupted or "timeout"  # the job swallowed an interruption
        self.interrupted = self.interrupted or reason
        self.interruptions += 1
        if self.interruptions >= self.MAX_INTERRUPTIONS:
            log.critical(
                "the job running in this worker swallowed %d interruptions (%s); exiting (the "
                "manager's settler hands the job back)",
                self.interruptions - 1,
                self.interrupted,
            )
            logging.shutdown()
            os._exit(70)  # EX_SOFTWARE
        if self.interruptions > 1:
            log.warning("the job swallowed its interruption (%s); again", self.interrupted)
        signal.setitimer(signal.ITIMER_REAL, self.kill_grace)  # again, if this one is swallowed
        raise JobInterrupted(self.interrupted)

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
        self.interrupted, self.interruptions = None, 0
        report: Optional[dict[str, Any]] = None
        reason = None
        try:
            try:
                self.running = True
                if self.stop_requested:  # came as the job was about to start
                    raise JobInterrupted(self.stop_requested)
                self._arm()
                report = run_job(self.client, job, self.allowed)
            finally:
                self.running = False  # from here on a signal waits for the loop
        except JobInterrupted as interrupted:  # (raised in the job, or as it unwound)
            if report is None:
                # What the job settled before it was cut short still counts: a complete() too.
                report = settled_report(self.client)
                report.update(seconds=time.monotonic() - started, cut_short=True)
                reason = interrupted.reason
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            self.job_deadline = None
            self.client.track_job(None)
        return report, reason


class Keeper:
    """While a job runs in the worker process, the worker's loop cannot turn. This thread does
    the loop's work that cannot wait for the job to end: the heartbeats (of the running job and
    of the jobs held for later) and the completes owed (due within about a second), with the
    worker's own client. It acts only while a job runs (``job_running()``); the rest of the
    time the loop does that work itself. ``due()`` says when there is work, ``tend(now)``
    does it.
    """

    #: After a failed attempt (Redis away), the next one waits this long.
    RETRY_DELAY = 1.0

    def __init__(self, due: Callable[[], Optional[float]], tend: Callable[[float], None]):
        self._due, self._tend = due, tend
        self._condition = threading.Condition()
        self._active = False
        self._looks_at = math.inf  # monotonic: when the thread looks next
        self._retry_at = 0.0
        self._thread: Optional[threading.Thread] = None

    def job_running(self) -> Keeper:
        """``with keeper.job_running():`` around a job run in process (entered once a job)."""
        return self

    def __enter__(self) -> None:
        with self._condition:
            self._active = True
            due = self._due()
            if due is not None and due < self._looks_at:
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._run, name="qless-pool-keeper", daemon=True
                    )
                    self._thread.start()
                self._condition.notify()

    def __exit__(self, *exc: object) -> None:
        with self._condition:  # waits for a round of tending under way
            self._active = False

    def _run(self) -> None:
        with self._condition:
            while True:
                now = time.monotonic()
                due = self._due() if self._active else None
                if due is not None:
                    due = max(due, self._retry_at)
                if due is not None and due <= now:
                    try:
                        self._tend(now)
                    except Exception as error:
                        if not redis_is_down(error):
                            log.exception("could not heartbeat or settle while a job ran")
                        self._retry_at = time.monotonic() + self.RETRY_DELAY
                    continue
                self._looks_at = math.inf if due is None else due
                self._condition.wait(None if due is None else due - now)
