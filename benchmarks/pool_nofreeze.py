"""``qless-pool`` with the application preloaded but *not* frozen: the memory scenario's
"pool without gc.freeze". Same command line as ``qless-pool``; the -m modules are imported (and
their callables called) here with the collector left on and nothing frozen, and the pool is
then started as the Invoke tasks start it, with the application already loaded."""

from __future__ import annotations

import importlib
import os
import sys

from qless_pool import cli
from qless_pool.pool.launch import launch

if __name__ == "__main__":
    values = vars(cli.build_parser().parse_args())
    for directory in [*(values["include"] or []), os.getcwd()]:
        sys.path.insert(0, os.path.abspath(directory))
    for spec in values["preload"] or []:
        module_name, _, attribute = spec.partition(":")
        module = importlib.import_module(module_name)
        if attribute:
            getattr(module, attribute)()
    sys.exit(launch(values, preloaded=True))
