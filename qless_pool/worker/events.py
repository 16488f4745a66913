"""What qless tells a worker: puts to its queues (while it is idle), and its jobs taken away.

qless publishes every put, complete, fail ... on ``ql:log`` (``{"event": "put", "queue": ...}``),
and the events about one worker's jobs (``lock_lost``, ``canceled``, ``put`` when moved) on
``ql:w:<worker name>``. A worker is always subscribed to its own channel, and to ``ql:log``
only while it is idle: then a put to one of its queues starts the job at once instead of at
the next poll. A busy worker leaves ``ql:log`` (a busy qless instance publishes a lot).
"""

from __future__ import annotations

import json
import select
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import qless

from ..client import CONTROL_TIMEOUT, REDIS_DOWN

__all__ = ["Subscriptions"]


@dataclass
class Subscriptions:
    """The worker's pubsub connection: ``ql:w:<name>`` always, ``ql:log`` while idle."""

    worker_channel: str
    pubsub: Any = None
    idle_channel: str = "ql:log"
    channels: set[str] = field(default_factory=set)
    # read() emptied redis-py's buffer, so whatever comes next is on the socket, where a poll
    # sees it: read() then asks the socket first, which costs a syscall rather than redis-py's
    # whole read path (a worker reads every turn, that is after every job).
    drained: bool = False

    def fileno(self) -> Optional[int]:
        connection = getattr(self.pubsub, "connection", None)
        sock = getattr(connection, "_sock", None)
        return sock.fileno() if sock is not None else None

    @property
    def listening_for_puts(self) -> bool:
        return self.idle_channel in self.channels

    def ensure(self, client: qless.Client) -> list[dict[str, Any]]:
        """Be subscribed to the worker's own channel; returns events read on the way."""
        if self.pubsub is None:
            self.pubsub = client.redis.pubsub()
            self.channels = set()
            self.drained = False
        return self._subscribe(self.worker_channel)

    def listen_for_puts(self, on: bool) -> list[dict[str, Any]]:
        """Subscribe to ``ql:log`` (idle) or leave it (busy: a busy worker needs none of it)."""
        if on:
            return self._subscribe(self.idle_channel)
        if self.listening_for_puts:
            self.pubsub.unsubscribe(self.idle_channel)  # the confirmation is skipped by read()
            self.channels.discard(self.idle_channel)
        return []

    def _subscribe(self, channel: str) -> list[dict[str, Any]]:
        if channel in self.channels:
            return []
        self.pubsub.subscribe(channel)
        # Wait until Redis confirms, so that whatever is published after the next pop is heard.
        events = self._read_until_subscribed({channel})
        self.drained = False  # it stopped at the confirmation: more may be buffered
        self.channels.add(channel)
        return events

    def _read_until_subscribed(self, channels: set[str]) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        pending = set(channels)
        deadline = time.monotonic() + CONTROL_TIMEOUT
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:  # a stalled Redis: an outage like any other call that times out
                raise REDIS_DOWN[1](f"Redis did not confirm SUBSCRIBE {', '.join(pending)}")
            message = self.pubsub.get_message(timeout=left)
            if message is None:
                continue
            if message["type"] == "subscribe":
                pending.discard(message["channel"])
            else:
                events += self._event(message)
        return events

    def read(self) -> list[dict[str, Any]]:
        """Every event that has arrived, without blocking."""
        events: list[dict[str, Any]] = []
        if self.pubsub is None or (self.drained and not self._socket_readable()):
            return events
        # Straight from the connection, not PubSub.get_message: its layers (retries, message
        # handlers, the health check) cost some tens of microseconds a message here, on the
        # path from a put to its job's start (docs/BENCHMARKS.md). What is skipped is only a
        # confirmation's bookkeeping: an UNSUBSCRIBE's (a SUBSCRIBE's is read by
        # _read_until_subscribed, with get_message).
        connection = self.pubsub.connection
        while connection.can_read(timeout=0):
            # push_request: with RESP3 a message is a push reply, which redis-py would otherwise
            # hand to PubSub and skip, then wait out the socket's timeout for a reply.
            events += self._event(connection.read_response(push_request=True))
        self.drained = True
        return events

    def _socket_readable(self) -> bool:
        """Whether the socket has something (or is closed); True when there is none to ask."""
        fd = self.fileno()
        if fd is None:
            return True
        poller = select.poll()  # (select() cannot take a descriptor past 1023)
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(0))

    def _event(self, message: Any) -> list[dict[str, Any]]:
        """The event in a pubsub message: PubSub.get_message's dict or, as read(), the reply
        (``["message", channel, data]``; a confirmation is not a message)."""
        if isinstance(message, dict):
            kind, channel, data = message["type"], message["channel"], message["data"]
        elif isinstance(message, list) and len(message) == 3:
            kind, channel, data = message
        else:
            return []
        if kind != "message":
            return []
        try:
            event = json.loads(data)
        except (TypeError, ValueError):
            return []
        if not isinstance(event, dict):
            return []
        event["channel"] = channel
        return [event]

    def close(self) -> None:
        if self.pubsub is not None:
            try:
                self.pubsub.close()
            except Exception:  # a broken connection is what we are dropping
                pass
        self.pubsub = None
        self.channels = set()
        self.drained = False
