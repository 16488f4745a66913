"""The pool's state for ``qless-pool status``, the metrics helper and operators: manager.json
(ops/state.py says where), rewritten by the manager when anything in it changed.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Optional

from ..logs import logger
from ..ops.state import PoolState
from ..urls import mask_secrets
from .table import active_by_group

if TYPE_CHECKING:
    from .manager import Pool

__all__ = ["StatePublisher", "effective_options"]

log = logger.getChild("manager")


class StatePublisher:
    """Writes a pool's manager.json, best effort (the jobs come first): a directory removed
    under the pool is made again; a write that fails is said once, and tried again."""

    def __init__(self, state: PoolState, restore_metrics: Any = None):
        self.state = state
        self.restore_metrics = restore_metrics  # called when the directory is made again
        self._published: Any = None
        self._problem: Optional[str] = None  # why the state cannot be written, once said
        self._written = False  # manager.json is there (or was, if intact() says no)

    def publish(self, pool: Pool) -> None:
        """Rewrite manager.json when anything in it has changed (spawns, reaps, signals)."""
        now = time.monotonic()
        desired = pool.desired() if pool.groups is not None else {}
        scaling = pool.scaler.report()  # the range groups (ranges.py)
        backoffs = {q: b.until for q, b in pool.backoffs.items() if b.failures and b.until > now}
        snapshot = (
            tuple(pool.workers.values()),
            tuple(desired.items()),
            tuple(backoffs.items()),
            pool.stopping,
            tuple(pool.restarts.values()),
            pool.metrics_pid,
            str(pool.last_reload),
            str(list(pool.reloads)),
            pool.successor.serving if pool.successor is not None else None,
            str(scaling),
            pool.scaler.redis_down,  # "holding: Redis unreachable" is news too
        )
        if snapshot == self._published and self.state.intact():
            return
        wall = time.time() - now  # monotonic -> epoch
        groups = []
        active = active_by_group(pool.workers.values())
        for queues in dict.fromkeys([*desired, *(w.queues for w in pool.workers.values())]):
            groups.append(
                {
                    "queues": list(queues),
                    "desired": desired.get(queues, 0),
                    "live": len(active.get(queues, ())),
                    "backoff_until": wall + backoffs[queues] if queues in backoffs else None,
                    **_scaling(scaling.get(queues), pool.scaler.redis_down),
                }
            )
        data = {
            "version": 1,
            "pid": pool.pid,
            "started": pool.started,
            "directory": pool.directory,
            "start_directory": pool.start_directory,  # as given: a `current` symlink
            "appname": pool.appname,
            "config": pool.source.name,
            "environment": pool.source.environment,
            # Never the password: the state is files any process of the pool's user can read.
            "redis_shown": mask_secrets(pool.redis_url),
            "redis_masked": mask_secrets(pool.redis_url) != pool.redis_url,
            "stopping": pool.stopping,
            "winched": pool.winched,
            "groups": groups,
            "workers": [
                {
                    "pid": w.pid,
                    "queues": list(w.queues),
                    "started": wall + w.started_at,
                    "retiring": w.retiring,
                }
                for w in pool.workers.values()
            ],
            "restarts": dict(pool.restarts),
            "last_reload": pool.last_reload,
            "options": pool.effective_options(),
            "drain_pid": pool.drain_pid,
            "metrics_pid": pool.metrics_pid,
            # qless-pool reload (pool/reload.py): the last reloads, by their request ids; the
            # manager this pool was handed over to (it only finishes its jobs now); a manager
            # still taking over from its predecessor.
            "reloads": list(pool.reloads),
            "handed_over_to": pool.handover.new_pid if pool.handed_over and pool.handover else None,
            "taking_over_from": (
                pool.successor.predecessor
                if pool.successor is not None and not pool.successor.serving
                else None
            ),
            "took_over": (
                {"from": pool.successor.predecessor, "request": pool.successor.request}
                if pool.successor is not None and pool.successor.serving
                else None
            ),
        }
        try:
            if not self.state.intact():
                if self._written:
                    log.warning(
                        "the pool's state in %s was removed under it; making it again (the "
                        "running workers' records for qless-pool status are lost)",
                        self.state.directory,
                    )
                    self._written = False
                self.state.restore()
                if self.restore_metrics is not None:
                    self.restore_metrics()
            self.state.write_manager(data)
        except OSError as error:
            # Tried again on every turn (intact() says no) or change; said once, not each time.
            if str(error) != self._problem:
                log.warning("cannot write the pool's state (for qless-pool status): %s", error)
                self._problem = str(error)
            return
        self._published = snapshot
        self._written = True
        if self._problem is not None:
            log.info("the pool's state is written again, in %s", self.state.directory)
            self._problem = None


def effective_options(pool: Pool) -> dict[str, Any]:
    """The options (options.py) as this pool holds them, the Redis password masked: its own,
    its workers', and what its launcher did (``launch_options``)."""
    return {
        **pool.launch_options,
        "config": pool.source.name,
        "environment": pool.source.environment,
        "max_workers": pool.source.max_workers,
        "appname": pool.appname,
        "redis": mask_secrets(pool.redis_url),
        "spawn_delay": pool.spawn_delay,
        "single_process_group": pool.single_process_group,
        "term": pool.term_behaviour,
        "drain": pool.drain,
        "scale_interval": pool.scaler.settings.interval,
        "scale_up_after": pool.scaler.settings.up_after,
        "scale_down_after": pool.scaler.settings.down_after,
        "scale_step": pool.scaler.settings.step,
        **pool.worker_options,
    }


def _scaling(report: Optional[dict[str, Any]], redis_down: Optional[str]) -> dict[str, Any]:
    """A range group's part of its entry: its range, and how the scaler sees it."""
    if report is None:
        return {}
    return {"range": report["range"], "scaling": {**report, "redis_down": redis_down}}


# --- start and the loop ---------------------------------------------------------------------
