"""One qless-pool worker started on its own, without a pool: it imports the application itself
($BENCH_PRELOAD, module names, comma-separated) and runs ``qless_pool.worker.Worker``.

    python benchmarks/independent_worker.py URL QUEUE [INTERVAL]

The start-up scenario starts eight of these side by side against one pool of eight.
"""

from __future__ import annotations

import importlib
import os
import sys

from qless_pool import logs
from qless_pool.worker import Worker

if __name__ == "__main__":
    url, queue = sys.argv[1:3]
    interval = float(sys.argv[3]) if len(sys.argv) > 3 else 5.0
    logs.configure("WARNING")
    for name in filter(None, os.environ.get("BENCH_PRELOAD", "").split(",")):
        importlib.import_module(name)
    sys.exit(Worker([queue], url, interval=interval).work())
