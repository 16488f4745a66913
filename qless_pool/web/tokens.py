"""The dashboard's tokens: made by the operator, stored hashed, read from the token file.

A token file has one token a line, ``<scope> <hash> [name]``, as ``qless-pool web hash-token``
prints it (the name is the operator's, for the log; ``#`` starts a comment)::

    write scrypt$16384$8$1$<salt>$<digest> alice
    read  scrypt$16384$8$1$<salt>$<digest> grafana

The hash is scrypt (salted, slow, memory-hard; in the standard library). Checking a token costs
about 50 ms a line, so a token once checked is remembered by its SHA-256 for as long as its line
stays in the file, with the scope the file gives it now: removing the line revokes it (the file
is read again when it changes), also for browsers logged in with it, and changing its scope
takes effect at the next request. A wrong token is remembered too (the last few thousand), so
repeating one costs nothing, and only one check runs at a time, so a flood of guesses holds one
core, not all of them; a request that would wait for a check longer than BUSY_WAIT is answered
at once (TokensBusy: the server says 503, try again), so that a flood cannot hold every one of
the server's threads either. A token already checked, and a browser's session, need no check.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import threading
from dataclasses import dataclass
from typing import Optional

__all__ = ["READ", "SCOPES", "WRITE", "Token", "TokenError", "TokenFile", "TokensBusy",
           "hash_token"]  # fmt: skip

READ, WRITE = "read", "write"
SCOPES = (READ, WRITE)
#: scrypt's cost: 2**14 rounds, 16 MiB, about 50 ms here.
N, R, P = 2**14, 8, 1
#: A token must be at least this long (``secrets.token_urlsafe(32)`` gives 43 characters).
SHORTEST = 16
#: The dearest scrypt a token file may ask for (n * r * 128 bytes of memory a check).
MOST_MEMORY = 128 << 20
#: How many wrong tokens are remembered as wrong.
WRONG_REMEMBERED = 4096
#: The longest a request waits for another one's token check (seconds).
BUSY_WAIT = 0.25


class TokenError(ValueError):
    """A token file or a token that cannot be used; the message says which line or why."""


class TokensBusy(Exception):
    """Another token check is running and did not end within BUSY_WAIT: try again."""


@dataclass(frozen=True)
class Token:
    scope: str
    name: str
    line: str  # the hash as stored: what a browser's session names (never the token itself)

    @property
    def may_act(self) -> bool:
        return self.scope == WRITE


def hash_token(token: str, scope: str) -> str:
    """The token file's line for ``token`` (without a name)."""
    if scope not in SCOPES:
        raise TokenError(f"scope {scope!r}: read or write")
    token = token.strip()
    if len(token) < SHORTEST:
        raise TokenError(
            f"a token needs at least {SHORTEST} characters (make one with: python3 -c "
            "'import secrets; print(secrets.token_urlsafe(32))')"
        )
    salt = os.urandom(16)
    digest = _scrypt(token, salt, N, R, P)
    return f"{scope} scrypt${N}${R}${P}${_b64(salt)}${_b64(digest)}"


class TokenFile:
    """The tokens of one file, read again whenever it changes."""

    def __init__(self, path: str):
        self.path = path
        self._lock = threading.Lock()
        self._stamp: Optional[tuple[int, int, int]] = None
        self._tokens: list[tuple[Token, bytes, bytes, tuple[int, int, int]]] = []
        self._known: dict[bytes, str] = {}  # sha256(token) -> the hash line it matched
        self._wrong: dict[bytes, None] = {}  # sha256(token) of wrong ones, oldest first
        self._checking = threading.Lock()  # one scrypt at a time
        self.reload()  # a bad file stops the start, with the line

    def reload(self) -> None:
        with self._lock:
            self._read()

    def _read(self) -> None:
        try:
            info = os.stat(self.path)
            stamp = (info.st_ino, info.st_mtime_ns, info.st_size)
            if stamp == self._stamp:
                return
            with open(self.path, encoding="utf-8") as file:
                text = file.read(1 << 20)
        except (OSError, UnicodeDecodeError) as error:
            raise TokenError(f"token file {self.path}: {error}") from None
        tokens = []
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.split("#", 1)[0].strip()
            if line:
                tokens.append(self._parse(line, number))
        if not tokens:
            raise TokenError(f"token file {self.path}: no token in it")
        self._tokens, self._stamp = tokens, stamp
        lines = {token.line for token, *_ in tokens}
        self._known = {key: line for key, line in self._known.items() if line in lines}
        self._wrong = {}  # a token wrong before may be right in the new file

    def _parse(self, line: str, number: int) -> tuple[Token, bytes, bytes, tuple[int, int, int]]:
        where = f"token file {self.path}, line {number}"
        words = line.split(None, 2)
        if len(words) < 2 or words[0] not in SCOPES:
            raise TokenError(f"{where}: expected '<read|write> <hash> [name]'")
        scope, stored = words[0], words[1]
        parts = stored.split("$")
        try:
            if len(parts) != 6 or parts[0] != "scrypt":
                raise ValueError
            n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
            salt, digest = _unb64(parts[4]), _unb64(parts[5])
            if n < 2 or n & (n - 1) or not 1 <= r <= 64 or not 1 <= p <= 16 or len(digest) < 16:
                raise ValueError
        except ValueError:
            raise TokenError(f"{where}: not a hash from 'qless-pool web hash-token'") from None
        if n * r * p * 128 > MOST_MEMORY:
            raise TokenError(f"{where}: scrypt n={n} r={r} p={p} asks for more than "
                             f"{MOST_MEMORY >> 20} MiB a check")  # fmt: skip
        name = words[2].strip() if len(words) > 2 else f"token {stored[-8:]}"
        return Token(scope, name, stored), salt, digest, (n, r, p)

    def check(self, token: str) -> Optional[Token]:
        """The token ``token`` is, with the scope the file gives it now; or None."""
        token = token.strip()
        if not token or len(token) > 1024:
            return None
        key = hashlib.sha256(token.encode()).digest()
        with self._lock:
            self._read_quietly()
            line = self._known.get(key)
            if line is not None:
                return self._current(line)
            if key in self._wrong:
                return None
        if not self._checking.acquire(timeout=BUSY_WAIT):
            raise TokensBusy("too many new tokens to check at once; try again in a second")
        try:
            with self._lock:
                self._read_quietly()
                line = self._known.get(key)  # checked by the request we waited for?
                if line is not None:
                    return self._current(line)
                if key in self._wrong:
                    return None
                stamp, tokens = self._stamp, list(self._tokens)
            found = next(
                (t for t, salt, digest, (n, r, p) in tokens
                 if hmac.compare_digest(_scrypt(token, salt, n, r, p), digest)),
                None,
            )  # fmt: skip
            with self._lock:
                if self._stamp != stamp:  # the file changed while we checked: not remembered
                    return self._current(found.line) if found else None
                if found is None:
                    self._wrong[key] = None
                    while len(self._wrong) > WRONG_REMEMBERED:
                        del self._wrong[next(iter(self._wrong))]
                    return None
                self._known[key] = found.line
                return found
        finally:
            self._checking.release()

    def _current(self, line: str) -> Optional[Token]:
        """The token whose hash is ``line`` as the file has it now (its scope may have changed)."""
        for found, *_ in self._tokens:
            if found.line == line:
                return found
        return None

    def by_line(self, line: str) -> Optional[Token]:
        """The token whose hash is ``line``, if it is still in the file (a browser's session)."""
        with self._lock:
            self._read_quietly()
            return self._current(line)

    def _read_quietly(self) -> None:
        """Read a changed file; a file made bad (or removed) meanwhile lets no token in until
        it is good again (fail closed)."""
        try:
            self._read()
        except TokenError:
            self._tokens, self._known, self._wrong, self._stamp = [], {}, {}, None


def new_token() -> str:
    return secrets.token_urlsafe(32)


def _scrypt(token: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(token.encode(), salt=salt, n=n, r=r, p=p, maxmem=256 << 20, dklen=32)


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
