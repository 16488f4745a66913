"""Preloaded by the "no preload" pool variants: the application ($BENCH_WORKER_LOAD, module
names, comma-separated) is not loaded in the manager but in each worker, right after the fork,
through an after_prefork hook: what a pool without preloading does."""

import importlib
import os

import qless_pool


@qless_pool.after_prefork
def load_application(worker) -> None:
    for name in filter(None, os.environ.get("BENCH_WORKER_LOAD", "").split(",")):
        importlib.import_module(name)
