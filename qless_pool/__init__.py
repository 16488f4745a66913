"""qless-pool: a pool manager for qless job workers.

One YAML file maps queue lists to worker counts; one manager process loads the application once,
forks a worker parent per slot, keeps the counts right and obeys Unix signals. See README.md and docs/
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

#: The public names (and ``__version__``), imported on first use: the ``qless-pool`` command
#: hides a password given on its command line before it imports qless and redis (a few hundred
#: milliseconds).
_EXPORTS = {
    "Pool": "pool",
    "run": "pool",
    "after_prefork": "hooks",
    "connect": "client",
    "patch_qless": "client",
}

__all__ = ["Pool", "__version__", "after_prefork", "connect", "patch_qless", "run"]


def __getattr__(name: str) -> Any:
    if name == "__version__":
        globals()[name] = _version()
        return globals()[name]
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'qless_pool' has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("qless-pool")
    except metadata.PackageNotFoundError:  # pragma: no cover - an uninstalled tree
        return "0+unknown"


def __dir__() -> list[str]:
    return sorted(__all__)
