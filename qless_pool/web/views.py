"""What the pages and the API show, shaped from operations.py's plain data: secrets hidden,
times readable, qless's statistics as chart bars. No Flask here."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from ..ops.operations import Operations, QueueCounts
from ..urls import mask_secrets

__all__ = ["DEFAULT_HIDDEN_KEYS", "Shaper", "histogram", "queue_stats", "totals"]

#: Job data keys whose values are never shown: a key is hidden when its name contains one of
#: these, both read in lower case without ``_`` and ``-`` (so ``accessKey``, ``ACCESS-KEY`` and
#: ``access_key`` are all hidden by ``access_key``).
DEFAULT_HIDDEN_KEYS = (
    "password", "passwd", "passphrase", "pwd", "secret", "token", "api_key", "apikey", "access_key",
    "private_key", "credential", "authorization", "cookie", "session_key", "signature",
)  # fmt: skip
HIDDEN = "[hidden]"
#: qless's histogram: 60 one-second buckets, 59 one-minute, 23 one-hour, 6 one-day.
BUCKETS = ((60, 1, "s"), (59, 60, "m"), (23, 3600, "h"), (6, 86400, "d"))


def _bare(key: str) -> str:
    return key.strip().lower().replace("_", "").replace("-", "")


class Shaper:
    """Hides what the dashboard must not show: data keys named like secrets (``hidden_keys``)
    and any password in a URL in text (a failure message, a traceback)."""

    def __init__(self, hidden_keys: Sequence[str] = DEFAULT_HIDDEN_KEYS):
        self.hidden_keys = tuple(dict.fromkeys(k for k in map(_bare, hidden_keys) if k))

    def hides(self, key: str) -> bool:
        name = _bare(key)
        return any(hidden in name for hidden in self.hidden_keys)

    def data(self, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: HIDDEN if self.hides(str(k)) else self.data(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.data(v) for v in value]
        if isinstance(value, str):
            return mask_secrets(value)
        return value

    def job(self, job: dict[str, Any]) -> dict[str, Any]:
        """qless's record of a job, fit to show."""
        shown = {**job, "data": self.data(job.get("data"))}
        for key in ("tags", "dependencies", "dependents", "history"):
            if shown.get(key) == {}:  # qless's Lua encodes an empty list as {}
                shown[key] = []
        failure = job.get("failure")
        if isinstance(failure, dict) and failure:
            shown["failure"] = {**failure, "message": mask_secrets(str(failure.get("message")))}
        else:
            shown["failure"] = None
        return shown


def totals(queues: Sequence[QueueCounts]) -> dict[str, int]:
    keys = ("waiting", "running", "scheduled", "stalled", "depends", "recurring")
    return {key: sum(getattr(q, key) for q in queues) for key in keys}


def queue_rows(queues: Sequence[QueueCounts]) -> list[dict[str, Any]]:
    return [asdict(q) for q in queues]


def queue_stats(ops: Operations, queue: str) -> dict[str, Any]:
    """qless's statistics of ``queue`` for today (UTC): wait and run, count, mean, std, and
    the histogram as bars."""
    stats = json.loads(ops.client("stats", queue, time.time()))
    shaped: dict[str, Any] = {"failed": stats.get("failed", 0), "retries": stats.get("retries", 0)}
    for kind in ("wait", "run"):
        part = stats.get(kind) or {}
        shaped[kind] = {
            "count": part.get("count", 0),
            "mean": part.get("mean", 0.0),
            "std": part.get("std", 0.0),
            "bars": histogram(part.get("histogram") or []),
        }
    return shaped


def histogram(counts: Sequence[int]) -> dict[str, Any]:
    """qless's 148 buckets as SVG bars (x, height in a 100-high box) with axis labels."""
    counts = [int(c or 0) for c in counts]
    highest = max(counts, default=0)
    bars, labels, index = [], [], 0
    for size, step, unit in BUCKETS:
        labels.append({"x": index * 4, "text": f"{step if step > 1 else 0}{unit}"[:4]})
        for bucket in range(size):
            count = counts[index] if index < len(counts) else 0
            if count:
                bars.append(
                    {
                        "x": index * 4,
                        "height": max(1.0, 100.0 * count / highest),
                        "title": f"{count:,} in {_bucket_name(bucket, step, unit)}",
                    }
                )
            index += 1
    return {"bars": bars, "labels": labels, "width": index * 4, "highest": highest}


def _bucket_name(bucket: int, step: int, unit: str) -> str:
    low = bucket + (1 if step > 1 else 0)
    return f"{low}-{low + 1}{unit}"


def when(epoch: Any) -> str:
    """An epoch as UTC text; '' for none."""
    try:
        value = float(epoch)
    except (TypeError, ValueError):
        return ""
    if value <= 0:
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(value))


def pretty(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False, default=str)


_JID = re.compile(r"^[A-Za-z0-9_.:-]{1,200}$")


def looks_like_jid(text: str) -> bool:
    return bool(_JID.match(text))
