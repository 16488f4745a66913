"""Hooks: plain callables the pool runs at fixed points of a worker's life.

``after_prefork(fn)`` registers ``fn(worker)`` to run in every worker parent right after the
manager forks it, before the worker connects to Redis or takes a job: the place to reopen the
database connections, sockets and files that ``qless.pool.setup`` closed in the manager (they
must not be shared across a fork). Hooks run in the order they were registered.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["after_prefork", "after_prefork_hooks", "clear", "run_after_prefork"]

Hook = TypeVar("Hook", bound=Callable[[Any], Any])

_after_prefork: list[Callable[[Any], Any]] = []


def after_prefork(fn: Hook) -> Hook:
    """Register ``fn(worker)`` to run in each worker parent after the fork; usable as a decorator."""
    if not callable(fn):
        raise TypeError(f"after_prefork needs a callable, not {fn!r}")
    _after_prefork.append(fn)
    return fn


def after_prefork_hooks() -> tuple[Callable[[Any], Any], ...]:
    return tuple(_after_prefork)


def run_after_prefork(worker: Any) -> None:
    """Run every after_prefork hook, in order; an exception stops the worker's start."""
    for hook in tuple(_after_prefork):
        hook(worker)


def clear() -> None:
    """Forget every registered hook (for tests and embedding)."""
    _after_prefork.clear()
