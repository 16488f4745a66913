"""The project's own Invoke tasks: ``invoke test``, ``invoke lint``, ``invoke demo``.

``qless.*`` is qless-pool's own collection, mounted as a user would mount it: ``invoke
qless.pool`` runs the pool here with config/qless-pool.yml.
"""

import sys

from invoke import Collection, task

import qless_pool.tasks


@task(help={"args": "extra pytest arguments, e.g. '-k config -x'"})
def test(c, args=""):
    """Run the test suite (starts its own redis-server)."""
    # sys.executable: the interpreter Invoke runs in, so `.venv/bin/invoke test` needs no
    # activated virtual environment.
    c.run(f"{sys.executable} -m pytest {args}", pty=False)


@task
def lint(c):
    """ruff check and ruff format --check."""
    c.run(f"{sys.executable} -m ruff check .")
    c.run(f"{sys.executable} -m ruff format --check .")


@task(help={"jobs": "how many jobs to enqueue (default 300)"})
def demo(c, jobs=300):
    """Run the pool on a few hundred example jobs (an embedded Redis unless $QLESS_URL is set)."""
    sys.path.insert(0, "examples/demo")
    from demo import run_demo

    status = run_demo(jobs=int(jobs))
    if status:
        raise SystemExit(status)


ns = Collection(test, lint, demo)
ns.add_collection(qless_pool.tasks)
