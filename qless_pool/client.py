"""The qless client: qless-py's ``Client``, made to work on Redis 6.2.7 and later.

qless-py 0.11.4 (its last release) runs one Lua script, qless-core, for every command. That
script defines ``function table.extend``: a write to the global ``table`` library. Redis 6.2.7
made the globals of scripts read-only, so on any modern Redis every qless call fails with
"Attempt to modify a readonly table" (qless-py issue 64, never fixed upstream).

The fix is a small transform of the script text: the function becomes a local defined at the
same place (``local function qless_table_extend``) and its two call sites call that local. The
rest of the script is untouched, so behaviour is exactly qless-core's.

Beside it: ``connect()`` (the one way the pool makes a client) and ``pipelined()`` (several
qless commands in one round trip). What the pool calls an outage is outage.py's (its names are
also here, where the pool has always imported them from).

connect() also takes ``redis+sentinel://`` URLs (urls.py): the client's Redis is then the one
redis-py's ``Sentinel.master_for()`` gives, which asks the Sentinels for the master's address
whenever it opens a connection, so a worker that rides out a failover's outage reconnects to
the new master. On every URL, the replies that mean "not now" (READONLY, NOREPLICAS,
MASTERDOWN) are raised as RedisUnavailable, a ConnectionError: an outage, never a refusal.
"""

from __future__ import annotations

import functools
import inspect
import os
import pkgutil
import re
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import qless
import redis
from qless.exceptions import QlessException

from .outage import (
    NO_SUCH_DATABASE,
    REDIS_DOWN,
    Outage,
    RedisUnavailable,
    raise_if_down,
    redis_is_down,
    refuses_for_now,
    unavailable_aware,
)
from .urls import (
    DEFAULT_REDIS_URL,
    SENTINEL_SCHEME,
    SentinelTarget,
    check_redis_url,
    default_redis_url,
    mask_secrets,
    parse_sentinel_url,
)

__all__ = [
    "BATCH_COMMAND",
    "BATCH_LIMIT",
    "CONTROL_TIMEOUT",
    "DEFAULT_REDIS_URL",
    "JOB_SOCKET_TIMEOUT",
    "REDIS_DOWN",
    "Outage",
    "RedisAtStart",
    "RedisUnavailable",
    "connect",
    "control_client",
    "default_redis_url",
    "fix_script",
    "fixed_script",
    "look_at_redis",
    "patch_qless",
    "pipelined",
    "raise_if_down",
    "redis_is_down",
    "sentinel_master",
    "unavailable_aware",
    "use_fixed_script",
    "with_batch_command",
]

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


#: The command fixed_script() adds to qless-core's own: several commands in one call (pipelined).
BATCH_COMMAND = "qless-pool.batch"
#: Where qless-core's script starts dispatching the one command it was called with.
_DISPATCH = re.compile(r"^if #KEYS > 0 then", re.MULTILINE)
#: Every call of qless-core first defines its whole library (some 30 us of Redis's time before
#: the command itself); a batch pays that once. Each command runs as the dispatcher below it
#: would run it, in the order given; one that raises an error does not stop the next ones (as in
#: a pipeline). ARGV: the batch command, now, then per command: the number of its arguments, its
#: name, its arguments. The answer: per command, {1, what it returned} or {0, its error}.
_BATCH_ENTRY = f"""
-- qless-pool: several commands in one call (a batch); see qless_pool/client.py.
if ARGV[1] == '{BATCH_COMMAND}' then
  local now = assert(tonumber(ARGV[2]), 'Arg "now" missing or not a number')
  local answers, at = {{}}, 3
  -- The arguments are taken out inside pcall too: too many for unpack fails that command only.
  local function run(command, first, last)
    return command(now, unpack(ARGV, first, last))
  end
  while at <= #ARGV do
    local count, name = tonumber(ARGV[at]), ARGV[at + 1]
    local command = QlessAPI[name]
    local ok, answer
    if command == nil then
      ok, answer = false, 'Unknown command ' .. tostring(name)
    else
      ok, answer = pcall(run, command, at + 2, at + 1 + count)
    end
    if ok then
      if answer == nil then answer = false end
      answers[#answers + 1] = {{1, answer}}
    else
      if type(answer) == 'table' then answer = answer.err or cjson.encode(answer) end
      answers[#answers + 1] = {{0, tostring(answer)}}
    end
    at = at + 2 + count
  end
  return answers
end

"""


def with_batch_command(source: str) -> str:
    """qless-core's script with BATCH_COMMAND added before its dispatcher (an unknown script
    is refused rather than half-changed)."""
    places = _DISPATCH.findall(source)
    if len(places) != 1:
        raise ValueError(f"qless-core's dispatcher found {len(places)} times; expected once")
    return _DISPATCH.sub(lambda match: _BATCH_ENTRY + match.group(0), source)


@functools.cache
def fixed_script() -> str:
    """qless-core as qless-py ships it, fixed for read-only script globals (read once), with
    BATCH_COMMAND added."""
    data = pkgutil.get_data("qless", "qless-core/qless.lua")
    if data is None:  # pragma: no cover - qless-py always ships the script
        raise RuntimeError("qless-py does not ship qless-core/qless.lua")
    return with_batch_command(fix_script(data.decode("utf-8")))


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


@dataclass(frozen=True)
class RedisAtStart:
    """What a look at Redis found at start: ``refused``, why it refuses the URL's database (a
    bad start); ``unreachable``, why it could not be reached now (an outage the workers ride
    out, said to the operator)."""

    refused: Optional[str] = None
    unreachable: Optional[str] = None


def look_at_redis(url: str, timeout: float = 1.0) -> RedisAtStart:
    """A look at start. The workers would otherwise take a database beyond the server's
    ``databases`` for an outage, and wait for it forever."""
    try:
        client = connect(
            url, "qless-pool-check", announce=False,
            socket_connect_timeout=timeout, socket_timeout=timeout,
        )  # fmt: skip
    except ValueError:
        return RedisAtStart()  # said by check_redis_url, where it is checked
    try:
        client.redis.ping()
    except redis.ResponseError as error:
        if NO_SUCH_DATABASE in str(error):
            return RedisAtStart(
                refused=f"Redis refuses the database of {mask_secrets(url)}: {error} (the "
                "server has as many as its 'databases' setting says, numbered from 0)"
            )
        if redis_is_down(error):
            return RedisAtStart(unreachable=mask_secrets(str(error)))
        return RedisAtStart()
    except Exception as error:  # unreachable, or anything else: for the workers to ride out
        return RedisAtStart(unreachable=mask_secrets(str(error) or type(error).__name__))
    finally:
        client.redis.close()
    return RedisAtStart()


def connect(
    url: str | None = None,
    worker_name: str | None = None,
    *,
    client_class: type[qless.Client] = qless.Client,
    announce: bool = True,
    **redis_options: Any,
) -> qless.Client:
    """Return a ``qless.Client`` for ``url`` that runs the fixed qless-core script.

    ``url`` defaults to :func:`default_redis_url`; ``redis://``, ``rediss://``, ``unix://`` and
    ``redis+sentinel://`` (see urls.py). ``worker_name`` is the name qless records as the owner
    of the jobs this client pops (qless-py defaults to the host name). ``client_class`` may be a
    subclass of ``qless.Client``. Other keyword arguments go to redis-py's connections (options
    in the URL's query win); the protocol is RESP2, the one qless-py was written for, unless
    ``protocol`` says otherwise. ``announce=False`` skips ``CLIENT SETINFO``. No connection is
    opened until the first command. A URL that cannot be used raises ValueError.
    """
    url = check_redis_url(url or default_redis_url())
    if _speaks_tls(url, redis_options):
        # TLS 1.3 servers send their session tickets after the handshake; with no CLIENT
        # SETINFO to read past them, redis-py finds a new connection "has data" and refuses
        # it. The handshake costs far more than the two round trips saved anyway.
        announce = True
    options = {"protocol": 2, **_driver_options(announce), **redis_options}
    if url.split("://", 1)[0].lower() == SENTINEL_SCHEME:
        # qless.Client makes its Redis from a URL, which redis-py cannot read for Sentinel:
        # it is given a placeholder (no connection is ever opened to it) and then the
        # Sentinel-managed Redis, before anything uses it (use_fixed_script registers the
        # script on that one).
        client = client_class(_PLACEHOLDER_URL, hostname=worker_name)
        client.redis = sentinel_master(parse_sentinel_url(url), **options)
    else:
        options.setdefault("connection_class", _connection_class(url))
        client = client_class(url, hostname=worker_name, **options)
    return use_fixed_script(client)


def _speaks_tls(url: str, options: dict[str, Any]) -> bool:
    scheme, _, rest = url.partition("://")
    query = rest.partition("?")[2].lower()
    return (
        scheme.lower() == "rediss"
        or bool(options.get("ssl"))
        or bool(re.search(r"(?:^|&)ssl=(?:1|true|yes|on)(?:&|$)", query))
    )


def control_client(url: Optional[str], role: str) -> qless.Client:
    """A client for one of the pool's own helpers (``role``: drain, status, metrics), named
    ``<host>-<pid>-<role>``, with the short CONTROL_TIMEOUT: a stalled Redis must not hold it."""
    return connect(
        url,
        f"{socket.gethostname()}-{os.getpid()}-{role}",
        socket_connect_timeout=CONTROL_TIMEOUT,
        socket_timeout=CONTROL_TIMEOUT,
    )


_PLACEHOLDER_URL = "redis://localhost:6379/0"
#: The options a master connection's Sentinel lookups share with it.
_SENTINEL_SHARED = ("protocol", "lib_name", "lib_version", "driver_info")


def sentinel_master(target: SentinelTarget, **options: Any) -> redis.Redis:
    """A ``redis.Redis`` for the master of ``target.service``, as its Sentinels name it.

    redis-py asks the Sentinels (the first that answers is asked first from then on) for the
    master's address each time it opens a connection; a connection whose server answers
    READONLY (a demoted master) is dropped, as RedisUnavailable: to the worker, a failover is an
    outage like any other, after which it reconnects to whichever server is master then.
    ``options`` go to the master's connections (the URL's own options win over them); the
    Sentinels get the same socket options and none of redis-py's retries, so that one that is
    down costs one refused connection, not a series of retries.
    """
    from redis.backoff import NoBackoff
    from redis.retry import Retry
    from redis.sentinel import Sentinel, SentinelManagedConnection

    master = {
        "connection_class": unavailable_aware(SentinelManagedConnection),
        **options,
        "decode_responses": True,
        **target.master_options(),
    }
    lookups = {
        key: value
        for key, value in master.items()
        if key.startswith("socket_") or key in _SENTINEL_SHARED
    }
    lookups.update(retry=Retry(NoBackoff(), 0), **target.sentinel_options())
    sentinels = Sentinel(list(target.sentinels), sentinel_kwargs=lookups)
    return sentinels.master_for(target.service, **master)


def _connection_class(url: str) -> type:
    scheme = url.split("://", 1)[0].lower()
    if scheme == "unix":
        return unavailable_aware(redis.UnixDomainSocketConnection)
    if scheme == "rediss":
        return unavailable_aware(redis.SSLConnection)
    return unavailable_aware(redis.Connection)


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


#: What ConnectionPool.get_connection() is given: redis-py before 5.3 needs a command name;
#: later ones warn that it is deprecated.
_COMMAND_NAME: tuple[str, ...] = (
    ()
    if inspect.signature(redis.ConnectionPool.get_connection).parameters["command_name"].default
    is not inspect.Parameter.empty
    else ("EVALSHA",)
)


#: The most commands one call of BATCH_COMMAND runs: Redis serves no other client while a script
#: runs, so a long list (a retry of 500 jobs) goes as several calls, written together. A worker's
#: batch (its completes owed and its pop: 33 at most) is one call.
BATCH_LIMIT = 64


def pipelined(client: qless.Client, commands: Sequence[Sequence[Any]]) -> list[Any]:
    """Send qless commands in one round trip; returns each one's answer, or the
    ``QlessException`` it was refused with (Redis being down raises, as for one command).

    Two or more go as calls of BATCH_COMMAND (BATCH_LIMIT commands a call): each command runs
    as it would alone, one after the other, and Redis defines qless's library once a call.
    Written straight to one pooled connection: redis-py's Pipeline costs a few hundred
    microseconds of Python per call (and, knowing the script, would first ask Redis whether it
    has it, a round trip more). If Redis has lost the script (a restart), it is loaded and the
    calls it refused are sent again: a call refused with NOSCRIPT did not run.
    """
    if not all(commands):
        raise ValueError("an empty qless command")
    if not commands:
        return []
    script = client._lua
    calls = [commands[at : at + BATCH_LIMIT] for at in range(0, len(commands), BATCH_LIMIT)]
    replies: list[Any] = [None] * len(calls)
    todo = list(range(len(calls)))
    for attempt in range(2):
        missing = []
        for index, reply in zip(todo, _send(client, script.sha, [calls[i] for i in todo])):
            if isinstance(reply, redis.exceptions.NoScriptError) and attempt == 0:
                missing.append(index)
            replies[index] = reply
        if not missing:
            break
        script.sha = client.redis.script_load(script.script)
        todo = missing
    return [answer for call, reply in zip(calls, replies) for answer in _answers(call, reply)]


def _send(client: qless.Client, sha: str, calls: Sequence[Sequence[Sequence[Any]]]) -> list[Any]:
    """Each call's reply (a ResponseError if refused), in one round trip. A command refused
    because Redis cannot write now is raised as connect()'s connections raise it for a single
    command (RedisUnavailable), and the connection is dropped."""
    now = repr(time.time())
    packed = []
    for commands in calls:
        if len(commands) == 1:
            packed.append(("EVALSHA", sha, 0, commands[0][0], now, *commands[0][1:]))
        else:
            call: list[Any] = ["EVALSHA", sha, 0, BATCH_COMMAND, now]
            for command in commands:
                call += [len(command) - 1, *command]
            packed.append(tuple(call))
    pool = client.redis.connection_pool
    connection = pool.get_connection(*_COMMAND_NAME)
    try:
        connection.send_packed_command(connection.pack_commands(packed))
        replies = []
        for _ in calls:
            try:
                replies.append(connection.read_response())
            except redis.ResponseError as error:
                replies.append(error)
        for commands, reply in zip(calls, replies):
            if len(commands) > 1 and isinstance(reply, list):
                for ok, answer in reply:
                    if not ok and refuses_for_now(redis.ResponseError(answer)):
                        raise RedisUnavailable(str(answer))
    except BaseException:
        connection.disconnect()  # half a conversation (or a master no more): not for reuse
        raise
    finally:
        pool.release(connection)
    return replies


def _answers(commands: Sequence[Sequence[Any]], reply: Any) -> list[Any]:
    """The answers of a call's commands, from its reply."""
    if isinstance(reply, redis.ResponseError):  # refused whole (busy, out of memory): each one
        return [_refused(reply)] * len(commands)
    if len(commands) == 1:
        return [reply]
    # (Redis 6.2 quotes an error of its own with the line's end.)
    return [answer if ok else _refused(redis.ResponseError(answer.strip())) for ok, answer in reply]


def _refused(error: redis.ResponseError) -> QlessException:
    refused = QlessException(str(error))
    refused.__context__ = error  # redis_is_down() looks for READONLY here
    return refused
