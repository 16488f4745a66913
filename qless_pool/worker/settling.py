"""Settling: what a worker sends to qless when a job's run has ended, and when.

A run ends one of these ways, and the worker settles the job accordingly:

==========================================  =================================================
the run                                     the worker sends
==========================================  =================================================
the job settled itself (fail, retry, move,  nothing
cancel, or complete to a next queue)
the job function returned, or called a      ``complete`` (with the job's data), in one round
plain ``complete()`` (then whatever ended   trip with the next pop, or without one a second
its run)                                    later at the latest (while a job runs in the worker
                                            process, its keeper thread sends it)
it settled itself while Redis was down      that command, when Redis is back
it ran past ``--job-timeout``               ``fail`` as ``<queue>-TimeoutError``
its child died, or was killed, or it was    ``retry`` as ``<queue>-DirtyExit``: it runs again,
interrupted, without settling it            or, out of retries, fails
==========================================  =================================================

*The one batching* (an optimisation, and the only place the worker defers what it owes): a
``complete`` owed rides with the worker's next pop, both in one round trip (Settler.send_with);
with no pop to ride with, it goes alone when due (MAX_COMPLETE_DELAY after the run, or sooner
if the job's lock is due). Meanwhile it is in the worker's will (will.py): if the worker dies,
it is sent for it. Everything else is sent at once.

Everything but a ``complete`` is sent only if qless still says the job is running on this
worker (``fail`` does not check its owner itself), so that a job that was taken away meanwhile
(its lock expired and another worker has it) is left alone, and nothing is reported twice.

Every finished job gets one INFO log line: its jid, class, queue, outcome and run time.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import qless
from qless.exceptions import QlessException

from .. import lifeline
from ..client import pipelined, raise_if_down, redis_is_down
from ..logs import logger
from .outcome import JobRun, Report
from .running import describe_job
from .will import Will

__all__ = ["MAX_COMPLETE_DELAY", "Settlement", "Settler", "settled_outcome", "settlement_for"]

#: What a job's settling is called in the metrics (qless_pool_jobs_total{outcome}).
OUTCOMES = {"complete": "completed", "fail": "failed", "retry": "retried", "put": "moved",
            "move": "moved", "cancel": "canceled"}  # fmt: skip

log = logger.getChild("worker")

#: The longest a returned job's ``complete`` waits for a pop to travel with.
MAX_COMPLETE_DELAY = 1.0


@dataclass
class Settlement:
    """A job whose run ended without the job settling it, and what to send for it."""

    job: dict[str, Any]
    command: list[Any]  # e.g. ["retry", jid, queue, worker, 0, group, message]
    reason: str  # why, for the log
    seconds: float = 0.0  # how long the job ran
    due: float = 0.0  # monotonic: a batched complete goes by then, pop or not

    @property
    def batched(self) -> bool:
        """Sent with the next pop: a ``complete`` (qless checks its owner itself)."""
        return bool(self.command[0] == "complete")


def settlement_for(run: JobRun, worker: str, job_timeout: Optional[float]) -> Optional[Settlement]:
    """How to settle ``run``'s job (None: the job settled itself; its log line is written
    here). A complete owed goes by the time its lock is due a heartbeat (``run.lock_due``), or
    within MAX_COMPLETE_DELAY, with a pop or without."""
    job, report = run.job, run.report
    if report.outcome == "returned":  # even if its run was then cut short: complete() was called
        if report.cut_short:
            log.warning(
                "%s called complete() and then its run was cut short (%s); completing it",
                describe_job(job),
                "timeout" if run.timed_out else run.kill_reason or _ended(run.status),
            )
        command = ["complete", job["jid"], worker, job["queue"], report.data or "{}"]
        due = min(run.lock_due, time.monotonic() + MAX_COMPLETE_DELAY)
        return Settlement(job, command, "completed", report.seconds, due)
    if report.outcome:
        log.info("%s: %s in %.3fs", describe_job(job), _described(report), report.seconds)
        return None
    if report.unreported:
        command = report.unreported
        reason = f"its run could not report {command[0]} (Redis was unreachable)"
        return Settlement(job, command, reason, report.seconds)
    if run.timed_out:
        message = f"killed after running longer than the job timeout ({job_timeout:g}s)"
        group = f"{job['queue']}-TimeoutError"
        return Settlement(job, ["fail", job["jid"], worker, group, message, job["data"]], message)
    ended = _ended(run.status)
    if run.kill_reason:
        ended = run.kill_reason if run.status is None else f"{run.kill_reason}: {ended}"
    message = f"{ended}; the job did not complete or fail"
    group = f"{job['queue']}-DirtyExit"
    return Settlement(job, ["retry", job["jid"], job["queue"], worker, 0, group, message], message)


def _ended(status: Optional[int]) -> str:
    """How a run ended that did not report: its child's wait status (None: it ran in the
    worker process, or its child reported and is still exiting)."""
    if status is None:
        return "the job was interrupted"
    if status < 0:
        return "its child vanished"
    if os.WIFSIGNALED(status):
        return f"its child was {lifeline.describe_status(status)}"  # killed by SIG...
    return f"its child exited with status {os.WEXITSTATUS(status)}"


def _described(report: Report) -> str:
    text = settled_outcome(report)
    return f"{text} ({report.group})" if report.group else text


def settled_outcome(report: Report) -> str:
    """How a job that settled itself ended: completed, failed, retried, moved or canceled."""
    return OUTCOMES.get(report.outcome or "", str(report.outcome))


class Settler:
    """The settlements a worker owes qless: the ones to send now, one by one, each after a look
    at the job; and the completes to send with the next pop."""

    def __init__(
        self,
        worker: str,
        observe: Optional[Callable[[dict[str, Any], str, float], None]] = None,
        will: Optional[Will] = None,
    ):
        self.worker = worker
        self.observe = observe or (lambda job, outcome, seconds: None)
        # What is owed is written in the worker's will (will.py) until it is sent: if the
        # worker dies first, it is sent for it.
        self.will = will
        self.now: deque[Settlement] = deque()
        self.batched: list[Settlement] = []
        self._due: Optional[float] = None  # the earliest of the batched ones' (asked every turn)

    def __bool__(self) -> bool:
        return bool(self.now or self.batched)

    def add(self, settlement: Settlement) -> None:
        if self.will is not None:
            self.will.owe(settlement.command)
        if not settlement.batched:
            self.now.append(settlement)
            return
        self.batched.append(settlement)
        if self._due is None or settlement.due < self._due:
            self._due = settlement.due

    def complete_due(self) -> Optional[float]:
        """When the batched completes must go, with or without a pop (monotonic)."""
        return self._due if self.batched else None

    def _sent_batched(self) -> None:
        """The batched ones are sent (or given up): none is owed."""
        self.batched = []
        self._due = None
        self._paid()

    def _paid(self) -> None:
        """Nothing is owed any more: the will starts again."""
        if self.will is not None and not self.now and not self.batched:
            self.will.paid()

    def send_now(self, client: qless.Client) -> None:
        """Send the settlements that do not wait for a pop (Redis being down raises; what is
        not sent stays)."""
        if not self.now:
            return
        while self.now:
            self._send_checked(client, self.now[0])
            self.now.popleft()
        self._paid()

    def send_with(self, client: qless.Client, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """Send the batched completes and ``commands`` (a pop) in one round trip; returns the
        answers to ``commands``."""
        batch = self.batched
        answers = pipelined(client, [s.command for s in batch] + [list(c) for c in commands])
        raise_if_down(answers)  # the completes stay owed; a complete sent twice is refused
        self._sent_batched()
        for settlement, answer in zip(batch, answers):
            what = describe_job(settlement.job)
            if isinstance(answer, QlessException):
                log.info("%s: qless refused complete: %s", what, answer)
            else:
                log.info("%s: completed in %.3fs", what, settlement.seconds)
                self.observe(settlement.job, "completed", settlement.seconds)
        return answers[len(batch) :]

    def _send_checked(self, client: qless.Client, settlement: Settlement) -> None:
        job = settlement.job
        what = describe_job(job)
        state, owner = client.redis.hmget(f"ql:j:{job['jid']}", "state", "worker")
        if state != "running" or owner != self.worker:
            log.info(
                "%s: %s; it is no longer ours (%s), nothing to do", what, settlement.reason, state
            )
            return
        command = settlement.command
        try:
            result = client(*command)
        except QlessException as refused:
            if redis_is_down(refused):
                raise  # kept, and sent once Redis takes writes again
            log.info("%s: qless refused %s: %s", what, command[0], refused)
            return
        exhausted = command[0] == "retry" and int(result) < 0
        outcome = "failed" if exhausted else OUTCOMES.get(command[0], command[0])
        self.observe(job, outcome, settlement.seconds)
        if command[0] == "retry":
            outcome = "failed, out of retries" if exhausted else f"{result} retries left"
            log.warning("%s handed back with retry (%s): %s", what, outcome, settlement.reason)
        elif command[0] == "fail" and command[3].endswith("-TimeoutError"):
            log.warning("%s: failed as %s: %s", what, command[3], settlement.reason)
        else:
            log.warning("%s: sent %s for it, as %s", what, command[0], settlement.reason)

    def forbid(self, client: qless.Client, job: dict[str, Any], allowed: Sequence[str]) -> None:
        """Fail a job whose class is outside the allowlist (--allow-module), before anything of
        it is imported."""
        message = (
            f"job class {job['klass']!r} is not in a module this worker may import "
            f"(--allow-module {' '.join(allowed)})"
        )
        what = describe_job(job)
        group = f"{job['queue']}-ForbiddenClass"
        log.warning("%s: %s; failed as %s", what, message, group)
        try:
            client("fail", job["jid"], self.worker, group, message)
        except QlessException as refused:
            if redis_is_down(refused):
                raise  # its lock expires; it is forbidden again by whoever pops it next
            log.info("%s: qless refused fail: %s", what, refused)
            return
        self.observe(job, "failed", 0.0)

    def abandon(self) -> None:
        """The worker is stopping and Redis is unreachable: say what is left unsettled."""
        for settlement in [*self.now, *self.batched]:
            log.warning(
                "job %s is left running in qless: %s; Redis is unreachable, so its lock will "
                "expire and qless will give it to another worker",
                settlement.job["jid"],
                settlement.reason,
            )
        self.now.clear()
        self._sent_batched()
