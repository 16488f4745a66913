"""Redis URLs: which ones the pool takes, and how they are shown (never with a password).

This module is light (no qless, no redis): the ``qless-pool`` command uses it to hide a password
given on its command line from ``ps`` before it imports anything heavy.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from urllib.parse import parse_qs, urlsplit

__all__ = [
    "DEFAULT_REDIS_URL",
    "SCHEMES",
    "check_redis_url",
    "default_redis_url",
    "mask_secrets",
    "redis_url_and_origin",
]

DEFAULT_REDIS_URL = "redis://localhost:6379/0"

#: The URL schemes connect() takes.
SCHEMES = ("redis", "rediss", "unix")
_URL = re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s'\"]+", re.IGNORECASE)
_QUERY_PASSWORD = re.compile(r"([?&]password=)[^&#]*", re.IGNORECASE)


def mask_secrets(text: str) -> str:
    """``text`` with the password of every URL in it shown as ``***``:
    ``redis://:***@host:6379/0`` (also a ``password=`` query parameter)."""
    return _URL.sub(lambda match: _mask_url(match.group(0)), text)


def _mask_url(url: str) -> str:
    scheme, rest = url.split("://", 1)
    netloc, slash, tail = rest.partition("/")
    if "?" in netloc:  # no path: the query follows the host
        netloc, mark, query = netloc.partition("?")
        slash, tail = "", mark + query
    userinfo, at, host = netloc.rpartition("@")  # a password may hold an unescaped "@"
    if at and ":" in userinfo:
        netloc = f"{userinfo.split(':', 1)[0]}:***@{host}"
    return _QUERY_PASSWORD.sub(r"\1***", f"{scheme}://{netloc}{slash}{tail}")


def check_redis_url(url: str) -> str:
    """Return ``url`` if connect() can use it; else raise ValueError saying why (the URL in the
    message has its password masked). A Redis that is down is not checked for: that is an
    outage, which the workers ride out."""
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
    return url


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
