"""What a job's run comes to, as typed records, from the process that ran it to the settling.

    Report   what the run itself says: how the job settled itself, if it did (a job child
             writes it to its worker as one JSON line; a job run in the worker returns it)
    JobRun   a run that has ended, as the worker saw it: the job, its report, the child's
             wait status, why the worker stopped it (if it did), whether it timed out, and
             when its lock is due a heartbeat

settling.py turns a JobRun into what the worker sends qless, if anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

__all__ = ["JobRun", "Report"]


@dataclass
class Report:
    """A run's own account of itself (empty: it said nothing; its process died first).

    ``outcome``: ``"returned"`` (the job function returned, or called a plain ``complete()``:
    the worker completes it, with ``data``), or how the job settled itself: ``"complete"``,
    ``"fail"``, ``"retry"``, ``"move"``, ``"cancel"`` (``group``: of a fail or retry).
    ``unreported``: the command a job settled itself with while Redis was down, for the worker
    to send. ``cut_short``: the run was interrupted after its job called ``complete()``.
    """

    outcome: Optional[str] = None
    data: Optional[str] = None
    group: Optional[str] = None
    unreported: Optional[list[Any]] = None
    seconds: float = 0.0
    cut_short: bool = False

    @property
    def said_anything(self) -> bool:
        return self.outcome is not None or self.unreported is not None

    def to_json(self) -> dict[str, Any]:
        """As the job child writes it (the fields that are set)."""
        fields = {
            "outcome": self.outcome,
            "data": self.data,
            "group": self.group,
            "unreported": self.unreported,
            "seconds": self.seconds,
            "cut_short": self.cut_short or None,
        }
        return {key: value for key, value in fields.items() if value is not None}

    @classmethod
    def from_json(cls, message: Any) -> Report:
        """As the worker reads it; anything it cannot read is left out."""
        if not isinstance(message, dict):
            return cls()
        unreported = message.get("unreported")
        return cls(
            outcome=_text(message.get("outcome")),
            data=_text(message.get("data")),
            group=_text(message.get("group")),
            unreported=unreported if isinstance(unreported, list) else None,
            seconds=_number(message.get("seconds")),
            cut_short=message.get("cut_short") is True,
        )


@dataclass(frozen=True)
class JobRun:
    """A run that has ended (settling.settlement_for says what to send qless for it)."""

    job: dict[str, Any]  # as qless popped it
    report: Report = field(default_factory=Report)
    status: Optional[int] = None  # its child's wait status (None: run in process, or exiting)
    kill_reason: Optional[str] = None  # why the worker stopped it, if it did
    timed_out: bool = False  # it ran past --job-timeout
    lock_due: float = 0.0  # monotonic: when its lock is due a heartbeat (a complete goes by then)


def _text(value: Any) -> Optional[str]:
    return value if isinstance(value, str) else None


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0
