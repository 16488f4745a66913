"""Worker counts that follow the queues: a group whose count is a range (``foo: 1..8``).

The signal is a group's *wait*: how long the job next in line in its queues has waited (the
oldest job of the highest priority waiting; a paused queue counts as empty). The manager never
talks to Redis, so a *sampler* process it forks measures the waits every ``--scale-interval``
and writes them to the manager over a pipe, one JSON line a sample. The manager feeds each
sample to the :class:`Scaler`, which decides, per group, up fast and down slow:

    up     while the wait is longer than --scale-up-after: --scale-step more workers a sample,
           up to the range's MAX (and never past --max-workers for the whole pool)
    down   after --scale-down-after without a waiting job: one worker fewer, down to MIN

A step down asks one worker of the group to *retire if idle* (SIGWINCH to a worker parent): a
worker running a job ignores it (the next sample asks another), an idle one gives back any job
it holds and exits with IDLE_RETIRED; only then does the group's wanted count go down, so no
worker is ever retired mid-job. When Redis is away the sampler reports that, and the counts hold.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Optional

from ..config import Counts, Groups, Queues, Range
from ..logs import logger
from ..worker.signals import IDLE_RETIRED

__all__ = [
    "IDLE_RETIRED",
    "Decision",
    "ScaleSettings",
    "Scaler",
    "read_samples",
    "sample_waits",
]

log = logger.getChild("scaling")

#: Put times decoded from qless's work-queue score outside this window are not trusted (a job
#: whose priority was changed is scored without its put time): its history says instead.
PLAUSIBLE_AGE = 10 * 365 * 86400.0


@dataclass(frozen=True)
class ScaleSettings:
    interval: float = 1.0  # --scale-interval: how often the sampler looks
    up_after: float = 1.0  # --scale-up-after
    down_after: float = 30.0  # --scale-down-after
    step: int = 1  # --scale-step
    cap: int = 1000  # --max-workers: the whole pool's most


@dataclass(frozen=True)
class Decision:
    """What the scaler decided for one group, and why (for the log, status and metrics)."""

    queues: Queues
    action: str  # "up", "down" (a worker asked to retire), "hold" (the cap binds), "set" (HUP)
    wanted: int  # the group's wanted count after it
    reason: str
    at: float = field(default_factory=time.time)

    def as_dict(self) -> dict[str, Any]:
        return {"action": self.action, "wanted": self.wanted, "reason": self.reason, "at": self.at}


@dataclass
class GroupScale:
    """One range group's scaling state."""

    range: Range
    wanted: int
    empty_since: Optional[float] = None  # monotonic: no job waiting since
    wait: Optional[float] = None  # the last sample's wait (None: nothing waits)
    last: Optional[Decision] = None
    ups: int = 0
    downs: int = 0


class Scaler:
    """The rule, over the groups with a range; plain state, fed samples by the manager."""

    def __init__(self, settings: ScaleSettings):
        self.settings = settings
        self.groups: dict[Queues, GroupScale] = {}
        self.capped = False  # the cap bound at the last sample (logged once a binding)
        self.redis_down: Optional[str] = None  # the sampler's last word: Redis is away

    def configure(self, groups: Groups, start: Optional[Counts] = None) -> None:
        """Take the config's groups (at start, and after a HUP): a range group that stays keeps
        its wanted count, clamped into its new range; a new one starts at ``start`` (a reload's
        counts) or at its MIN."""
        kept = {}
        for queues, count in groups.items():
            if not isinstance(count, Range):
                continue
            old = self.groups.get(queues)
            begin = old.wanted if old is not None else (start or {}).get(queues, count.low)
            wanted = min(max(begin, count.low), count.high)
            kept[queues] = (
                replace(old, range=count, wanted=wanted)
                if old is not None
                else GroupScale(count, wanted)
            )
            if old is not None and wanted != old.wanted:  # status's last word is this, now
                kept[queues].last = Decision(queues, "set", wanted,
                                             f"the config's range is now {count}")  # fmt: skip
        self.groups = kept

    def wanted(self) -> Counts:
        return {queues: group.wanted for queues, group in self.groups.items()}

    def observe(
        self, waits: dict[Queues, Optional[float]], fixed_total: int, now: float
    ) -> list[Decision]:
        """One sample: the wait of each range group (None: nothing waits). ``fixed_total``: the
        workers of the groups with a fixed count (they count toward the cap). Returns what to
        do: "up" (the wanted count rose), "down" (ask a worker of the group to retire if idle),
        "hold" (the cap keeps a group from growing)."""
        self.redis_down = None
        decisions = []
        capped = False
        for queues, group in self.groups.items():
            if queues not in waits:
                continue
            wait = group.wait = waits[queues]
            if wait is None:
                group.empty_since = group.empty_since if group.empty_since is not None else now
            else:
                group.empty_since = None
            if wait is not None and wait > self.settings.up_after:
                room = self.settings.cap - fixed_total - self._scaled_total()
                more = min(self.settings.step, group.range.high - group.wanted, max(room, 0))
                if more > 0:
                    group.wanted += more
                    group.ups += 1
                    decisions.append(self._decide(group, queues, "up", (
                        f"the next job has waited {wait:.1f}s (> {self.settings.up_after:g}s)"
                    )))  # fmt: skip
                elif group.wanted < group.range.high:
                    if not self.capped and not capped:  # once a binding, for the first group
                        decisions.append(self._decide(group, queues, "hold", (
                            f"the next job has waited {wait:.1f}s, but the pool runs "
                            f"--max-workers {self.settings.cap} already"
                        )))  # fmt: skip
                    capped = True
            elif (
                wait is None
                and group.wanted > group.range.low
                and group.empty_since is not None
                and now - group.empty_since >= self.settings.down_after
            ):
                decisions.append(self._decide(group, queues, "down", (
                    f"no job waited for {now - group.empty_since:.0f}s "
                    f"(>= {self.settings.down_after:g}s)"
                ), wanted=group.wanted - 1))  # fmt: skip
        self.capped = capped
        return decisions

    def retired(self, queues: Queues, now: float) -> None:
        """A worker of ``queues`` retired, idle: one fewer wanted; the next step down waits
        another --scale-down-after."""
        group = self.groups.get(queues)
        if group is not None and group.wanted > group.range.low:
            group.wanted -= 1
            group.downs += 1
            group.empty_since = now

    def unavailable(self, error: str) -> None:
        """The sampler cannot reach Redis: the counts hold where they are."""
        self.redis_down = error
        for group in self.groups.values():
            group.empty_since = None  # a quiet period starts again when Redis answers

    def _scaled_total(self) -> int:
        return sum(group.wanted for group in self.groups.values())

    def _decide(
        self, group: GroupScale, queues: Queues, action: str, reason: str,
        wanted: Optional[int] = None,
    ) -> Decision:  # fmt: skip
        decision = Decision(queues, action, group.wanted if wanted is None else wanted, reason)
        group.last = decision
        return decision

    def report(self) -> dict[Queues, dict[str, Any]]:
        """Per range group, for status and metrics: range, wanted, wait, last decision, events."""
        return {
            queues: {
                "range": str(group.range),
                "wanted": group.wanted,
                "wait": group.wait,
                "last": group.last.as_dict() if group.last else None,
                "ups": group.ups,
                "downs": group.downs,
            }
            for queues, group in self.groups.items()
        }


# --- the sampler: a child of the manager, the only part that talks to Redis ---------------------


def sample_waits(
    client: Any, groups: Iterable[Queues], now: float
) -> dict[Queues, Optional[float]]:
    """Each group's wait (seconds the job next in line has waited; None: nothing waits), in
    two round trips for all of them."""
    groups = list(groups)
    queues = list(dict.fromkeys(q for group in groups for q in group))
    redis = client.redis
    looks = redis.pipeline(transaction=False)
    for queue in queues:
        looks.sismember("ql:paused_queues", queue)
        looks.zrevrange(f"ql:q:{queue}-work", 0, 0, withscores=True)
    answers = looks.execute()
    heads: dict[str, tuple[str, float]] = {}
    for index, queue in enumerate(queues):
        paused, head = answers[2 * index], answers[2 * index + 1]
        if head and not paused:
            jid, score = head[0]
            heads[queue] = (jid.decode() if isinstance(jid, bytes) else jid, score)
    ages = _ages(redis, heads, now)
    waits: dict[Queues, Optional[float]] = {}
    for group in groups:
        found = [ages[q] for q in group if q in ages]
        waits[group] = max(found) if found else None
    return waits


def _ages(redis: Any, heads: dict[str, tuple[str, float]], now: float) -> dict[str, float]:
    """How long each queue's head job has waited: from its score (priority - put time / 1e10,
    qless-core's work queue), else (a job whose priority was changed is scored without its put
    time) from its history's last put, a round trip more."""
    if not heads:
        return {}
    ask = redis.pipeline(transaction=False)
    for jid, _ in heads.values():
        ask.hget(f"ql:j:{jid}", "priority")
    puts: dict[str, float] = {}
    unsure: dict[str, str] = {}
    for (queue, (jid, score)), priority in zip(heads.items(), ask.execute()):
        try:
            put = (float(priority) - score) * 1e10
        except (TypeError, ValueError):
            continue  # the job went meanwhile
        if 0 <= now - put <= PLAUSIBLE_AGE:
            puts[queue] = put
        else:
            unsure[queue] = jid
    if unsure:
        ask = redis.pipeline(transaction=False)
        for jid in unsure.values():
            ask.lrange(f"ql:j:{jid}-history", -20, -1)
        for queue, history in zip(unsure, ask.execute()):
            puts[queue] = _last_put(history, now)
    return {queue: max(0.0, now - put) for queue, put in puts.items()}


def _last_put(history: list[Any], now: float) -> float:
    """The time of the last ``put`` among qless's history entries (JSON each), else now."""
    for entry in reversed(history):
        try:
            event = json.loads(entry)
            if isinstance(event, list):  # qless-core keeps [when, what, {details}]
                event = {"when": event[0], "what": event[1]}
            if event.get("what") == "put":
                return float(event["when"])
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            continue
    return now


def run_sampler(
    url: str, groups: Sequence[Queues], interval: float, write_fd: int, appname: Optional[str]
) -> int:
    """The sampler's loop: a sample each ``interval`` seconds, one JSON line each on
    ``write_fd`` (``{"waits": {"foo,bar": 2.5 or null}}`` or ``{"down": "why"}``)."""
    from ..client import control_client, redis_is_down
    from ..proctitle import set_title

    set_title(f"qless-pool-scaler{f'[{appname}]' if appname else ''}")
    client = control_client(url, "scaler")
    down = False
    while True:
        started = time.monotonic()
        try:
            waits = sample_waits(client, groups, time.time())
            line: dict[str, Any] = {"waits": {",".join(q): w for q, w in waits.items()}}
            if down:
                log.info("scaler: Redis answers again")
                down = False
        except Exception as error:
            if not redis_is_down(error) and not _is_redis_error(error):
                raise
            if not down:
                log.warning("scaler: Redis is unreachable; the counts hold: %s", error)
                down = True
            line = {"down": str(error)[:200]}
        try:
            os.write(write_fd, (json.dumps(line) + "\n").encode())
        except BrokenPipeError:
            return 0  # the manager is gone
        time.sleep(max(0.0, interval - (time.monotonic() - started)))


def _is_redis_error(error: BaseException) -> bool:
    import redis

    return isinstance(error, redis.RedisError)


def read_samples(buffer: bytearray, data: bytes) -> list[dict[str, Any]]:
    """The whole lines among what arrived (``buffer`` keeps a partial one)."""
    buffer += data
    *lines, rest = bytes(buffer).split(b"\n")
    buffer[:] = rest
    found = []
    for line in lines:
        try:
            sample = json.loads(line)
        except ValueError:
            continue
        if isinstance(sample, dict):
            found.append(sample)
    return found
