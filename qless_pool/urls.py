"""Redis URLs: which ones the pool takes, and how they are shown (never with a password).

``redis://``, ``rediss://`` (TLS) and ``unix://`` are redis-py's own URLs, query options
included (``?ssl_ca_certs=...&socket_keepalive=true``); ``redis+sentinel://`` names Redis
Sentinels and a service (connect() asks them for the service's master, see client.py)::

    redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/service[/db][?options]

Its password is the master's; ``?sentinel_password=`` (and ``sentinel_username=``) is for
Sentinels that want one. The other options are the master connections', as for ``redis://``.

This module is light to import (no qless; redis-py only inside the functions that check a URL's
options): the ``qless-pool`` command uses it to hide a password given on its command line from
``ps`` before it imports anything heavy.
"""

from __future__ import annotations

import functools
import inspect
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional
from urllib.parse import parse_qs, parse_qsl, unquote, urlencode, urlsplit

__all__ = [
    "DEFAULT_REDIS_URL",
    "DEFAULT_SENTINEL_PORT",
    "SCHEMES",
    "SENTINEL_SCHEME",
    "SentinelTarget",
    "check_redis_url",
    "default_redis_url",
    "mask_argument",
    "mask_secrets",
    "parse_sentinel_url",
    "redis_url_and_origin",
]

DEFAULT_REDIS_URL = "redis://localhost:6379/0"

SENTINEL_SCHEME = "redis+sentinel"
#: The port of a Sentinel named without one.
DEFAULT_SENTINEL_PORT = 26379
SENTINEL_FORM = "redis+sentinel://[:password@]host:port[,host:port...]/service[/db]"
#: Query options of a redis+sentinel:// URL that are for the Sentinels, not the master.
SENTINEL_OPTIONS = ("sentinel_username", "sentinel_password")
#: The URL schemes connect() takes.
SCHEMES = ("redis", "rediss", "unix", SENTINEL_SCHEME)
_URL = re.compile(r"\b[a-z][a-z0-9+.-]*://\S+", re.IGNORECASE)
_SCHEME_AT_START = re.compile(r"[a-z][a-z0-9+.-]*://", re.IGNORECASE)
# password=, sentinel_password=, ssl_password= (a key file's passphrase) ...
_QUERY_PASSWORD = re.compile(r"([?&][a-z_]*password=)[^&#\s]*", re.IGNORECASE)


def mask_secrets(text: str) -> str:
    """``text`` with the password of every URL in it shown as ``***``:
    ``redis://:***@host:6379/0`` (also a ``password=`` query parameter)."""
    return _URL.sub(lambda match: _mask_url(match.group(0)), text)


def mask_argument(argument: str) -> str:
    """A command-line argument with its secrets masked: an argument that is a URL (or
    ``--option=URL``) is one URL to its end, even if its password holds a space or a quote."""
    option, equals, value = argument.partition("=")
    if _SCHEME_AT_START.match(argument):
        return _mask_url(argument)
    if option.startswith("-") and equals and _SCHEME_AT_START.match(value):
        return f"{option}={_mask_url(value)}"
    return mask_secrets(argument)


def _mask_url(url: str) -> str:
    # The user information ends at the URL's last "@": a password may hold an unescaped "@",
    # "/", "?", "'" or ":" (not a valid URL, but shown in the message refusing it). An "@"
    # further on (in a query option) masks more than needed, never less.
    scheme, rest = url.split("://", 1)
    userinfo, at, after = rest.rpartition("@")
    if at and ":" in userinfo:
        user = userinfo.split(":", 1)[0]
        if "/" not in user and "?" not in user:
            rest = f"{user}:***@{after}"
    return _QUERY_PASSWORD.sub(r"\1***", f"{scheme}://{rest}")


def check_redis_url(url: str) -> str:
    """Return ``url`` if connect() can use it; else raise ValueError saying why (the URL in the
    message has its password masked). A Redis that is down is not checked for: that is an
    outage, which the workers ride out. Query options are checked against redis-py's
    connection class: an option it does not take, or a value it refuses, would otherwise stop
    every worker at its first command.

    A URL that passed is remembered (a refused one is not): the manager checks it before it
    forks, so a worker's connect() does not check it again. The check reads the signatures of
    redis-py's classes, which in a worker would write to (so copy) hundreds of the pages it
    shares with the manager: about 2 MB a worker."""
    return _checked_url(url)


@functools.lru_cache(maxsize=16)
def _checked_url(url: str) -> str:
    shown = mask_secrets(url)
    if "://" not in url:
        raise ValueError(f"{shown!r} is not a URL; write redis://host:port/db or unix:///path")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise ValueError(
            f"{shown!r}: unsupported scheme {parts.scheme!r}; use "
            + ", ".join(f"{name}://" for name in SCHEMES)
        )
    if scheme == SENTINEL_SCHEME:
        _check_sentinel_options(parse_sentinel_url(url), shown)
        return url
    query = parse_qs(parts.query)
    dbs = [*query.get("db", [])]
    if scheme == "unix":
        if not parts.path:
            raise ValueError(f"{shown!r} names no socket path; write unix:///path/to/redis.sock")
    else:
        if not parts.hostname:
            raise ValueError(f"{shown!r} names no host; write {scheme}://host:port/db")
        try:
            parts.port  # noqa: B018 - parsing it is the check
        except ValueError:
            raise ValueError(f"{shown!r}: the port is not a number from 0 to 65535") from None
        path = parts.path.strip("/")
        if path:
            dbs.append(path)
    for db in dbs:
        if not db.isdigit():
            raise ValueError(f"{shown!r}: the database {db!r} is not a number")
    _check_url_options(url, shown)
    return url


# --- redis+sentinel:// ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SentinelTarget:
    """What a ``redis+sentinel://`` URL names: the Sentinels to ask, the service whose master
    to use, its database and password, and the other query options (as written)."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: Optional[str] = None
    password: Optional[str] = None
    sentinel_username: Optional[str] = None
    sentinel_password: Optional[str] = None
    query: tuple[tuple[str, str], ...] = ()

    def master_options(self) -> dict[str, Any]:
        """Keyword arguments for ``Sentinel.master_for()``: the query options typed as redis-py
        types them in a ``redis://`` URL, then the database and the credentials."""
        from redis.connection import parse_url, to_bool

        options = parse_url(f"redis://localhost/?{urlencode(self.query)}") if self.query else {}
        options.pop("host", None)
        if "check_connection" in options:  # SentinelConnectionPool's: a PING after connecting
            options["check_connection"] = bool(to_bool(options["check_connection"]))
        options.update(db=self.db, username=self.username, password=self.password)
        return options

    def sentinel_options(self) -> dict[str, Any]:
        """Credentials for the Sentinels themselves, if the URL gives any."""
        return {
            key: value
            for key, value in (
                ("username", self.sentinel_username),
                ("password", self.sentinel_password),
            )
            if value is not None
        }


def parse_sentinel_url(url: str) -> SentinelTarget:
    """Read a ``redis+sentinel://`` URL; raise ValueError saying what is wrong with it."""
    shown = mask_secrets(url)
    scheme, _, rest = url.partition("://")
    if scheme.lower() != SENTINEL_SCHEME:
        raise ValueError(f"{shown!r} is not a {SENTINEL_SCHEME}:// URL")
    rest, _, query = rest.partition("?")
    rest = rest.partition("#")[0]
    netloc, _, path = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")  # a password may hold an unescaped "@"
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    if not hosts.strip():
        raise ValueError(f"{shown!r} names no sentinel; write {SENTINEL_FORM}")
    sentinels = []
    for entry in hosts.split(","):
        entry = entry.strip()
        if not entry:
            raise ValueError(f"{shown!r}: an empty sentinel address in {hosts!r}")
        address = urlsplit(f"//{entry}")
        try:
            port = address.port
        except ValueError:
            port = -1
        if not address.hostname or port == -1 or port == 0:
            raise ValueError(
                f"{shown!r}: the sentinel {entry!r} is not host:port with a port from 1 to 65535"
            )
        sentinels.append((address.hostname, port or DEFAULT_SENTINEL_PORT))
    segments = [unquote(segment) for segment in path.split("/")]
    while len(segments) > 1 and segments[-1] == "":
        segments.pop()  # a trailing slash
    service = segments[0]
    if not service:
        raise ValueError(
            f"{shown!r} names no service (the master's name in the Sentinels' "
            f"'sentinel monitor'); write {SENTINEL_FORM}"
        )
    if len(segments) > 2:
        raise ValueError(f"{shown!r}: the path is /service or /service/db; write {SENTINEL_FORM}")
    dbs = segments[1:]
    options = []
    credentials: dict[str, str] = {}
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name == "db":
            dbs = [value]
        elif name in SENTINEL_OPTIONS:
            credentials[name] = value
        else:
            options.append((name, value))
    for db in dbs:
        if not db.isdigit():
            raise ValueError(f"{shown!r}: the database {db!r} is not a number")
    return SentinelTarget(
        sentinels=tuple(sentinels),
        service=service,
        db=int(dbs[0]) if dbs else 0,
        username=username,
        password=password,
        sentinel_username=credentials.get("sentinel_username"),
        sentinel_password=credentials.get("sentinel_password"),
        query=tuple(options),
    )


# --- query options --------------------------------------------------------------------------------


def _check_url_options(url: str, shown: str) -> None:
    """redis-py's own reading of a redis://, rediss:// or unix:// URL, and its connection class
    made (not connected) with what it read."""
    import redis

    try:
        pool = redis.ConnectionPool.from_url(url)
    except ValueError as error:
        raise ValueError(f"{shown!r}: {error}") from None
    names = [name for name, _ in parse_qsl(urlsplit(url).query)]
    _refuse_unknown(names, _parameters(pool.connection_class) | _parameters(type(pool)), shown)
    _check_numbers(pool.connection_kwargs, shown)
    _make(pool.connection_class, pool.connection_kwargs, shown)


def _check_sentinel_options(target: SentinelTarget, shown: str) -> None:
    """The same for a redis+sentinel:// URL: its master connections are redis-py's plain
    ``Connection`` (SentinelManagedConnection passes every option on to it)."""
    from redis.connection import Connection
    from redis.sentinel import SentinelConnectionPool

    try:
        options = target.master_options()
    except ValueError as error:
        raise ValueError(f"{shown!r}: {error}") from None
    # SentinelConnectionPool also takes check_connection (a PING after connecting).
    pool_options = _parameters(SentinelConnectionPool) | {"check_connection"}
    names = [name for name, _ in target.query]
    _refuse_unknown(names, _parameters(Connection) | pool_options, shown)
    _check_numbers(options, shown)
    _make(Connection, {k: v for k, v in options.items() if k not in pool_options}, shown)


#: Arguments of redis-py's classes that are not options a URL could give.
_INTERNAL = frozenset({"connection_class", "connection_pool", "service_name", "sentinel_manager"})


def _refuse_unknown(names: list[str], accepted: set[str], shown: str) -> None:
    for name in names:
        if name in accepted and name not in _INTERNAL:
            continue
        hint = ""
        if name.startswith("ssl"):
            hint = (
                " (TLS to a master found through Sentinel is not supported)"
                if shown.lower().startswith(SENTINEL_SCHEME)
                else " (TLS options need rediss://)"
            )
        raise ValueError(f"{shown!r}: redis-py takes no option {name!r}{hint}")


#: The longest timeout a URL may give: about 115 days (options.MAX_SECONDS).
_MAX_TIMEOUT = 10_000_000.0


def _check_numbers(options: Mapping[str, Any], shown: str) -> None:
    """Timeouts finite and more than 0, intervals finite and not negative: redis-py takes
    ``socket_timeout=nan`` or ``-1`` and then fails on every command."""
    for name, value in options.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if name.endswith("timeout"):
            ok = math.isfinite(value) and 0 < value <= _MAX_TIMEOUT
            needs = "a number of seconds more than 0"
        elif name.endswith("interval"):
            ok = math.isfinite(value) and 0 <= value <= _MAX_TIMEOUT
            needs = "a number of seconds, 0 or more"
        else:
            continue
        if not ok:
            raise ValueError(f"{shown!r}: {name} must be {needs}, not {value!r}")


def _make(connection_class: type, options: Mapping[str, Any], shown: str) -> None:
    try:
        connection_class(**options)  # no connection is opened
    except Exception as error:  # redis-py refusing a value, e.g. ssl_cert_reqs=maybe
        raise ValueError(f"{shown!r}: {error}") from None


def _parameters(cls: type) -> set[str]:
    """The keyword arguments ``cls(...)`` takes: those of every ``__init__`` up its MRO for as
    long as each passes ``**kwargs`` on."""
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        parameters = inspect.signature(init).parameters.values()
        names |= {
            p.name
            for p in parameters
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"
        }
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            break
    return names


#: Where the Redis URL comes from when none is given, in this order.
URL_VARIABLES = ("QLESS_URL", "REDIS_URL")


def default_redis_url(environ: Mapping[str, str] | None = None) -> str:
    """$QLESS_URL, else $REDIS_URL, else redis://localhost:6379/0."""
    return redis_url_and_origin(None, environ)[0]


def redis_url_and_origin(
    given: str | None, environ: Mapping[str, str] | None = None
) -> tuple[str, str]:
    """The URL to use and where it came from (for messages): ``given`` (``"--redis"``), else
    the first of $QLESS_URL and $REDIS_URL that is set, else the default."""
    if given:
        return given, "--redis"
    environ = os.environ if environ is None else environ
    for variable in URL_VARIABLES:
        if environ.get(variable):
            return environ[variable], f"${variable}"
    return DEFAULT_REDIS_URL, "the default"
