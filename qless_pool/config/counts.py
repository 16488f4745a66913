"""A config entry's worker count: a whole number (``4``) or a range the pool scales within
(``1..8``), read from what the YAML file holds. The rules are config/__init__.py's; this module
says what a count may be and why one is refused, and the caller names the file and the key."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Union

from .yamlfile import NotDecimal, shown

__all__ = ["MAX_RANGE", "BadCount", "Count", "Counts", "Groups", "Queues", "Range", "has_ranges",
           "highest", "kind", "lowest", "worker_count"]  # fmt: skip

#: The highest MAX of a range (--max-workers caps what the pool runs).
MAX_RANGE = 100_000

Queues = tuple[str, ...]


@dataclass(frozen=True)
class Range:
    """A worker count that follows the queues: from ``low`` to ``high`` (``1..8``); the pool
    scales within it (pool/scaling.py)."""

    low: int
    high: int

    def __str__(self) -> str:
        return f"{self.low}..{self.high}"


#: A group's worker count: fixed, or a range.
Count = Union[int, Range]
Groups = dict[Queues, Count]
#: Worker counts as the manager keeps them (a range resolved to what it wants now).
Counts = dict[Queues, int]
#: A range's count in the config's own words: ``1..8`` (spaces around the dots allowed).
RANGE = re.compile(r"^\s*(-?[0-9]+)\s*\.\.\s*(-?[0-9]+)\s*$", re.ASCII)


class BadCount(ValueError):
    """A count that cannot be used; the message says why (not where)."""


def lowest(count: Count) -> int:
    """The fewest workers ``count`` asks for (a range's low end)."""
    return count.low if isinstance(count, Range) else count


def highest(count: Count) -> int:
    """The most workers ``count`` asks for (a range's high end)."""
    return count.high if isinstance(count, Range) else count


def has_ranges(groups: Groups) -> bool:
    return any(isinstance(count, Range) for count in groups.values())


def worker_count(count: Any, max_workers: int) -> Count:
    """The count the file's value ``count`` means, or BadCount."""
    if isinstance(count, str) and ".." in count:
        return _worker_range(count, max_workers)
    if isinstance(count, NotDecimal):
        raise BadCount(
            f"the worker count must be a whole number in plain decimal, not {shown(count)}"
        )
    if isinstance(count, bool) or not isinstance(count, int):
        raise BadCount(f"the worker count must be a whole number, not {kind(count)}")
    if count < 0:
        raise BadCount(f"the worker count must not be negative ({count})")
    if count > max_workers:
        raise BadCount(f"the worker count must be at most {max_workers} ({count})")
    return count


def _worker_range(text: str, max_workers: int) -> Range:
    found = RANGE.match(text)
    if not found:
        raise BadCount(
            f"a worker count range is MIN..MAX, two whole numbers (1..8), not {shown(text)}"
        )
    if any(len(n.lstrip("-")) > 1 and n.lstrip("-")[0] == "0" for n in found.groups()):
        raise BadCount(
            f"a worker count range is two whole numbers in plain decimal, not {shown(text)}"
        )
    low, high = int(found.group(1)), int(found.group(2))
    if low < 0 or high < 0:
        raise BadCount(f"a worker count range must not be negative ({shown(text)})")
    if low > high:
        raise BadCount(f"a worker count range goes from low to high: {high}..{low}, not {text}")
    if low > max_workers:
        raise BadCount(f"the worker count must be at most {max_workers} ({shown(text)})")
    if high > MAX_RANGE:  # beyond --max-workers is allowed: the cap binds when scaling
        raise BadCount(f"a worker count range goes at most to {MAX_RANGE:,} ({shown(text)})")
    return Range(low, high)


def kind(value: Any) -> str:
    """What ``value`` is, in the words of an error message."""
    if value is None:
        return "empty"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, str):
        return f"a string ({shown(value)})"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, float):
        return f"a fraction ({shown(value)})"
    return f"{type(value).__name__} ({shown(value)})"
