"""What operators do with qless, over one client: see the queues and the failed jobs, look at a
job, retry, cancel, move, reprioritise, pause and unpause. No command line and no HTTP here:
the ``qless-pool`` commands (commands.py) use it, and so will the web dashboard.

Every answer is plain data (dicts and dataclasses, JSON-ready). A job is qless's own record
(``get``), its ``data`` decoded. An unknown job, group or queue raises :class:`NotFound`; what
qless refuses is said per job in a :class:`Done`; Redis being unreachable raises as redis-py
raises it (``client.redis_is_down`` tells it apart).

Retrying a failed job puts it back in its queue (qless's ``put`` of the same jid): it keeps its
class, data, priority, tags and retry count, its retries are reset, and it leaves its failure
group. Groups are retried or canceled in batches of ``BATCH`` jobs, each read with one
``multiget`` and acted on in one round trip.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import qless
from qless.exceptions import QlessException

from ..client import pipelined

__all__ = [
    "BATCH",
    "JOB_STATES",
    "Done",
    "Interrupted",
    "NotFound",
    "Operations",
    "Page",
    "QueueCounts",
]

#: Jobs read and acted on in one round trip, in a bulk action.
BATCH = 500
#: The states ``Operations.jobs`` lists, as qless counts them for a queue.
JOB_STATES = ("waiting", "running", "scheduled", "stalled", "depends", "recurring")
#: How many refusals a bulk action keeps, to say (it counts them all).
REFUSALS_KEPT = 20


class NotFound(LookupError):
    """No such job, failure group or queue in qless."""


class Interrupted(Exception):
    """A bulk action cut short (Redis went away): ``done`` says what it did before, of
    ``total``; ``in_flight`` jobs were sent and may or may not have been acted on (Redis may
    run commands it received after the client gave up); ``error`` is why."""

    def __init__(self, done: Done, total: int, in_flight: int, error: BaseException):
        super().__init__(str(error))
        self.done, self.total, self.in_flight, self.error = done, total, in_flight, error


@dataclass(frozen=True)
class QueueCounts:
    name: str
    waiting: int
    running: int
    scheduled: int
    stalled: int
    depends: int
    recurring: int
    paused: bool


@dataclass(frozen=True)
class Page:
    """Part of a list: ``total`` in all, ``jobs`` from ``offset`` on."""

    total: int
    offset: int
    jobs: list[dict[str, Any]]


@dataclass
class Done:
    """What a bulk action did: ``acted`` on so many jobs; ``refused`` the others (the first
    REFUSALS_KEPT of them, jid -> why; ``refusals`` counts them all)."""

    acted: int = 0
    refusals: int = 0
    refused: dict[str, str] = field(default_factory=dict)
    refused_jids: set[str] = field(default_factory=set, repr=False)

    def refuse(self, jid: str, why: str) -> None:
        if jid in self.refused_jids:
            return
        self.refused_jids.add(jid)
        self.refusals += 1
        if len(self.refused) < REFUSALS_KEPT:
            self.refused[jid] = why


class Operations:
    """Over one qless client (``qless_pool.connect(url)``)."""

    def __init__(self, client: qless.Client):
        self.client = client

    # --- looking ----------------------------------------------------------------------------

    def queues(self) -> list[QueueCounts]:
        """Every queue qless knows (one that ever had a job), by name."""
        counts = json.loads(self.client("queues"))
        return sorted((_queue_counts(entry) for entry in counts), key=lambda q: q.name)

    def queue(self, name: str) -> QueueCounts:
        """One queue's counts (without counting every queue: qless's ``queues`` of one)."""
        if self.client.redis.zscore("ql:queues", name) is None:
            raise NotFound(_no_queue(name, self.queues()))
        return _queue_counts(json.loads(self.client("queues", name)))

    def queue_names(self) -> list[str]:
        """The names of every queue qless knows, without their counts."""
        names = self.client.redis.zrange("ql:queues", 0, -1)
        return sorted(n.decode() if isinstance(n, bytes) else n for n in names)

    def failure_groups(self) -> dict[str, int]:
        """Failure group -> how many jobs are failed in it."""
        groups = json.loads(self.client("failed"))
        return dict(sorted(groups.items()))

    def failed(self, group: str, offset: int = 0, limit: int = 25) -> Page:
        """The failed jobs of ``group``, newest first, ``limit`` from ``offset``."""
        total, jids = self._failed_jids(group, offset, limit)
        if not total:
            raise NotFound(f"no failed jobs in group {group!r}")
        return Page(total, offset, self._jobs(jids))

    def _failed_jids(self, group: str, offset: int, limit: int) -> tuple[int, list[str]]:
        # qless-core's failed() takes its third argument as the index after the last one
        # (LRANGE start, limit - 1), and encodes an empty list as {}.
        answer = json.loads(self.client("failed", group, offset, offset + limit))
        return answer["total"], list(answer["jobs"] or [])

    def jobs(self, queue: str, state: str, offset: int = 0, limit: int = 25) -> Page:
        """The jobs of ``queue`` in ``state`` (one of JOB_STATES), ``limit`` from ``offset``."""
        if state not in JOB_STATES:
            raise ValueError(f"state {state!r}: one of {', '.join(JOB_STATES)}")
        total = getattr(self.queue(queue), state)
        if state == "waiting":  # in the order pop takes them: priority, then age
            jids = self.client.redis.zrevrange(f"ql:q:{queue}-work", offset, offset + limit - 1)
            jids = [jid.decode() if isinstance(jid, bytes) else jid for jid in jids]
        else:
            jids = list(self.client("jobs", state, queue, offset, limit) or [])
        return Page(total, offset, self._jobs(jids))

    def job(self, jid: str) -> dict[str, Any]:
        """qless's record of ``jid`` (a recurring job's template if it is one)."""
        found = self._jobs([jid])
        if found:
            return found[0]
        recurring = self.client("recur.get", jid)
        if recurring:
            return _decoded(json.loads(recurring))
        raise NotFound(f"no job {jid!r}")

    def _jobs(self, jids: Sequence[str]) -> list[dict[str, Any]]:
        """The records of ``jids`` that exist, in that order."""
        if not jids:
            return []
        found = json.loads(self.client("multiget", *jids))
        return [_decoded(job) for job in found if job]

    # --- acting on jobs ---------------------------------------------------------------------

    def retry(self, jids: Iterable[str]) -> Done:
        """Put each failed job back in its queue; a job that is not failed is refused. A jid
        named twice is acted on once."""
        return self._in_batches(list(dict.fromkeys(jids)), self._retry_batch)

    def cancel(self, jids: Iterable[str]) -> Done:
        """Cancel each job, whatever its state (qless refuses one that others depend on); a
        recurring job stops recurring."""
        return self._in_batches(list(dict.fromkeys(jids)), self._cancel_batch)

    def retry_group(self, group: str) -> Done:
        """Retry every failed job of ``group``, a batch at a time (NotFound if it has none)."""
        return self._whole_group(group, self._retry_batch)

    def cancel_group(self, group: str) -> Done:
        """Cancel every failed job of ``group``, a batch at a time (NotFound if it has none)."""
        return self._whole_group(group, self._cancel_batch)

    def move(self, jid: str, queue: str) -> None:
        """Put ``jid`` in ``queue`` to wait (it keeps its data, priority, tags and retries)."""
        job = self.job(jid)
        self.client("put", queue, jid, job["klass"], json.dumps(job["data"]), 0)

    def set_priority(self, jid: str, priority: int) -> None:
        self.job(jid)  # NotFound
        self.client("priority", jid, priority)

    def tag(self, jid: str, tags: Sequence[str]) -> None:
        self.job(jid)  # NotFound
        if tags:
            self.client("tag", "add", jid, *tags)

    def untag(self, jid: str, tags: Sequence[str]) -> None:
        self.job(jid)
        if tags:
            self.client("tag", "remove", jid, *tags)

    def track(self, jid: str, tracked: bool = True) -> None:
        """Track ``jid`` (qless publishes its every step) or stop tracking it."""
        self.job(jid)
        self.client("track", "track" if tracked else "untrack", jid)

    def workers(self) -> list[dict[str, Any]]:
        """qless's workers, each with the jids it runs now and those that stalled on it."""
        listed = json.loads(self.client("workers"))
        names = [worker["name"] for worker in listed]
        answers = pipelined(self.client, [["workers", name] for name in names])
        found = []
        for name, answer in zip(names, answers):
            held = {} if isinstance(answer, Exception) else json.loads(answer)
            found.append(
                {"name": name, "jobs": list(held.get("jobs") or []),
                 "stalled": list(held.get("stalled") or [])}
            )  # fmt: skip
        return found

    def pause(self, queue: str) -> None:
        """Pause a queue qless knows: no worker pops from it until unpaused."""
        self.queue(queue)  # NotFound: a typo would pause nothing
        self.client("pause", queue)

    def unpause(self, queue: str) -> None:
        self.queue(queue)
        self.client("unpause", queue)

    # --- the batches ------------------------------------------------------------------------

    def _whole_group(self, group: str, act: Any) -> Done:
        """Act on the jobs failed in ``group`` when the action began, a batch at a time. A job
        that fails again meanwhile (a live pool runs the retried ones at once) is not acted on
        twice, and one failed after the start is left for the next action."""
        total, _ = self._failed_jids(group, 0, 1)
        _, jids = self._failed_jids(group, 0, total) if total else (0, [])  # as it is now
        if not jids:
            raise NotFound(f"no failed jobs in group {group!r}")
        return self._in_batches(list(dict.fromkeys(jids)), act)

    def _in_batches(self, jids: list[str], act: Any) -> Done:
        done = Done()
        for batch in _batches(jids):
            try:
                act(batch, done)
            except Exception as error:
                if done.acted or done.refusals:  # what was done must be said
                    raise Interrupted(done, len(jids), len(batch), error) from error
                raise
        return done

    def _retry_batch(self, jids: Sequence[str], done: Done) -> None:
        records = self._by_jid(jids)
        puts, order = [], []
        for jid in jids:
            job = records.get(jid)
            if job is None:
                done.refuse(jid, self._missing(jid))
            elif job["state"] != "failed":
                done.refuse(jid, f"not failed ({job['state']})")
            else:
                puts.append(["put", job["queue"], jid, job["klass"], job["data"], 0])
                order.append(jid)
        for jid, answer in zip(order, pipelined(self.client, puts)):
            if isinstance(answer, QlessException):
                done.refuse(jid, _refusal(answer))
            else:
                done.acted += 1

    def _cancel_batch(self, jids: Sequence[str], done: Done) -> None:
        records = self._by_jid(jids)
        known = [jid for jid in jids if jid in records]
        for jid in jids:
            if jid in records:
                continue
            if self.client("recur.get", jid):  # a recurring job: it stops recurring
                self.client("unrecur", jid)
                done.acted += 1
            else:
                done.refuse(jid, "no such job")
        if not known:
            return
        try:  # all at once: qless refuses the lot if one is a dependency of a job not canceled
            self.client("cancel", *known)
            done.acted += len(known)
            return
        except QlessException:
            pass
        for jid, answer in zip(known, pipelined(self.client, [["cancel", jid] for jid in known])):
            if isinstance(answer, QlessException):
                done.refuse(jid, _refusal(answer))
            else:
                done.acted += 1

    def _missing(self, jid: str) -> str:
        """Why a jid has no job record: a recurring job's, or none at all."""
        if self.client("recur.get", jid):
            return "a recurring job, not failed (cancel stops it recurring)"
        return "no such job"

    def _by_jid(self, jids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """jid -> its record as qless keeps it (``data`` still JSON text), for those that exist."""
        if not jids:
            return {}
        found = json.loads(self.client("multiget", *jids))
        return {job["jid"]: job for job in found if job}


def _batches(jids: list[str]) -> Iterable[list[str]]:
    for start in range(0, len(jids), BATCH):
        yield jids[start : start + BATCH]


def _queue_counts(entry: dict[str, Any]) -> QueueCounts:
    return QueueCounts(
        name=entry["name"],
        waiting=entry.get("waiting", 0),
        running=entry.get("running", 0),
        scheduled=entry.get("scheduled", 0),
        stalled=entry.get("stalled", 0),
        depends=entry.get("depends", 0),
        recurring=entry.get("recurring", 0),
        paused=bool(entry.get("paused")),
    )


def _no_queue(name: str, known: list[QueueCounts]) -> str:
    hint = ""
    if "," in name or any(c.isspace() for c in name):
        hint = " (name one queue: a queue list is not a queue)"
    names = ", ".join(q.name for q in known[:10]) + (", ..." if len(known) > 10 else "")
    return f"no queue {name!r} in qless{hint}; its queues: {names or 'none yet'}"


def _decoded(job: dict[str, Any]) -> dict[str, Any]:
    """qless's record with its ``data`` decoded (left as text if it is not JSON)."""
    data = job.get("data")
    if isinstance(data, str):
        try:
            job = {**job, "data": json.loads(data)}
        except ValueError:
            pass
    return job


def _refusal(error: QlessException) -> str:
    """qless's refusal without the script's places (``user_script:219: Cancel(): ...``,
    ``... script: <sha>, on @user_script:9``)."""
    text = str(error).split(" script: ", 1)[0]
    return re.sub(r"^(?:@?user_script:\d+: )+", "", text)
