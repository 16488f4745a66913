"""The application: loaded once in the manager (``preload``), and hooked into each worker.

``preload(specs)`` imports (and calls) the application in the manager before any fork, with
the collector off, then freezes its objects (``gc.freeze``) so that they stay shared,
copy-on-write, with every worker.

``after_prefork(fn)`` registers ``fn(worker)`` to run in every worker parent right after the
manager forks it, before the worker connects to Redis or takes a job: the place to reopen the
database connections, sockets and files that ``qless.pool.setup`` closed in the manager (they
must not be shared across a fork). Hooks run in the order they were registered.
"""

from __future__ import annotations

import gc
import importlib
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

__all__ = ["after_prefork", "after_prefork_hooks", "clear", "preload", "run_after_prefork"]

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


# --- preloading the application -------------------------------------------------------------------


def preload(specs: Iterable[str], include: Sequence[str] = ()) -> None:
    """Import (and call) the application in the manager, before any worker is forked.

    ``specs`` are ``module`` or ``module:callable``; ``include`` directories go on sys.path
    (the working directory always does). The collector is off while the application loads,
    and its objects are then frozen (``gc.freeze``), so that no collection in a worker writes
    to them: they stay shared, copy-on-write, between the manager and every worker.
    """
    for directory in [*include, os.getcwd()]:
        path = os.path.abspath(directory)
        if path not in sys.path:
            sys.path.insert(0, path)
    gc.disable()
    try:
        for spec in specs:
            module_name, _, attribute = spec.partition(":")
            module = importlib.import_module(module_name)
            if attribute:
                target: Any = module
                for part in attribute.split("."):
                    target = getattr(target, part)
                target()
    finally:
        gc.freeze()
        gc.enable()
