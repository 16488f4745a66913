"""qless-pool: a pool manager for qless job workers.

One YAML file maps queue lists to worker counts; one manager process loads the application once,
forks a worker parent per slot, keeps the counts right and obeys Unix signals. See README.md.
"""

from __future__ import annotations

from importlib import metadata

try:
    __version__ = metadata.version("qless-pool")
except metadata.PackageNotFoundError:  # pragma: no cover - running from an uninstalled tree
    __version__ = "0+unknown"

from .client import connect, patch_qless
from .hooks import after_prefork
from .manager import Pool, run

__all__ = ["Pool", "__version__", "after_prefork", "connect", "patch_qless", "run"]
