"""The pools as Redis sees them: every worker parent, on any host, says who it is.

The manager never talks to Redis, so the web dashboard's pools page (web/) learns about pools
from their workers: each worker parent writes its *card* (host, manager pid, app, queues, run
mode, when it started) into Redis when it starts and again every ``REFRESH`` seconds, valid for
``TTL`` seconds. A worker that stops takes its card away; one killed outright leaves a card that
lapses within ``TTL``. What each worker runs now is not on the card: qless already records it
(``ql:w:<name>:jobs``), and the reader asks qless.

Two keys, beside qless's own (``ql:``):

    qless-pool:workers       sorted set: worker name -> the epoch its card lapses
    qless-pool:worker-cards  hash: worker name -> the card (JSON)

One worker's write is two commands in one round trip every 20 s; the reader drops lapsed cards.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import qless

from ..client import pipelined

__all__ = ["CARDS", "REFRESH", "TTL", "Card", "pools", "take_card_away", "write_card"]

EXPIRIES = "qless-pool:workers"
CARDS = "qless-pool:worker-cards"
#: How long a card is valid: a pool that stopped without a word leaves the page within this.
TTL = 60.0
#: How often a worker writes its card again.
REFRESH = 20.0


@dataclass(frozen=True)
class Card:
    name: str  # qless's name of the worker: <host>-<pid>
    host: str
    pid: int
    manager: Optional[int]  # None: a worker alone (invoke qless.work, Worker(...).work())
    app: Optional[str]
    queues: tuple[str, ...]
    mode: str  # "fork per job" or "in process"
    started: float  # epoch


def card_for(worker: Any) -> Card:
    """What ``worker`` (a Worker, worker/base.py) says of itself."""
    return Card(
        name=worker.name,
        host=socket.gethostname(),
        pid=worker.pid,
        manager=worker.watch_parent,
        app=worker.appname,
        queues=tuple(worker.queues),
        mode="fork per job" if worker.fork_per_job else "in process",
        started=worker.started,
    )


def write_card(redis: Any, card: Card, now: Optional[float] = None) -> None:
    """Write (or refresh) ``card``, valid for TTL seconds from ``now``."""
    now = time.time() if now is None else now
    text = json.dumps({**card.__dict__, "queues": list(card.queues)}, sort_keys=True)
    pipe = redis.pipeline(transaction=False)
    pipe.zadd(EXPIRIES, {card.name: now + TTL})
    pipe.hset(CARDS, card.name, text)
    pipe.execute()


def take_card_away(redis: Any, name: str) -> None:
    pipe = redis.pipeline(transaction=False)
    pipe.zrem(EXPIRIES, name)
    pipe.hdel(CARDS, name)
    pipe.execute()


def pools(client: qless.Client, now: Optional[float] = None) -> list[dict[str, Any]]:
    """Every pool with a live card, by host and manager pid: its entries (a queue list each,
    with its workers) and, per worker, the jobs qless says it runs now (jid, class, queue)."""
    now = time.time() if now is None else now
    redis = client.redis
    lapsed = redis.zrangebyscore(EXPIRIES, "-inf", now)
    if lapsed:
        take_away = redis.pipeline(transaction=False)
        take_away.zrem(EXPIRIES, *lapsed)
        take_away.hdel(CARDS, *lapsed)
        take_away.execute()
    names = [_text(n) for n in redis.zrangebyscore(EXPIRIES, now, "+inf")]
    cards = [_card(text) for text in (redis.hmget(CARDS, names) if names else [])]
    live = [card for card in cards if card is not None]
    running = _running_jobs(client, [card.name for card in live])
    by_pool: dict[tuple[str, Optional[int]], dict[str, Any]] = {}
    for card in sorted(live, key=lambda c: (c.host, c.manager or 0, c.queues, c.pid)):
        pool = by_pool.setdefault(
            (card.host, card.manager),
            {"host": card.host, "pid": card.manager, "app": card.app, "entries": {}},
        )
        entry = pool["entries"].setdefault(
            ",".join(card.queues), {"queues": list(card.queues), "count": 0, "workers": []}
        )
        entry["count"] += 1
        entry["workers"].append(
            {
                "name": card.name,
                "pid": card.pid,
                "mode": card.mode,
                "started": card.started,
                "jobs": running.get(card.name, []),
            }
        )
    return [
        {**pool, "entries": list(pool["entries"].values()), "workers": _count(pool)}
        for pool in by_pool.values()
    ]


def _count(pool: dict[str, Any]) -> int:
    return sum(entry["count"] for entry in pool["entries"].values())


def _running_jobs(client: qless.Client, names: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
    """Worker name -> the jobs qless says it holds (one round trip for the jids, one for the
    records)."""
    if not names:
        return {}
    pipe = client.redis.pipeline(transaction=False)
    for name in names:
        pipe.zrange(f"ql:w:{name}:jobs", 0, -1)
    held = {name: [_text(j) for j in jids] for name, jids in zip(names, pipe.execute())}
    jids = [jid for jids in held.values() for jid in jids]
    records: dict[str, dict[str, Any]] = {}
    if jids:
        (answer,) = pipelined(client, [["multiget", *jids]])
        if not isinstance(answer, Exception):
            records = {job["jid"]: job for job in json.loads(answer) if job}
    return {
        name: [
            {"jid": jid, "klass": records[jid]["klass"], "queue": records[jid]["queue"]}
            for jid in jids
            if jid in records and records[jid]["worker"] == name
        ]
        for name, jids in held.items()
    }


def _card(text: Any) -> Optional[Card]:
    if text is None:
        return None
    try:
        fields = json.loads(text)
        return Card(**{**fields, "queues": tuple(fields["queues"])})
    except (ValueError, TypeError, KeyError):
        return None  # not ours, or an older shape: not shown


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
