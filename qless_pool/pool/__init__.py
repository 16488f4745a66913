"""The pool: one manager process that forks a worker parent per configured slot and keeps the
counts right (manager.py), with what it forks beside the workers: the settler of a dead
worker's jobs (worker/will.py) and the drain watcher (drain.py); and the launcher every entry
starts it through (launch.py)."""

from .launch import run
from .manager import Pool

__all__ = ["Pool", "run"]
