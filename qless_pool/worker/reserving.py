"""The worker's part that reserves jobs (a base of base.Worker): pop them from its queues in the
reserver's order, hold them, start them one by one; and act on what qless publishes about them.

With a child per job, a pop takes one job. In process it takes a batch (Prefetch, the jobs
after the first *held*: locked to this worker, heartbeated, given back on TERM). The completes
owed travel with the next pop (settling.py's one batching).
"""

from __future__ import annotations

import json
import time
from typing import Any, Optional

import qless
from qless.exceptions import QlessException

from ..logs import logger
from ..notes import BEGAN, NoteTaker
from .events import Subscriptions
from .reservation import HeldJob, Holding, OrderedReserver, Prefetch, class_allowed
from .runmode import RunMode
from .running import describe_job
from .settling import Settler

__all__ = ["Reserving"]

log = logger.getChild("worker")


class Reserving(RunMode):
    """The worker's reserving (see the module's docstring)."""

    # The worker's, read and set here.
    name: str
    queues: list[str]
    fork_per_job: bool
    interval: float
    client: Optional[qless.Client]
    reserver: OrderedReserver
    prefetch: Prefetch
    holding: Holding
    settler: Settler
    subscriptions: Subscriptions
    allow_modules: tuple[str, ...]
    notes: NoteTaker
    next_poll: float
    began: bool
    #: The job being started was popped by a busy worker, not by one idle (listening for puts).
    streaming: bool = False

    def _handle_events(self, events: list[dict[str, Any]]) -> None:
        for event in events:
            kind = event.get("event")
            if event["channel"] == self.subscriptions.idle_channel:
                if kind == "put" and event.get("queue") in self.queues:
                    self.next_poll = 0.0
                continue
            what = {"lock_lost": "lost its lock", "canceled": "was canceled", "put": "was moved"}
            jid = event.get("jid")
            if kind not in what or not jid or self._job_taken_away(jid, what[kind]):
                continue
            held = self.holding.drop(jid)
            if held is not None:
                log.warning("%s %s before it ran; it is not run here", describe_job(held),
                            what[kind])  # fmt: skip

    def _reserve_and_run(self) -> None:
        count = 1 if self.fork_per_job else self.prefetch.size
        was_idle = self.subscriptions.listening_for_puts
        jobs = self._pop(count)
        # Popped by a busy worker (not one idle, listening for puts): likely one of a stream.
        self.streaming = bool(jobs) and not was_idle
        if not jobs and not self.subscriptions.listening_for_puts:
            # Listen for puts before one more look, so that a put after that look is heard.
            self._handle_events(self.subscriptions.listen_for_puts(True))
            jobs = self._pop(count)
        if not jobs:
            self.next_poll = time.monotonic() + self.interval
            return
        self.next_poll = 0.0
        log.debug("popped %d job(s) (asked for %d)", len(jobs), count)
        self.prefetch.popped(len(jobs))
        # Held first: if Redis goes away from here on, they are heartbeated, given back or run
        # once it is back, like any held job.
        self.holding.hold([HeldJob.popped(job) for job in jobs])
        self.subscriptions.listen_for_puts(False)  # busy: stop hearing every put of qless
        self._run_held()

    def _pop(self, count: int) -> list[dict[str, Any]]:
        """Pop up to ``count`` jobs from the first of the queues (in the reserver's order) that
        has any; the completes owed travel with the first pop (settling.py)."""
        assert self.client is not None
        for queue in self.reserver.order():
            [answer] = self.settler.send_with(self.client, [["pop", queue, self.name, count]])
            self.reserver.tried(queue)
            if isinstance(answer, QlessException):
                raise answer
            jobs = json.loads(answer)
            if jobs:
                return list(jobs)
        return []

    def _run_held(self) -> None:
        """Start the next held job; in process, the ones after it too, one by one, for as long
        as nothing else waits for the loop (the run mode's _next_at_once)."""
        while True:
            held = self.holding.next()
            if held is None:
                return
            if not class_allowed(held.job["klass"], self.allow_modules):
                assert self.client is not None
                self.settler.forbid(self.client, held.job, self.allow_modules)
                return
            if not self.began:
                self.began = True
                self.notes.say(BEGAN)
            self._start_job(held)
            if not self._next_at_once():
                return
