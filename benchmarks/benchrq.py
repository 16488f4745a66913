"""rq settings module (``rq worker-pool -c benchrq``): rq imports it in the pool's parent before
forking the workers, which makes it rq's way to preload the application ($BENCH_PRELOAD,
module names, comma-separated). It defines no settings."""

import importlib
import os

for _name in filter(None, os.environ.get("BENCH_PRELOAD", "").split(",")):
    importlib.import_module(_name)
