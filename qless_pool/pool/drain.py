"""Drain mode: run the pool until its queues are empty, then stop it (for CI jobs, batch runs).

The manager never talks to Redis, so it forks a *drain watcher* beside the workers. The watcher
polls the configured queues; once none has a job waiting, running, stalled, or due (scheduled or
recurring) within the poll interval, on two looks in a row (a job may complete before it puts
its follow-up), it prints one summary line, sends QUIT to the manager and exits: 0 when no job
of these queues failed during the run, 1 otherwise. The manager exits with that status once its
workers have finished.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from typing import Optional

import qless

from ..client import Outage, control_client, redis_is_down
from ..logs import logger, set_role
from ..proctitle import set_title

__all__ = ["DrainWatcher", "Summary"]

log = logger.getChild("drain")

#: The shortest pause between two looks at the queues.
MIN_CHECK_INTERVAL = 0.1
#: After a look found the queues empty, the confirming look comes this soon (a job that
#: completes and then puts its follow-up leaves them empty for a moment, not for long).
CONFIRM_AFTER = 0.25


class Summary:
    """What happened to the configured queues' jobs since ``since`` (epoch seconds)."""

    def __init__(self, completed: int, failed: int, elapsed: float, queues: Sequence[str]):
        self.completed, self.failed, self.elapsed, self.queues = completed, failed, elapsed, queues

    @property
    def status(self) -> int:
        return 1 if self.failed else 0

    def line(self) -> str:
        queues = ",".join(self.queues) or "no queues (no workers configured)"
        return (
            f"qless-pool: drained {queues}: {self.completed} completed, "
            f"{self.failed} failed in {self.elapsed:.1f}s"
        )


class DrainWatcher:
    """Watches ``queues`` for the pool whose manager is ``manager_pid``; see the module doc."""

    def __init__(
        self,
        queues: Sequence[str],
        redis_url: Optional[str],
        manager_pid: int,
        interval: float,
        appname: Optional[str] = None,
        started: Optional[float] = None,
        unserved: Sequence[str] = (),
    ):
        self.queues = list(dict.fromkeys(queues))
        # Configured with no worker (count 0): not waited for, but worth a warning if not empty.
        self.unserved = list(dict.fromkeys(unserved))
        self.redis_url = redis_url
        self.manager_pid = manager_pid
        self.interval = max(MIN_CHECK_INTERVAL, min(interval, 1.0))
        self.horizon = interval  # "due within the poll interval"
        self.appname = appname
        self.started = time.time() if started is None else started  # the run's start
        self.client: Optional[qless.Client] = None

    def run(self) -> int:
        set_role("drain", self.appname)
        app = f"[{self.appname}]" if self.appname else ""
        set_title(f"qless-pool-drain{app}: watching {','.join(self.queues)}")
        self.client = control_client(self.redis_url, "drain")
        empty_looks = 0
        summary: Optional[Summary] = None
        outage = Outage(log)
        warned = not self.unserved
        while os.getppid() == self.manager_pid:
            if outage.ready(time.monotonic()):
                try:
                    if not warned:
                        self._warn_about_unserved_queues()
                        warned = True
                    empty_looks = empty_looks + 1 if self._drained() else 0
                    if empty_looks >= 2:
                        summary = self.summary()
                    outage.recovered(time.monotonic())
                except Exception as error:
                    if not redis_is_down(error):
                        raise
                    outage.failed(time.monotonic(), error)
                    empty_looks = 0
            if summary is not None:
                print(summary.line(), flush=True)
                # The manager answers QUIT by stopping its children, this one included; the
                # TERM must not turn the exit status (the run's verdict) into a signal.
                signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
                os.kill(self.manager_pid, signal.SIGQUIT)
                return summary.status
            time.sleep(min(self.interval, CONFIRM_AFTER) if empty_looks else self.interval)
        log.info("the manager is gone; the drain watcher exits")
        return 0

    def _warn_about_unserved_queues(self) -> None:
        assert self.client is not None
        for queue in self.unserved:
            counts = json.loads(self.client("queues", queue))
            jobs = sum(counts[state] for state in ("waiting", "scheduled", "stalled", "depends"))
            if jobs:
                log.warning(
                    "queue %s has %d job(s) but no worker (its count is 0): the drain does not "
                    "wait for it",
                    queue,
                    jobs,
                )

    def _drained(self) -> bool:
        assert self.client is not None
        redis = self.client.redis
        due = time.time() + self.horizon
        for queue in self.queues:
            counts = json.loads(self.client("queues", queue))
            if counts["waiting"] or counts["running"] or counts["stalled"]:
                return False
            for kind in ("scheduled", "recur"):
                if redis.zrangebyscore(f"ql:q:{queue}-{kind}", "-inf", due, start=0, num=1):
                    return False
        return True

    def summary(self) -> Summary:
        """Jobs of the configured queues completed, and failed, since the run started."""
        assert self.client is not None
        redis = self.client.redis
        completed = redis.zrangebyscore("ql:completed", self.started, "+inf")
        # A completed job no longer names its queue; its history's last put does.
        pipe = redis.pipeline(transaction=False)
        for jid in completed:
            pipe.lrange(f"ql:j:{jid}-history", 0, -1)
        queues = [_last_put_queue(history) for history in pipe.execute()]
        return Summary(
            sum(1 for queue in queues if queue in self.queues),
            self._failed_since_start(),
            time.time() - self.started,
            self.queues,
        )

    def _failed_since_start(self) -> int:
        """Failed jobs of the configured queues whose failure is from this run.

        Each failure group's list is newest first; it is read until a failure older than the
        run (qless records failure times in whole seconds, so the start is rounded down).
        """
        assert self.client is not None
        redis = self.client.redis
        since = int(self.started)
        failed = 0
        for group in redis.smembers("ql:failures"):
            start = 0
            while True:
                jids = redis.lrange(f"ql:f:{group}", start, start + 99)
                pipe = redis.pipeline(transaction=False)
                for jid in jids:
                    pipe.hmget(f"ql:j:{jid}", "failure", "queue")
                older = False
                for failure, queue in pipe.execute():
                    try:
                        when = json.loads(failure or "{}").get("when", 0)
                    except ValueError:
                        when = 0
                    if when < since:
                        older = True
                        break
                    failed += queue in self.queues
                if older or len(jids) < 100:
                    break
                start += 100
        return failed


def _last_put_queue(history: list[str]) -> Optional[str]:
    """The queue of a job's last ``put`` (qless-core keeps ``[when, what, {"q": ...}]``)."""
    for raw in reversed(history):
        try:
            entry = json.loads(raw)
        except ValueError:
            continue
        if isinstance(entry, list) and len(entry) > 2 and entry[1] == "put":
            return entry[2].get("q") if isinstance(entry[2], dict) else None
        if isinstance(entry, dict) and entry.get("what") == "put":
            return entry.get("q")
    return None


def run_watcher(watcher: DrainWatcher) -> int:
    """The drain watcher's process body (after the manager's fork)."""
    try:
        return watcher.run()
    except Exception:
        log.exception("the drain watcher failed")
        return 70
    finally:
        sys.stdout.flush()
