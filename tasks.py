"""The project's own Invoke tasks: ``invoke test``, ``invoke lint``."""

import sys

from invoke import Collection, task


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


ns = Collection(test, lint)
