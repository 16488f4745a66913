"""The project's own Invoke tasks: ``invoke test``, ``invoke lint``, ``invoke demo``, ``invoke bench``.

``qless.*`` is qless-pool's own collection, mounted as a user would mount it: ``invoke
qless.pool`` runs the pool here with config/qless-pool.yml.
"""

import shlex
import sys
from pathlib import Path

from invoke import Collection, task

import qless_pool.tasks


@task(
    help={
        "args": "extra pytest arguments, e.g. '-k config -x'",
        "slow": "run the long chaos and benchmark runs instead (CI runs both)",
        # 3 on 2 cores: the tests mostly wait, on processes and Redis.
        "workers": "test processes side by side (pytest-xdist; default 3; 0: one process)",
    }
)
def test(c, args="", slow=False, workers=3):
    """Run the test suite (starts its own redis-server in each test process)."""
    # sys.executable: the interpreter Invoke runs in, so `.venv/bin/invoke test` needs no
    # activated virtual environment.
    if slow:  # one at a time: each is a long run that loads the machine on its own
        c.run(f"{sys.executable} -m pytest -m slow {args}", pty=False)
        return
    parallel = f"-n {int(workers)}" if int(workers) else ""
    c.run(f"{sys.executable} -m pytest -m 'not slow' {parallel} {args}", pty=False)


@task
def lint(c):
    """ruff check, ruff format --check, and mypy (strict on the package)."""
    c.run(f"{sys.executable} -m ruff check .")
    c.run(f"{sys.executable} -m ruff format --check .")
    c.run(f"{sys.executable} -m mypy")


@task
def wheel(c):
    """Build the wheel from a clean clone of HEAD, check what it carries, install it in a fresh
    virtual environment and run ``qless-pool --version`` there (CI runs this)."""
    import tempfile
    import zipfile

    with tempfile.TemporaryDirectory(prefix="qless-pool-wheel-") as temp:
        source, dist, venv = (f"{temp}/{name}" for name in ("source", "dist", "venv"))
        c.run(f"git clone -q --no-local . {source}")
        c.run(f"{sys.executable} -m build -q --wheel --outdir {dist} {source}", hide=True)
        [built] = Path(dist).glob("qless_pool-*.whl")
        names = zipfile.ZipFile(built).namelist()
        wanted = [
            "qless_pool/py.typed",
            "qless_pool/__main__.py",
            "qless_pool/worker/base.py",
            "qless_pool/web/templates/base.html",
            "qless_pool/web/static/app.js",
        ]
        missing = [name for name in wanted if name not in names]
        missing += (
            [] if any(n.endswith(".dist-info/licenses/LICENSE") for n in names) else ["LICENSE"]
        )
        stray = [name for name in names if name.startswith(("tests/", "benchmarks/", "examples/"))]
        if missing or stray:
            raise SystemExit(f"{built.name}: missing {missing}, should not carry {stray}")
        c.run(f"{sys.executable} -m venv {venv}")
        c.run(f"{venv}/bin/pip install -q {built}", hide=True)
        version = c.run(f"{venv}/bin/qless-pool --version", hide="out").stdout.strip()
        # The core install has no Flask: the dashboard says which extra it needs.
        web = c.run(f"{venv}/bin/qless-pool web", hide=True, warn=True)
        if web.exited != 2 or "pip install 'qless-pool[web]'" not in web.stderr:
            raise SystemExit(f"qless-pool web without the web extra: {web.stderr.strip()}")
        print(
            f"{built.name}: {len(names)} files, LICENSE and py.typed in; installs; {version}; "
            "qless-pool web asks for the web extra"
        )


@task(help={"jobs": "how many jobs to enqueue (default 300)"})
def demo(c, jobs=300):
    """Run the pool on a few hundred example jobs (an embedded Redis unless $QLESS_URL is set)."""
    sys.path.insert(0, "examples/demo")
    from demo import run_demo

    status = run_demo(jobs=int(jobs))
    if status:
        raise SystemExit(status)


@task(
    help={
        "quick": "every scenario, smaller (under 2 minutes)",
        "tiny": "every scenario with tiny numbers (the CI smoke test; measures nothing)",
        "scenario": "comma-separated: throughput, pickup, startup, memory, respawn, hup, idle, fork",
        "contenders": "comma-separated contender names (see --list)",
        "workers": "throughput worker counts, comma-separated (default 1,2,4,8)",
        "jobs": "throughput jobs per run",
        "puts": "pickup puts per run",
        "rounds": "rounds (repetitions) of every scenario",
        "out": "the results file (default: benchmarks/results.json for a full run, "
        "else benchmarks/results-last.json)",
        "docs": "also rewrite docs/BENCHMARKS.md and its plots after a partial run",
        "report": "run nothing: rewrite docs/BENCHMARKS.md and its plots from the results file",
        "keep": "keep the run's temp directory (logs of every process)",
        "list": "list the scenarios and contenders",
    }
)
def bench(
    c,
    quick=False,
    tiny=False,
    scenario="",
    contenders="",
    workers="",
    jobs=0,
    puts=0,
    rounds=0,
    out="",
    docs=False,
    report=False,
    keep=False,
    list_=False,
):
    """Benchmark qless-pool against its peers side by side (see docs/BENCHMARKS.md)."""
    here = Path(__file__).resolve().parent / "benchmarks"
    if report:
        command = [sys.executable, str(here / "report.py"), out or str(here / "results.json")]
        c.run(shlex.join([*command, "--docs"]), pty=False)
        return
    command = [sys.executable, str(here / "run.py")]
    flags = {"--quick": quick, "--tiny": tiny, "--docs": docs, "--keep": keep, "--list": list_}
    command += [flag for flag, on in flags.items() if on]
    options = {
        "--scenario": scenario,
        "--contenders": contenders,
        "--workers": workers,
        "--jobs": jobs,
        "--puts": puts,
        "--rounds": rounds,
        "--out": out,
    }
    for option, value in options.items():
        if value:
            command += [option, str(value)]
    c.run(shlex.join(command), pty=False)


ns = Collection(test, lint, wheel, demo, bench)
ns.add_collection(qless_pool.tasks)
