"""The dashboard as a WSGI application (Flask): who may see and act, the security headers, the
answers for Redis being away. The pages are in pages.py, the JSON API in api.py.

Every request, in order (``_guard``):

    which Host?                 -> without a token file, a loopback name only (unless the app
                                   was made with ``hosts``): a DNS-rebinding page gets 403
    static file or login page?  -> served to anyone
    who is it?                  -> a token (``Authorization: Bearer``), or the browser's session
                                   cookie naming a token still in the token file (and not logged
                                   out); without a token file, everyone (the server then listens
                                   on loopback, or is read-only); nobody -> 401 (the login form)
    an action (POST)?           -> 403 if --read-only, a read token, a cross-site request
                                   (Sec-Fetch-Site, Origin), or, unless it came with a Bearer
                                   token or as JSON to the API (which a browser sends cross-site
                                   only after a CORS preflight that we never allow), no CSRF
                                   token matching the session's

Every answer carries a Content-Security-Policy (scripts and styles from this server only, no
inline script, no framing) and is not cached. Every action is logged with the token's name.
"""

from __future__ import annotations

import ipaddress
import itertools
import logging
import secrets
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional
from urllib.parse import quote, urlsplit

import redis
from flask import Flask, Response, g, jsonify, redirect, render_template, request, session, url_for
from flask.sessions import SecureCookieSessionInterface
from werkzeug.exceptions import HTTPException

from ..client import control_client
from ..logs import printable
from ..ops.operations import Operations
from ..outage import redis_is_down
from ..urls import default_redis_url, mask_argument, mask_secrets
from . import views
from .tokens import WRITE, Token, TokenFile, TokensBusy

__all__ = ["CSP", "Dashboard", "create_app"]

log = logging.getLogger("qless_pool.web")

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
#: Everyone, when there is no token file.
ANYONE = Token(WRITE, "anyone (no token file)", "")
OPEN_ENDPOINTS = {"static", "pages.login", "pages.logout"}
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
#: How long a browser's login lasts.
SESSION_SECONDS = 12 * 3600


@dataclass
class Dashboard:
    """What every request of one application shares (Flask keeps it in ``app.extensions``)."""

    ops: Operations
    redis_shown: str  # the URL, password masked
    tokens: Optional[TokenFile]
    read_only: bool
    shaper: views.Shaper
    hosts: Optional[tuple[str, ...]]  # the Host names answered; None: any
    logged_out: LoggedOut = field(default_factory=lambda: LoggedOut())


class LoggedOut:
    """The sessions logged out before their cookie expires. The cookie is signed, not stored:
    without this, a copy of it taken before "Log out" would still let its holder in. Kept in
    this process (a restart with a new --secret-key ends every session anyway)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._until: dict[str, float] = {}  # session id -> when its cookie expires anyway

    def add(self, sid: str) -> None:
        now = time.time()
        with self._lock:
            # Every session lasts as long, so the oldest entries expire first: drop from the
            # front only (a loop of logins and logouts must not make each logout dearer).
            for old, until in list(itertools.islice(self._until.items(), 64)):
                if until > now:
                    break
                del self._until[old]
            self._until[sid] = now + SESSION_SECONDS

    def __contains__(self, sid: object) -> bool:
        with self._lock:
            return sid in self._until


def create_app(
    redis_url: Optional[str] = None,
    *,
    token_file: Optional[str] = None,
    read_only: bool = False,
    hide_data_keys: Sequence[str] = (),
    secret_key: Optional[str] = None,
    hosts: Optional[Sequence[str]] = None,
) -> Flask:
    """The dashboard over qless at ``redis_url`` ($QLESS_URL, $REDIS_URL, localhost), as a
    WSGI application: serve it (``qless-pool web``) or mount it in your own (README: "Web
    dashboard"). ``token_file``: the tokens allowed in (tokens.py); without one, anyone who
    reaches it may look and, unless ``read_only``, act. ``hide_data_keys``: job data keys to
    hide besides the default ones (views.DEFAULT_HIDDEN_KEYS). ``secret_key`` signs the
    browser's session cookie (by default a random key: logins last as long as the process).
    ``hosts``: the Host names answered (``["*"]`` for any); by default any with a token file,
    loopback names only without one (so that a DNS-rebinding page cannot reach it)."""
    from .api import api
    from .pages import pages

    url = redis_url or default_redis_url()
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY=secret_key or secrets.token_bytes(32),
        SESSION_COOKIE_NAME="qless_pool_session",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Strict",
        PERMANENT_SESSION_LIFETIME=SESSION_SECONDS,
        MAX_CONTENT_LENGTH=64 * 1024,
    )
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.session_interface = _SessionCookie()
    if hosts is None:
        hosts = None if token_file else LOOPBACK_HOSTS
    elif "*" in hosts:
        hosts = None
    app.extensions["qless_pool"] = Dashboard(
        ops=Operations(control_client(url, "web")),
        redis_shown=mask_argument(url),
        tokens=TokenFile(token_file) if token_file else None,
        read_only=read_only,
        shaper=views.Shaper((*views.DEFAULT_HIDDEN_KEYS, *hide_data_keys)),
        hosts=tuple(h.lower() for h in hosts) if hosts is not None else None,
    )
    app.register_blueprint(pages)
    app.register_blueprint(api, url_prefix="/api")
    app.before_request(_guard)
    app.after_request(_headers)
    app.register_error_handler(redis.RedisError, _redis_away)
    app.register_error_handler(ConnectionError, _redis_away)
    app.register_error_handler(TimeoutError, _redis_away)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(TokensBusy, _tokens_busy)
    app.jinja_env.filters["when"] = views.when
    app.jinja_env.filters["pretty"] = views.pretty
    app.jinja_env.globals["dashboard"] = lambda: dashboard()
    return app


def dashboard() -> Dashboard:
    from flask import current_app

    found: Dashboard = current_app.extensions["qless_pool"]
    return found


def wants_json() -> bool:
    """Is this a call of the JSON API (also one to an address it does not have)?"""
    return request.blueprint == "api" or (request.path + "/").startswith("/api/")


# --- who may see and act ------------------------------------------------------------------------


def _guard() -> Optional[Response]:
    if "csrf" not in session:
        session["csrf"] = secrets.token_urlsafe(32)
    g.csrf = session["csrf"]
    g.principal, g.by_bearer = None, False
    wrong_host = _wrong_host()
    if wrong_host:
        return refuse(403, wrong_host)
    if request.endpoint in OPEN_ENDPOINTS:
        return None  # no token is checked here: the login form checks its own
    g.principal, g.by_bearer = _who()
    if g.principal is None:
        if wants_json():
            answer = jsonify(error="a token is needed (Authorization: Bearer <token>)")
            answer.status_code = 401
            answer.headers["WWW-Authenticate"] = 'Bearer realm="qless-pool"'
            return answer
        return redirect(url_for("pages.login", next=_here()))  # type: ignore[return-value]
    if request.method == "POST":
        refusal = refuse_action()
        if refusal:
            return refuse(403, refusal)
    return None


def _wrong_host() -> Optional[str]:
    hosts = dashboard().hosts
    if hosts is None:
        return None
    name = host_name().rstrip(".")  # "localhost." is localhost
    if name in hosts or (hosts == LOOPBACK_HOSTS and _loopback_address(name)):
        return None
    return (
        f"refused: Host {name!r} is not one this dashboard answers ({', '.join(hosts)}); "
        "without a token file it answers loopback names only"
    )


def _who() -> tuple[Optional[Token], bool]:
    """The token this request comes with, and whether it came as a Bearer header."""
    board = dashboard()
    if board.tokens is None:
        return ANYONE, False
    header = request.headers.get("Authorization", "")
    if header[:7].lower() == "bearer ":
        found = board.tokens.check(header[7:])
        if found is None:
            log.warning("a wrong Bearer token from %s", request.remote_addr)
        return found, True
    line, sid = session.get("token"), session.get("sid")
    if isinstance(line, str) and line and sid not in board.logged_out:
        return board.tokens.by_line(line), False
    return None, False


def refuse_action() -> Optional[str]:
    """Why this POST may not act (None: it may)."""
    cross = cross_site()
    if cross:
        return cross
    if request.endpoint in OPEN_ENDPOINTS:
        return _csrf_refusal()
    if dashboard().read_only:
        return "this dashboard is read-only (--read-only)"
    if not g.principal.may_act:
        return f"{g.principal.name} is a read token: acting needs a write token"
    if g.by_bearer or (wants_json() and request.is_json):
        return None
    return _csrf_refusal()


def may_act() -> Optional[str]:
    """Why the one asking may not act (None: they may): for the pages that lead to an action."""
    if dashboard().read_only:
        return "this dashboard is read-only (--read-only)"
    if g.principal is None or not g.principal.may_act:
        name = g.principal.name if g.principal else "nobody"
        return f"{name} is a read token: acting needs a write token"
    return None


def cross_site() -> Optional[str]:
    fetch_site = request.headers.get("Sec-Fetch-Site")
    if fetch_site and fetch_site not in ("same-origin", "none"):
        return f"refused: a {fetch_site} request may not act"
    origin = request.headers.get("Origin")
    if origin and origin != "null" and urlsplit(origin).netloc != request.host:
        return "refused: the request comes from another site (Origin)"
    if origin == "null":
        return "refused: the request comes from no site (Origin: null)"
    return None


def _csrf_refusal() -> Optional[str]:
    given = request.form.get("csrf") or request.headers.get("X-CSRF-Token") or ""
    expected = str(session.get("csrf", ""))
    if given and secrets.compare_digest(given.encode(), expected.encode()):
        return None
    if wants_json():
        return ("refused: an action needs a Bearer token, a JSON body "
                "(Content-Type: application/json) or the page's X-CSRF-Token")  # fmt: skip
    return "refused: the form is stale or not this dashboard's (CSRF); reload the page"


def log_action(action: str, detail: str) -> None:
    """One line in the log per action; what a request named (a queue, a tag) is escaped, so
    that it cannot start a line of its own."""
    log.info("%s: %s %s", g.principal.name, action, printable(detail))


def refuse(status: int, message: str) -> Response:
    if wants_json():
        answer = jsonify(error=message)
        answer.status_code = status
        return answer
    page = render_template("error.html", status=status, message=message)
    return Response(page, status=status)


def _here() -> str:
    """This page's path and query, as a URL quotes them (a queue named "my queue" has a
    space, which the login's ``next`` would refuse)."""
    path = quote(request.path, safe="/:@!$&'()*+,;=-._~")
    query = request.query_string.decode("latin-1")
    return f"{path}?{query}" if query else path


# --- answers ------------------------------------------------------------------------------------


def _headers(answer: Response) -> Response:
    answer.headers["Content-Security-Policy"] = CSP
    answer.headers["X-Frame-Options"] = "DENY"
    answer.headers["X-Content-Type-Options"] = "nosniff"
    answer.headers["Referrer-Policy"] = "same-origin"
    answer.headers["Cross-Origin-Opener-Policy"] = "same-origin"
    if request.endpoint != "static":
        answer.headers["Cache-Control"] = "no-store"
    return answer


def _http_error(error: HTTPException) -> Any:
    """Flask's own refusals (404, 405, 413...): JSON from the API, our page from the pages."""
    if error.code is None or error.code < 400:
        return error
    answer = refuse(error.code, str(error.description or error.name))
    for name, value in error.get_headers():
        if name in ("Allow", "WWW-Authenticate"):
            answer.headers[name] = value
    return answer


def _tokens_busy(error: TokensBusy) -> Any:
    answer = refuse(503, str(error))
    answer.headers["Retry-After"] = "1"
    return answer


def _redis_away(error: Exception) -> Any:
    if not (isinstance(error, redis.RedisError) or redis_is_down(error)):
        raise error
    shown = dashboard().redis_shown
    said = mask_secrets(str(error))
    message = f"Redis at {shown} is not answering ({said}). This page tries again by itself."
    if isinstance(error, redis.AuthenticationError):
        message = (f"Redis at {shown} refused the dashboard's password or user ({said}): "
                   "check the URL given with -R or $QLESS_URL.")  # fmt: skip
    elif isinstance(error, redis.ResponseError) and not redis_is_down(error):
        message = f"Redis at {shown} refused: {said}"
        if wants_json():
            return refuse(500, message)
    if wants_json():
        return refuse(503, message)
    again = request.method == "GET"  # a refresh would send a GET to an action's address
    page = render_template("error.html", status=503, message=message, retry=5 if again else 0)
    return Response(page, status=503, headers={"Retry-After": "5"})


def host_name() -> str:
    """The request's Host without its port, lower case (``[::1]:5151`` -> ``::1``)."""
    host = (request.host or "").lower()
    return host[1:].split("]", 1)[0] if host.startswith("[") else host.rsplit(":", 1)[0]


def _loopback_address(name: str) -> bool:
    """Is ``name`` an IP address of loopback (127.0.0.2, ::1, ::ffff:127.0.0.1)?"""
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or bool(mapped and mapped.is_loopback)


def on_loopback() -> bool:
    """Did the request come to a loopback name (where a plain HTTP cookie is kept)?"""
    name = host_name().rstrip(".")
    return name in LOOPBACK_HOSTS or _loopback_address(name)


class _SessionCookie(SecureCookieSessionInterface):
    """The session cookie: HttpOnly, SameSite=Strict, on the dashboard's path, and Secure
    unless the request came over plain HTTP to a loopback address (where browsers would drop
    a Secure cookie and nothing crosses a network)."""

    def get_cookie_secure(self, app: Flask) -> bool:
        return request.is_secure or not on_loopback()

    def get_cookie_path(self, app: Flask) -> str:
        return (request.script_root or "") + "/"
