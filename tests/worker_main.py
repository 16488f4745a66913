"""Run one qless_pool.worker.Worker from the command line, for the tests.

    python worker_main.py '{"queues": ["foo"], "redis_url": "...", ...}'

``"orphanable": true`` runs the worker under an intermediate process that prints the worker's
pid and then waits: killing it orphans the worker.
"""

import json
import os
import sys
import time

from qless_pool import logs
from qless_pool.worker import Worker

options = json.loads(sys.argv[1])
logs.configure("DEBUG")
if options.pop("orphanable", False):
    pid = os.fork()
    if pid:
        print(pid, flush=True)
        while True:
            time.sleep(60)
    options["watch_parent"] = os.getppid()
sys.exit(Worker(**options).work())
