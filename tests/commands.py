"""Running the commands as users run them, in a project directory: ``qless-pool`` and ``invoke``
(with a project's own tasks.py and application, whose steps are written to $CHAIN_LOG)."""

from __future__ import annotations

import os
import subprocess
import sys

from workers import TESTS, python_path

SCRIPT = os.path.join(os.path.dirname(sys.executable), "qless-pool")


def qless_pool(project, *args, env=None, timeout=30):
    environ = {
        k: v
        for k, v in os.environ.items()
        if k not in ("QLESS_ENV", "RACK_ENV", "RAILS_ENV", "QLESS_URL", "REDIS_URL")
    }
    environ.update(env or {})
    return subprocess.run(
        [SCRIPT, *args], cwd=project, env=environ, capture_output=True, text=True, timeout=timeout
    )


def one_line(result) -> str:
    """The single line on stderr (and nothing that looks like a traceback)."""
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


INVOKE = os.path.join(os.path.dirname(sys.executable), "invoke")


USER_TASKS = """\
import os
from invoke import Collection, task
import qless_pool.tasks

def record(what):
    with open(os.environ["CHAIN_LOG"], "a") as log:
        log.write(f"{what} {os.getpid()}\\n")

@task
def environment(c):
    record("environment")

@task
def close_connections(c):
    record("pool-setup")

ns = Collection(environment, close_connections)
ns.add_collection(
    qless_pool.tasks.collection(setup=[environment], pool_setup=[close_connections])
)
"""

CHAIN_APP = """\
import os
import qless_pool

with open(os.environ["CHAIN_LOG"], "a") as log:
    log.write(f"preload {os.getpid()}\\n")

@qless_pool.after_prefork
def record_worker(worker):
    with open(os.environ["CHAIN_LOG"], "a") as log:
        log.write(f"after_prefork {os.getpid()} {os.getppid()}\\n")
"""


# A project run by `invoke`: its own tasks.py chaining qless_pool's tasks, and an application.
INVOKE_PROJECT = {"tasks.py": USER_TASKS, "chainapp.py": CHAIN_APP, "qless-pool.yml": "foo: 2\n"}


def invoke(project, redis_url, *args, env=None, timeout=60):
    environ = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("INVOKE_", "QLESS_", "RACK_ENV", "RAILS_ENV", "QUEUES"))
    }
    environ.update(
        {
            "CHAIN_LOG": str(project / "chain.log"),
            "QLESS_URL": redis_url,
            "PYTHONPATH": python_path(TESTS, project),
        }
    )
    environ.update(env or {})
    return subprocess.run(
        [INVOKE, *args], cwd=project, env=environ, capture_output=True, text=True, timeout=timeout
    )
