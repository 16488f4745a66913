"""The pages: server-rendered HTML (Jinja2, autoescaped), usable without JavaScript. An action
is a form (POST, with the CSRF token) that acts, says what it did and goes back to a page."""

from __future__ import annotations

import secrets
import unicodedata
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from flask import (
    Blueprint,
    Response,
    flash,
    g,
    redirect,
    render_template,
    request,
    session,
    url_for,
)

from ..ops.operations import JOB_STATES, NotFound
from ..ops.pools import pools as live_pools
from . import views
from .api import given, queue_name, tag_list, whole
from .app import dashboard, log, log_action, may_act, on_loopback, refuse, refuse_action

__all__ = ["pages"]

pages = Blueprint("pages", __name__)
PAGE = 25
PLAIN_HTTP = (
    "This dashboard is reached over plain HTTP at a network address: browsers keep its login "
    "cookie only over HTTPS. Put TLS in front (README: Web dashboard, behind a reverse proxy), "
    "or reach it on localhost (an SSH tunnel)."
)


@pages.errorhandler(NotFound)
def _not_found(error: NotFound) -> Response:
    return refuse(404, str(error))


@pages.errorhandler(ValueError)
def _bad_value(error: ValueError) -> Response:
    return refuse(400, str(error))


# --- looking ------------------------------------------------------------------------------------


@pages.get("/")
def overview() -> str:
    ops = dashboard().ops
    queues = ops.queues()
    groups = ops.failure_groups()
    return render_template(
        "overview.html", queues=queues, totals=views.totals(queues), groups=groups,
        failed=sum(groups.values()),
    )  # fmt: skip


@pages.get("/queues/<path:name>")
def queue(name: str) -> str:
    ops = dashboard().ops
    state = request.args.get("state", "waiting")
    if state not in JOB_STATES:
        raise ValueError(f"state {state!r}: one of {', '.join(JOB_STATES)}")
    offset = whole(request.args.get("offset", "0"), "offset", 0, 10**9)
    counts = ops.queue(name)
    page = ops.jobs(name, state, offset, PAGE)
    return render_template(
        "queue.html", counts=counts, state=state, states=JOB_STATES, page=page,
        size=PAGE, stats=views.queue_stats(ops, name),
    )  # fmt: skip


@pages.get("/jobs")
def find() -> Any:
    jid = request.args.get("jid", "").strip()
    if not jid:
        return redirect(url_for("pages.overview"))
    if not views.looks_like_jid(jid):
        raise NotFound(f"no job {jid!r} (a jid is letters, digits and -_.:)")
    dashboard().ops.job(jid)  # NotFound
    return redirect(url_for("pages.job", jid=jid))


@pages.get("/jobs/<jid>")
def job(jid: str) -> str:
    board = dashboard()
    found = board.shaper.job(board.ops.job(jid))
    return render_template("job.html", job=found, queues=board.ops.queue_names())


@pages.get("/failed")
def failed() -> str:
    groups = dashboard().ops.failure_groups()
    return render_template("failed.html", groups=groups, total=sum(groups.values()))


@pages.get("/failed/<path:group>")
def failed_group(group: str) -> str:
    board = dashboard()
    offset = whole(request.args.get("offset", "0"), "offset", 0, 10**9)
    page = board.ops.failed(group, offset, PAGE)
    jobs = [board.shaper.job(j) for j in page.jobs]
    return render_template("group.html", group=group, page=page, jobs=jobs, size=PAGE)


@pages.route("/failed/<path:group>/<any(retry, cancel):verb>", methods=["GET", "POST"])
def whole_group(group: str, verb: str) -> Any:
    """GET: the confirmation, with the count; POST: do it (to all of them, in batches)."""
    ops = dashboard().ops
    if request.method == "GET":
        refusal = may_act()
        if refusal:
            return refuse(403, refusal)
        count = ops.failure_groups().get(group, 0)
        if not count:
            raise NotFound(f"no failed jobs in group {group!r}")
        return render_template("confirm.html", group=group, verb=verb, count=count)
    act = ops.retry_group if verb == "retry" else ops.cancel_group
    done = act(group)
    did = "retried" if verb == "retry" else "canceled"
    log_action(f"{verb} all", f"of group {group}: {done.acted} job(s), {done.refusals} refused")
    flash(f"{did} {done.acted:,} job(s) of {group}" + _refusals(done.refusals))
    return redirect(url_for("pages.failed"))


@pages.get("/workers")
def workers() -> str:
    return render_template("workers.html", workers=dashboard().ops.workers())


@pages.get("/pools")
def pools() -> str:
    return render_template("pools.html", pools=live_pools(dashboard().ops.client))


# --- acting on a job or a queue -----------------------------------------------------------------


def _retry(jid: str) -> str:
    done = dashboard().ops.retry([jid])
    if done.refused:
        raise ValueError(f"not retried: {done.refused.get(jid)}")
    return "retried: it waits in its queue"


def _cancel(jid: str) -> str:
    done = dashboard().ops.cancel([jid])
    if done.refused:
        raise ValueError(f"not canceled: {done.refused.get(jid)}")
    return "canceled"


def _move(jid: str) -> str:
    queue = queue_name(given("queue"))
    dashboard().ops.move(jid, queue)
    return f"moved to {queue}"


def _priority(jid: str) -> str:
    value = whole(given("priority"), "priority", -(10**9), 10**9)
    dashboard().ops.set_priority(jid, value)
    return f"priority set to {value}"


def _tag(jid: str) -> str:
    tags = tag_list(given("tags"))
    dashboard().ops.tag(jid, tags)
    return f"tagged {', '.join(tags)}"


def _untag(jid: str) -> str:
    tags = tag_list(given("tags"))
    dashboard().ops.untag(jid, tags)
    return f"untagged {', '.join(tags)}"


def _track(jid: str) -> str:
    dashboard().ops.track(jid, True)
    return "tracked"


def _untrack(jid: str) -> str:
    dashboard().ops.track(jid, False)
    return "no longer tracked"


JOB_ACTIONS: dict[str, Callable[[str], str]] = {
    "retry": _retry, "cancel": _cancel, "move": _move, "priority": _priority, "tag": _tag,
    "untag": _untag, "track": _track, "untrack": _untrack,
}  # fmt: skip


@pages.post("/jobs/<jid>/<verb>")
def act_on_job(jid: str, verb: str) -> Any:
    action = JOB_ACTIONS.get(verb)
    if action is None:
        raise NotFound(f"no action {verb!r}")
    before = dashboard().ops.job(jid) if verb == "cancel" else {}
    said = action(jid)
    log_action(verb, f"{jid}: {said}")
    flash(f"{jid}: {said}")
    if verb == "cancel":  # the job is gone: back to where it was listed
        group = (before.get("failure") or {}).get("group")
        if before.get("state") == "failed" and group:
            return redirect(url_for("pages.failed_group", group=group))
        if before.get("queue"):
            return redirect(url_for("pages.queue", name=before["queue"]))
        return redirect(url_for("pages.overview"))
    return redirect(url_for("pages.job", jid=jid))


@pages.post("/queues/<path:name>/<any(pause, unpause):verb>")
def pause_queue(name: str, verb: str) -> Any:
    ops = dashboard().ops
    (ops.pause if verb == "pause" else ops.unpause)(name)
    log_action(verb, f"queue {name}")
    flash(f"queue {name} {verb}d")
    return redirect(url_for("pages.queue", name=name))


# --- logging in ---------------------------------------------------------------------------------


@pages.route("/login", methods=["GET", "POST"])
def login() -> Any:
    board = dashboard()
    target = _safe_next(request.values.get("next", ""))
    if board.tokens is None:
        return redirect(target)
    # A browser keeps the login's Secure cookie only over HTTPS (or on loopback): say so
    # rather than let the form come back empty.
    plain = None if request.is_secure or on_loopback() else PLAIN_HTTP
    if request.method == "GET":
        return render_template("login.html", next=target, plain=plain)
    refusal = refuse_action()
    if refusal:
        return refuse(403, refusal)
    found = board.tokens.check(request.form.get("token", ""))
    if found is None:
        log.warning("a wrong token in the login form from %s", request.remote_addr)
        page = render_template("login.html", next=target, wrong=True, plain=plain)
        return Response(page, status=401)
    session.clear()
    session.permanent = True
    session["token"] = found.line
    session["sid"] = secrets.token_urlsafe(16)
    session["csrf"] = g.csrf = secrets.token_urlsafe(32)
    g.principal = found
    log_action("log in", f"from {request.remote_addr}")
    return redirect(target)


@pages.post("/logout")
def logout() -> Any:
    refusal = refuse_action()
    if refusal:
        return refuse(403, refusal)
    sid = session.get("sid")
    if isinstance(sid, str):
        dashboard().logged_out.add(sid)  # a copy of the cookie lets nobody in any more
    session.clear()
    return redirect(url_for("pages.login"))


def _safe_next(target: str) -> str:
    """Where to go after logging in: only a path of this dashboard (app.py's ``_here``). No
    scheme, no host, no ``//``, no backslash and no control or space character anywhere, since
    browsers drop tabs and newlines from a Location (``/\t/evil.example`` is ``//evil.example``)."""
    root = request.script_root or ""
    parts = urlsplit(target)
    if (
        target.startswith("/")
        and not parts.scheme
        and not parts.netloc
        and not target.startswith("//")
        and "\\" not in target
        and not any(c.isspace() or unicodedata.category(c)[0] in "CZ" for c in target)
    ):
        return root + target
    return url_for("pages.overview")


def _refusals(count: int) -> str:
    return f" ({count:,} refused: not failed any more)" if count else ""
