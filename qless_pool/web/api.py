"""The JSON API, under ``/api``: what the pages show, and the actions (POST). Its routes and
answers are a contract (README: "Web dashboard"); an action answers what it did, an unknown
job, group or queue 404, a bad value 400, a refusal by qless 409."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from flask import Blueprint, Response, jsonify, request

from ..ops.operations import Done, NotFound
from ..ops.pools import pools as live_pools
from .app import dashboard, log_action, refuse

__all__ = ["api"]

api = Blueprint("api", __name__)
#: The longest page of failed jobs the API gives at once.
MOST = 500


@api.errorhandler(NotFound)
def _not_found(error: NotFound) -> Response:
    return refuse(404, str(error))


@api.errorhandler(ValueError)
def _bad_value(error: ValueError) -> Response:
    return refuse(400, str(error))


# --- looking ------------------------------------------------------------------------------------


@api.get("/queues")
def queues() -> Any:
    return jsonify([asdict(q) for q in dashboard().ops.queues()])


@api.get("/jobs/<jid>")
def job(jid: str) -> Any:
    board = dashboard()
    return jsonify(board.shaper.job(board.ops.job(jid)))


@api.get("/failed")
def failed() -> Any:
    return jsonify(dashboard().ops.failure_groups())


@api.get("/failed/<path:group>")
def failed_group(group: str) -> Any:
    offset = whole(request.args.get("offset", "0"), "offset", 0, 10**9)
    limit = whole(request.args.get("limit", "25"), "limit", 1, MOST)
    board = dashboard()
    page = board.ops.failed(group, offset, limit)
    return jsonify(total=page.total, jobs=[board.shaper.job(j) for j in page.jobs])


@api.get("/workers")
def workers() -> Any:
    return jsonify(dashboard().ops.workers())


@api.get("/pools")
def pools() -> Any:
    return jsonify(live_pools(dashboard().ops.client))


# --- acting -------------------------------------------------------------------------------------


@api.post("/jobs/<jid>/retry")
def retry(jid: str) -> Any:
    return _one(jid, "retry", dashboard().ops.retry([jid]))


@api.post("/jobs/<jid>/cancel")
def cancel(jid: str) -> Any:
    return _one(jid, "cancel", dashboard().ops.cancel([jid]))


@api.post("/jobs/<jid>/move")
def move(jid: str) -> Any:
    queue = queue_name(given("queue"))
    dashboard().ops.move(jid, queue)
    log_action("move", f"{jid} to {queue}")
    return jsonify(jid=jid, queue=queue)


@api.post("/jobs/<jid>/priority")
def priority(jid: str) -> Any:
    value = whole(given("priority"), "priority", -(10**9), 10**9)
    dashboard().ops.set_priority(jid, value)
    log_action("priority", f"{jid} to {value}")
    return jsonify(jid=jid, priority=value)


@api.post("/jobs/<jid>/tag")
def tag(jid: str) -> Any:
    tags = tag_list(given("tags"))
    dashboard().ops.tag(jid, tags)
    log_action("tag", f"{jid} with {', '.join(tags)}")
    return jsonify(jid=jid, tags=dashboard().ops.job(jid).get("tags", []))


@api.post("/jobs/<jid>/untag")
def untag(jid: str) -> Any:
    tags = tag_list(given("tags"))
    dashboard().ops.untag(jid, tags)
    log_action("untag", f"{jid}: {', '.join(tags)}")
    return jsonify(jid=jid, tags=dashboard().ops.job(jid).get("tags", []))


@api.post("/jobs/<jid>/track")
def track(jid: str) -> Any:
    dashboard().ops.track(jid, True)
    log_action("track", jid)
    return jsonify(jid=jid, tracked=True)


@api.post("/jobs/<jid>/untrack")
def untrack(jid: str) -> Any:
    dashboard().ops.track(jid, False)
    log_action("untrack", jid)
    return jsonify(jid=jid, tracked=False)


@api.post("/failed/<path:group>/retry")
def retry_group(group: str) -> Any:
    done = dashboard().ops.retry_group(group)
    log_action("retry all", f"of group {group}: {done.acted} job(s), {done.refusals} refused")
    return jsonify(count=done.acted, refused=done.refusals)


@api.post("/failed/<path:group>/cancel")
def cancel_group(group: str) -> Any:
    done = dashboard().ops.cancel_group(group)
    log_action("cancel all", f"of group {group}: {done.acted} job(s), {done.refusals} refused")
    return jsonify(count=done.acted, refused=done.refusals)


@api.post("/queues/<path:name>/pause")
def pause(name: str) -> Any:
    dashboard().ops.pause(name)
    log_action("pause", f"queue {name}")
    return jsonify(queue=name, paused=True)


@api.post("/queues/<path:name>/unpause")
def unpause(name: str) -> Any:
    dashboard().ops.unpause(name)
    log_action("unpause", f"queue {name}")
    return jsonify(queue=name, paused=False)


# --- helpers (the pages read their forms with them too) -----------------------------------------


def given(name: str) -> Any:
    """A value from a JSON body or a form."""
    if request.is_json:
        body = request.get_json(silent=True)
        if not isinstance(body, dict):
            raise ValueError("the body is not a JSON object")
        return body.get(name)
    return request.form.get(name)


def queue_name(value: Any) -> str:
    """A queue to move a job to: a name of printable characters (one the pages can address)."""
    if value is not None and not isinstance(value, str):
        raise ValueError('move needs a queue name, a string: {"queue": "name"}')
    name = (value or "").strip()
    if not name:
        raise ValueError('move needs a queue: {"queue": "name"} (a form field "queue")')
    if not name.isprintable() or "/" in name[:1]:
        raise ValueError(f"queue {name!r}: a name of printable characters, not starting with /")
    return name


def whole(value: Any, name: str, low: int, high: int) -> int:
    try:
        number = int(str(value).strip())
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a whole number, not {value!r}") from None
    if not low <= number <= high:
        raise ValueError(f"{name} must be from {low} to {high}")
    return number


def tag_list(value: Any) -> list[str]:
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise ValueError("tags: a list of strings, or one string of comma-separated tags")
    tags = [t.strip() for t in value if t.strip()]
    if not tags:
        raise ValueError("no tag given")
    return tags


def _one(jid: str, action: str, done: Done) -> Any:
    if done.refused:
        why = done.refused.get(jid, "refused")
        if why == "no such job":
            raise NotFound(f"no job {jid!r}")
        return refuse(409, f"{action} {jid}: {why}")
    log_action(action, jid)
    return jsonify(count=done.acted)
