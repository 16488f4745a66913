"""Redis being away, as the pool sees it: what counts as an outage (not a refusal by qless),
and riding one out.

``redis_is_down()`` tells Redis being away, or refusing writes for now, from a refusal by qless;
``Outage`` paces the attempts to reach it again; ``unavailable_aware()`` makes a redis-py
connection raise the replies that mean "not now" (READONLY, NOREPLICAS, MASTERDOWN) as
RedisUnavailable, a ConnectionError: an outage at every level, never a refusal.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import redis
from qless.exceptions import QlessException

from .urls import mask_secrets

__all__ = [
    "MAX_OUTAGE_BACKOFF",
    "NO_SUCH_DATABASE",
    "REDIS_DOWN",
    "Outage",
    "RedisUnavailable",
    "raise_if_down",
    "redis_is_down",
    "unavailable_aware",
]

#: The errors that mean "Redis is not there right now" (down, restarting, loading, unreachable),
#: as opposed to a refusal by qless (``QlessException``).
REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError)
#: How Redis refuses a write on a replica (a master demoted by a failover).
_READONLY = "READONLY You can't write against a read only replica"
#: Other refusals that mean "not now" rather than "no": a master with fewer replicas than its
#: min-replicas-to-write, a replica cut off from its master (replica-serve-stale-data no).
_UNAVAILABLE = (_READONLY, "NOREPLICAS Not enough good replicas", "MASTERDOWN Link with MASTER")
#: The longest pause between two attempts to reach Redis during an outage.
MAX_OUTAGE_BACKOFF = 30.0


@dataclass
class Outage:
    """Redis being away: logged once (to ``log``) when it starts and once when it ends, and
    retried with an exponential backoff capped at MAX_OUTAGE_BACKOFF seconds.

    A look that gets through ends the outage only once the next one gets through too: some
    outages let reads (and SUBSCRIBE) through and refuse every write (a demoted master's
    READONLY, a master's NOREPLICAS), and a worker that reads first would otherwise call Redis
    back, then lost again, twice a second, without ever backing off. (A busy worker, which
    writes only to heartbeat, may still take such an outage for over between two heartbeats.)"""

    log: logging.Logger
    since: Optional[float] = None
    error: Optional[str] = None  # what the last look met, while it lasts (for status)
    delay: float = 0.0
    retry_at: float = 0.0
    #: An outage that seems over: (since, when Redis answered again), until the next look.
    ending: Optional[tuple[float, float]] = None

    def ready(self, now: float) -> bool:
        return now >= self.retry_at

    def failed(self, now: float, error: BaseException) -> None:
        if self.since is None:
            if self.ending is not None:  # not over after all: the same outage goes on
                self.since, self.ending = self.ending[0], None
            else:
                self.since = now
                self.log.error("Redis is unavailable (%s); retrying with backoff", _describe(error))
        self.error = mask_secrets(_describe(error))
        self.delay = min(max(self.delay * 2, 0.5), MAX_OUTAGE_BACKOFF)
        self.retry_at = now + self.delay

    def recovered(self, now: float) -> None:
        if self.since is not None:
            self.ending = (self.since, now)
            self.since, self.retry_at, self.error = None, 0.0, None
            return
        if self.ending is not None:
            since, back = self.ending
            self.log.warning("Redis is back after %.1fs", back - since)
        self.ending, self.delay, self.retry_at = None, 0.0, 0.0


def _describe(error: BaseException) -> str:
    """An error, for a log line. redis-py's "No master found" (Sentinel) describes the client of
    every Sentinel it could not reach at length; their addresses are enough."""
    from redis.sentinel import MasterNotFoundError

    text = str(error)
    if isinstance(error, MasterNotFoundError):
        head, _, rest = text.partition(" : ")
        asked = re.findall(r"host=([^,]+),port=(\d+)", rest)
        if asked:
            return f"{head} (Sentinels unreachable: {', '.join(f'{h}:{p}' for h, p in asked)})"
        return head
    return text


def redis_is_down(error: BaseException) -> bool:
    """Is ``error`` Redis being away rather than a refusal by qless? Away: down, restarting,
    loading, unreachable, or refusing writes for now (a read-only replica after a failover, a
    master short of the replicas it must write to, a replica cut off from its master, a failed
    snapshot, maxmemory reached), or busy with another client's script past its busy limit.
    qless-py turns every error reply into a plain ``QlessException``: Redis 7 answers a script
    with the error itself (kept as the exception's context), Redis 6.2 with a script error
    quoting it."""
    if isinstance(error, REDIS_DOWN):
        return True
    if isinstance(error, redis.ResponseError) and NO_SUCH_DATABASE in str(error):
        return True  # refused as the connection selects it: no command can work
    if not isinstance(error, QlessException):
        return False
    return (
        refuses_for_now(error)
        or refuses_for_now(error.__context__)
        or isinstance(error.__context__, _REFUSING_WRITES_ERRORS)
        or bool(_REFUSING_WRITES.search(str(error)))
    )


def raise_if_down(answers: Sequence[Any]) -> None:
    """Raise the first of a pipeline's answers that says Redis is away (redis_is_down), so
    that its caller keeps what it sent for the outage's end instead of taking it as refused."""
    for answer in answers:
        if isinstance(answer, QlessException) and redis_is_down(answer):
            raise answer


#: Redis's own error replies that mean "not now" rather than "no": as redis-py raises them,
#: and as their text reads (MISCONF has no class of its own; Redis 6.2 quotes them in a script
#: error).
_REFUSING_WRITES_ERRORS = (
    redis.exceptions.ReadOnlyError,
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.MasterDownError,
)
_REFUSING_WRITES = re.compile(
    r"\b(?:READONLY You can't write|MISCONF |MASTERDOWN |BUSY |command not allowed when used memory"
    r"|DB index is out of range)"
)
#: How Redis refuses a database number beyond its ``databases`` (the URL's /db).
NO_SUCH_DATABASE = "DB index is out of range"


class RedisUnavailable(redis.ConnectionError):
    """Redis answered, but cannot serve a write now: READONLY (a replica: a master demoted by a
    failover, or a primary's DNS name that has moved on), NOREPLICAS (a master short of its
    min-replicas-to-write), MASTERDOWN (a replica cut off from its master). An outage, like a
    connection that breaks: the connection is dropped (the next one may reach the new master),
    and the command that got it did nothing."""


@functools.cache
def unavailable_aware(base: type) -> type:
    """``base``, a redis-py connection class, made to raise RedisUnavailable for the replies
    above instead of a ResponseError.

    qless-py turns a ResponseError into a QlessException, which the worker reads as qless
    refusing it: a complete sent with a pop, refused NOREPLICAS, would be dropped, and a job
    whose heartbeat was refused READONLY killed. As a ConnectionError it is an outage at every
    level (a single command, a pipeline, a job's own client, which keeps the outcome for the
    worker to report). redis-py's Sentinel connection already turns Redis 7's READONLY into a
    ConnectionError; this also covers Redis 6.2's, which comes as a script error quoting it.
    """

    class Connection(base):  # type: ignore[misc]  # a redis-py connection class, given
        def read_response(self, *args: Any, **kwargs: Any) -> Any:
            try:
                return super().read_response(*args, **kwargs)
            except redis.ResponseError as error:
                if not refuses_for_now(error):
                    raise
                self.disconnect()
                raise RedisUnavailable(_reply(error)) from error

    Connection.__name__ = Connection.__qualname__ = f"Unavailable{base.__name__}"
    return Connection


def refuses_for_now(error: BaseException) -> bool:
    """Is ``error`` a reply that makes a connection's command an outage (RedisUnavailable)?"""
    # (redis-py drops MASTERDOWN from the message of the MasterDownError it raises.)
    down = (redis.exceptions.ReadOnlyError, redis.exceptions.MasterDownError)
    return isinstance(error, down) or any(reply in str(error) for reply in _UNAVAILABLE)


def _reply(error: BaseException) -> str:
    """The error as Redis said it (redis-py drops the READONLY code from its message)."""
    if isinstance(error, redis.exceptions.ReadOnlyError):
        return f"READONLY {error}"
    return str(error)
