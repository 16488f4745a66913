"""The dashboard as a WSGI application (Flask): who may see and act, the security headers, the
answers for Redis being away. The pages are in pages.py, the JSON API in api.py.

Every request, in order (``_guard``):

    static file or login page?  -> served to anyone
    who is it?                  -> a token (``Authorization: Bearer``), or the browser's session
                                   cookie naming a token still in the token file; without a token
                                   file, everyone (the server then listens on loopback, or is
                                   read-only); nobody -> 401 (a page: the login form)
    an action (POST)?           -> 403 if --read-only, a read token, a cross-site request
                                   (Sec-Fetch-Site, Origin), or, from a browser session, no CSRF
                                   token matching the session's

Every answer carries a Content-Security-Policy (scripts and styles from this server only, no
inline script, no framing) and is not cached. Every action is logged with the token's name.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from typing import Any, Optional
from urllib.parse import urlsplit

import redis
from flask import Flask, Response, g, jsonify, redirect, render_template, request, session, url_for
from flask.sessions import SecureCookieSessionInterface

from ..client import control_client
from ..ops.operations import Operations
from ..outage import redis_is_down
from ..urls import default_redis_url, mask_argument, mask_secrets
from . import views
from .tokens import WRITE, Token, TokenFile

__all__ = ["CSP", "Dashboard", "create_app"]

log = logging.getLogger("qless_pool.web")

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
#: Everyone, when there is no token file.
ANYONE = Token(WRITE, "anyone (no token file)", "")
OPEN_ENDPOINTS = {"static", "pages.login", "pages.logout"}


@dataclass
class Dashboard:
    """What every request of one application shares (Flask keeps it in ``app.extensions``)."""

    ops: Operations
    redis_shown: str  # the URL, password masked
    tokens: Optional[TokenFile]
    read_only: bool
    shaper: views.Shaper


def create_app(
    redis_url: Optional[str] = None,
    *,
    token_file: Optional[str] = None,
    read_only: bool = False,
    hide_data_keys: Optional[list[str]] = None,
    secret_key: Optional[str] = None,
) -> Flask:
    """The dashboard over qless at ``redis_url`` ($QLESS_URL, $REDIS_URL, localhost), as a
    WSGI application: serve it (``qless-pool web``) or mount it in your own (README: "Web
    dashboard"). ``token_file``: the tokens allowed in (tokens.py); without one, anyone who
    reaches it may look and, unless ``read_only``, act. ``secret_key`` signs the browser's
    session cookie (by default a random key: logins last as long as the process)."""
    from .api import api
    from .pages import pages

    url = redis_url or default_redis_url()
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY=secret_key or secrets.token_bytes(32),
        SESSION_COOKIE_NAME="qless_pool_session",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Strict",
        PERMANENT_SESSION_LIFETIME=12 * 3600,
        MAX_CONTENT_LENGTH=64 * 1024,
        JSON_SORT_KEYS=False,
    )
    app.session_interface = _SessionCookie()
    app.extensions["qless_pool"] = Dashboard(
        ops=Operations(control_client(url, "web")),
        redis_shown=mask_argument(url),
        tokens=TokenFile(token_file) if token_file else None,
        read_only=read_only,
        shaper=views.Shaper(
            views.DEFAULT_HIDDEN_KEYS if hide_data_keys is None else hide_data_keys
        ),
    )
    app.register_blueprint(pages)
    app.register_blueprint(api, url_prefix="/api")
    app.before_request(_guard)
    app.after_request(_headers)
    app.register_error_handler(redis.RedisError, _redis_away)
    app.register_error_handler(ConnectionError, _redis_away)
    app.register_error_handler(TimeoutError, _redis_away)
    app.jinja_env.filters["when"] = views.when
    app.jinja_env.filters["pretty"] = views.pretty
    app.jinja_env.globals["dashboard"] = lambda: dashboard()
    return app


def dashboard() -> Dashboard:
    from flask import current_app

    found: Dashboard = current_app.extensions["qless_pool"]
    return found


def wants_json() -> bool:
    return request.blueprint == "api"


# --- who may see and act ------------------------------------------------------------------------


def _guard() -> Optional[Response]:
    if "csrf" not in session:
        session["csrf"] = secrets.token_urlsafe(32)
    g.csrf = session["csrf"]
    g.principal, g.by_bearer = _who()
    if request.endpoint in OPEN_ENDPOINTS:
        return None
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


def _who() -> tuple[Optional[Token], bool]:
    """The token this request comes with, and whether it came as a Bearer header."""
    tokens = dashboard().tokens
    if tokens is None:
        return ANYONE, False
    header = request.headers.get("Authorization", "")
    if header[:7].lower() == "bearer ":
        return tokens.check(header[7:]), True
    line = session.get("token")
    if isinstance(line, str) and line:
        return tokens.by_line(line), False
    return None, False


def refuse_action() -> Optional[str]:
    """Why this POST may not act (None: it may)."""
    cross = cross_site()
    if cross:
        return cross
    if request.endpoint in OPEN_ENDPOINTS:
        return None if g.by_bearer else _csrf_refusal()
    if dashboard().read_only:
        return "this dashboard is read-only (--read-only)"
    if not g.principal.may_act:
        return f"{g.principal.name} is a read token: acting needs a write token"
    return None if g.by_bearer else _csrf_refusal()


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
    if not secrets.compare_digest(given, str(session.get("csrf", ""))) or not given:
        return "refused: the form is stale or not this dashboard's (CSRF); reload the page"
    return None


def log_action(action: str, detail: str) -> None:
    log.info("%s: %s %s", g.principal.name, action, detail)


def refuse(status: int, message: str) -> Response:
    if wants_json():
        answer = jsonify(error=message)
        answer.status_code = status
        return answer
    page = render_template("error.html", status=status, message=message)
    return Response(page, status=status)


def _here() -> str:
    path = request.full_path if request.query_string else request.path
    return path


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


def _redis_away(error: Exception) -> Any:
    if not (isinstance(error, redis.RedisError) or redis_is_down(error)):
        raise error
    shown = dashboard().redis_shown
    said = mask_secrets(str(error))
    message = f"Redis at {shown} is not answering ({said}). This page tries again by itself."
    if isinstance(error, redis.ResponseError) and not redis_is_down(error):
        message = f"Redis at {shown} refused: {said}"
        if wants_json():
            return refuse(500, message)
    if wants_json():
        return refuse(503, message)
    page = render_template("error.html", status=503, message=message, retry=5)
    return Response(page, status=503, headers={"Retry-After": "5"})


class _SessionCookie(SecureCookieSessionInterface):
    """The session cookie: HttpOnly, SameSite=Strict, on the dashboard's path, and Secure
    unless the request came over plain HTTP to a loopback address (where browsers would drop
    a Secure cookie and nothing crosses a network)."""

    def get_cookie_secure(self, app: Flask) -> bool:
        if request.is_secure:
            return True
        host = (request.host or "").rsplit(":", 1)[0].strip("[]")
        return host not in ("localhost", "127.0.0.1", "::1")

    def get_cookie_path(self, app: Flask) -> str:
        return (request.script_root or "") + "/"
