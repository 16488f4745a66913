"""The qless client: qless-py's ``Client``, made to work on Redis 6.2.7 and later.

qless-py 0.11.4 (its last release) runs one Lua script, qless-core, for every command. That
script defines ``function table.extend``: a write to the global ``table`` library. Redis 6.2.7
made the globals of scripts read-only, so on any modern Redis every qless call fails with
"Attempt to modify a readonly table" (qless-py issue 64, never fixed upstream).

The fix is a small transform of the script text: the function becomes a local defined at the
same place (``local function qless_table_extend``) and its two call sites call that local. The
rest of the script is untouched, so behaviour is exactly qless-core's.

Beside it: ``connect()`` (the one way the pool makes a client), ``pipelined()`` (several qless
commands in one round trip), and what the pool calls an outage: ``redis_is_down()`` tells Redis
being away (or refusing writes for now) from a refusal by qless, and ``Outage`` paces the
attempts to reach it again.
"""

from __future__ import annotations

import functools
import logging
import pkgutil
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import qless
import redis
from qless.exceptions import QlessException

from .urls import DEFAULT_REDIS_URL, check_redis_url, default_redis_url

__all__ = [
    "CONTROL_TIMEOUT",
    "DEFAULT_REDIS_URL",
    "JOB_SOCKET_TIMEOUT",
    "REDIS_DOWN",
    "Outage",
    "connect",
    "default_redis_url",
    "fix_script",
    "fixed_script",
    "patch_qless",
    "pipelined",
    "raise_if_down",
    "redis_is_down",
    "use_fixed_script",
]

#: The errors that mean "Redis is not there right now" (down, restarting, loading, unreachable),
#: as opposed to a refusal by qless (``QlessException``).
REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError)
#: The longest pause between two attempts to reach Redis during an outage.
MAX_OUTAGE_BACKOFF = 30.0
#: How long the pool's own calls (a worker parent's pop, heartbeat and settling, the drain
#: watcher's looks) wait for Redis to accept a connection or to answer. Short, so that a Redis
#: that stalls (accepts connections and never answers) cannot keep a worker from seeing QUIT,
#: TERM or INT for long: the worker acts on signals between calls. A call that times out is an
#: outage, retried with backoff. A healthy Redis answers qless's calls in well under 10 ms.
CONTROL_TIMEOUT = 3.0
#: How long a job's own client waits for an answer: a job may send slow commands on purpose.
JOB_SOCKET_TIMEOUT = 30.0

LOCAL_EXTEND = "qless_table_extend"
_EXTEND_DEFINITION = re.compile(r"^function\s+table\.extend\s*\(", re.MULTILINE)
_EXTEND_CALL = re.compile(r"\btable\.extend\s*\(")
_PATCHED = "_qless_pool_patched"


def fix_script(source: str) -> str:
    """Return qless-core's Lua with its global ``table.extend`` turned into a local function.

    A script that does not define ``table.extend`` (a future, fixed qless-core) is returned
    unchanged; one that defines it more than once is not the script this transform was written
    for, and is refused rather than half-fixed.
    """
    definitions = len(_EXTEND_DEFINITION.findall(source))
    if definitions == 0:
        return source
    if definitions > 1:
        raise ValueError(f"qless-core defines table.extend {definitions} times; expected once")
    # The definition is rewritten first, so the call pattern no longer matches it.
    source = _EXTEND_DEFINITION.sub(f"local function {LOCAL_EXTEND}(", source)
    return _EXTEND_CALL.sub(f"{LOCAL_EXTEND}(", source)


@functools.cache
def fixed_script() -> str:
    """qless-core as qless-py ships it, fixed for read-only script globals (read once)."""
    data = pkgutil.get_data("qless", "qless-core/qless.lua")
    if data is None:  # pragma: no cover - qless-py always ships the script
        raise RuntimeError("qless-py does not ship qless-core/qless.lua")
    return fix_script(data.decode("utf-8"))


def use_fixed_script(client: qless.Client) -> qless.Client:
    """Point an existing ``qless.Client`` at the fixed script; returns the client."""
    client._lua = client.redis.register_script(fixed_script())
    return client


@functools.cache
def _driver_options(announce: bool = True) -> dict[str, Any]:
    """How a connection names itself (``CLIENT SETINFO``), without redis-py looking up its own
    version: redis-py 8 reads its package metadata for every new connection unless it is told
    the version (about 3 ms, most of what a forked job child spent on connecting).

    ``announce=False`` sends no ``CLIENT SETINFO`` at all: two round trips fewer for a
    connection that lives for one job.
    """
    from . import __version__

    try:
        from redis.driver_info import DriverInfo
    except ImportError:  # redis-py 5 to 7
        if not announce:
            return {"lib_name": None, "lib_version": None}
        return {
            "lib_name": f"redis-py(qless-pool_v{__version__})",
            "lib_version": redis.__version__,
        }
    if not announce:
        return {"driver_info": None}
    info = DriverInfo(name="redis-py", lib_version=redis.__version__)
    return {"driver_info": info.add_upstream_driver("qless-pool", __version__)}


@dataclass
class Outage:
    """Redis being away: logged once (to ``log``) when it starts and once when it ends, and
    retried with an exponential backoff capped at MAX_OUTAGE_BACKOFF seconds."""

    log: logging.Logger
    since: Optional[float] = None
    delay: float = 0.0
    retry_at: float = 0.0

    def ready(self, now: float) -> bool:
        return now >= self.retry_at

    def failed(self, now: float, error: BaseException) -> None:
        if self.since is None:
            self.since = now
            self.log.error("Redis is unavailable (%s); retrying with backoff", error)
        self.delay = min(max(self.delay * 2, 0.5), MAX_OUTAGE_BACKOFF)
        self.retry_at = now + self.delay

    def recovered(self, now: float) -> None:
        if self.since is not None:
            self.log.warning("Redis is back after %.1fs", now - self.since)
        self.since, self.delay, self.retry_at = None, 0.0, 0.0


def redis_is_down(error: BaseException) -> bool:
    """Is ``error`` Redis being away rather than a refusal by qless? Away: down, restarting,
    loading, unreachable, or refusing writes for now (a read-only replica after a failover, a
    master whose replica link is down, a failed snapshot, maxmemory reached). qless-py turns
    every error reply into a plain ``QlessException``: Redis 7 answers a script with the error
    itself (kept as the exception's context), Redis 6.2 with a script error quoting it."""
    if isinstance(error, REDIS_DOWN):
        return True
    if not isinstance(error, QlessException):
        return False
    return isinstance(error.__context__, _REFUSING_WRITES_ERRORS) or bool(
        _REFUSING_WRITES.search(str(error))
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
    r"\b(?:READONLY You can't write|MISCONF |MASTERDOWN |command not allowed when used memory)"
)


def connect(
    url: str | None = None,
    worker_name: str | None = None,
    *,
    client_class: type[qless.Client] = qless.Client,
    announce: bool = True,
    **redis_options: Any,
) -> qless.Client:
    """Return a ``qless.Client`` for ``url`` that runs the fixed qless-core script.

    ``url`` defaults to :func:`default_redis_url`. ``worker_name`` is the name qless records as
    the owner of the jobs this client pops (qless-py defaults to the host name). ``client_class``
    may be a subclass of ``qless.Client``. Other keyword arguments go to
    ``redis.Redis.from_url``; the protocol is RESP2, the one qless-py was written for, unless
    ``protocol`` says otherwise. ``announce=False`` skips ``CLIENT SETINFO``. No connection is
    opened until the first command. A URL that cannot be used raises ValueError.
    """
    options = {"protocol": 2, **_driver_options(announce), **redis_options}
    url = check_redis_url(url or default_redis_url())
    client = client_class(url, hostname=worker_name, **options)
    return use_fixed_script(client)


def patch_qless() -> None:
    """Make every ``qless.Client()`` made from now on in this process use the fixed script.

    For code that builds its own clients (job producers, scripts, the qless-py worker). Safe to
    call more than once. This is the one place qless-pool changes another library's class.
    """
    cls = qless.Client
    if getattr(cls.__init__, _PATCHED, False):
        return
    original_init = cls.__init__

    @functools.wraps(original_init)
    def __init__(self: qless.Client, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        use_fixed_script(self)

    setattr(__init__, _PATCHED, True)
    cls.__init__ = __init__


def pipelined(client: qless.Client, commands: Sequence[Sequence[Any]]) -> list[Any]:
    """Send qless commands in one round trip; returns each one's answer, or the
    ``QlessException`` it was refused with (Redis being down raises, as for one command).

    Written straight to one pooled connection: redis-py's Pipeline costs a few hundred
    microseconds of Python per call (and, knowing the script, would first ask Redis whether it
    has it, a round trip more). If Redis has lost the script (a restart), it is loaded and the
    commands it refused are sent again: a command refused with NOSCRIPT did not run.
    """
    script = client._lua
    pool = client.redis.connection_pool
    answers: list[Any] = [None] * len(commands)
    todo = list(range(len(commands)))
    for attempt in range(2):
        now = repr(time.time())
        connection = pool.get_connection("EVALSHA")
        try:
            connection.send_packed_command(
                connection.pack_commands(
                    [
                        ("EVALSHA", script.sha, 0, c[0], now, *c[1:])
                        for c in map(commands.__getitem__, todo)
                    ]
                )
            )
            results = []
            for _ in todo:
                try:
                    results.append(connection.read_response())
                except redis.ResponseError as error:
                    results.append(error)
        except BaseException:
            connection.disconnect()  # half a conversation: not fit for the next caller
            raise
        finally:
            pool.release(connection)
        missing = []
        for index, result in zip(todo, results):
            if isinstance(result, redis.exceptions.NoScriptError) and attempt == 0:
                missing.append(index)
            elif isinstance(result, redis.ResponseError):
                refused = QlessException(str(result))
                refused.__context__ = result  # redis_is_down() looks for READONLY here
                answers[index] = refused
            else:
                answers[index] = result
        if not missing:
            break
        script.sha = client.redis.script_load(script.script)
        todo = missing
    return answers
