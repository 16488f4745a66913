"""Invoke tasks: ``qless.setup`` -> ``qless.pool.setup`` -> ``qless.pool``, and ``qless.work``.

The Ruby gem's Rake chain, for Invoke::

    # tasks.py
    from invoke import Collection, task
    import qless_pool.tasks

    @task
    def environment(c):            # load the application (runs before qless.setup)
        import myapp; myapp.init()

    @task
    def close_connections(c):      # runs before qless.pool.setup, in the manager
        from myapp import db; db.engine.dispose()

    ns = Collection(environment, close_connections)
    ns.add_collection(qless_pool.tasks.collection(setup=[environment], pool_setup=[close_connections]))
    # or, with no hooks of your own: ns.add_collection(qless_pool.tasks)

``invoke qless.pool`` runs the chain once each, then turns its own process (the application is
loaded in it) into the pool manager: no re-exec, no subprocess.

Two Invoke traps are designed around here (Invoke 3.0.3). Replacing a task by name does not
rewire the ``pre=`` of tasks that already reference the original, so the user's tasks are
handed to :func:`collection`, which builds the chain around them. And a pre-task sees only the
root collection's configuration, so the settings are not kept in this collection's
configuration: they are read from the Invoke config the files and the environment give (the
``qless_pool:`` section of ``invoke.yaml``, ``INVOKE_QLESS_POOL_*``), which every task sees.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any, Optional

from invoke import Collection, Task
from invoke.exceptions import Exit

__all__ = ["SETTINGS", "collection", "settings"]

#: Settings under ``qless_pool:`` in the Invoke config (or ``INVOKE_QLESS_POOL_<NAME>``), each
#: with its type and the ``qless-pool`` option it stands for (None: used by the tasks).
SETTINGS: dict[str, tuple[type, Optional[str]]] = {
    "config": (str, "--config"),
    "environment": (str, "--environment"),
    "redis": (str, "--redis"),
    "appname": (str, "--appname"),
    "preload": (list, None),
    "include": (list, None),
    "interval": (float, "--interval"),
    "reserver": (str, "--reserver"),
    "fork_per_job": (bool, None),
    "job_timeout": (float, "--job-timeout"),
    "prefetch": (int, "--prefetch"),
    "max_jobs": (int, "--max-jobs"),
    "max_jobs_jitter": (int, "--max-jobs-jitter"),
    "max_memory": (int, "--max-memory"),
    "graceful_timeout": (float, "--graceful-timeout"),
    "metrics_port": (int, "--metrics-port"),
    "metrics_address": (str, "--metrics-address"),
    "allow_modules": (list, "--allow-module"),
    "spawn_delay": (float, "--spawn-delay"),
    "max_workers": (int, "--max-workers"),
    "term": (str, None),
    "log_level": (str, "--log-level"),
    "pidfile": (str, "--pidfile"),
    "stdout": (str, "--stdout"),
    "stderr": (str, "--stderr"),
    "lock": (str, "--lock"),
    "user": (str, "--user"),
    "group": (str, "--group"),
    "daemon": (bool, None),
    "drain": (bool, None),
    "queues": (list, None),
}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


#: Our variables, taken out of the environment when this module is imported (Invoke imports
#: the tasks before it reads the environment). Invoke would otherwise cast each to the type
#: invoke.yaml gives the setting, and fail before any task runs: a list can take no variable
#: (UncastableEnvVar), and int("0.5") raises. Here every one is read as the settings say.
ENVIRONMENT_PREFIX = "INVOKE_QLESS_POOL_"
_TAKEN = {
    name: os.environ.pop(name) for name in list(os.environ) if name.startswith(ENVIRONMENT_PREFIX)
}


def settings(c: Any) -> dict[str, Any]:
    """The ``qless_pool`` settings, typed: ``INVOKE_QLESS_POOL_<NAME>``, else the Invoke config
    (``invoke.yaml``).

    The environment is read here, not by Invoke: Invoke loads ``INVOKE_*`` variables only for
    settings it already knows of, only from the root collection for a pre-task, and casts them
    to the file's types (see _TAKEN).
    """
    configured = c.config.get("qless_pool", None) or {}
    found: dict[str, Any] = {}
    for name, (kind, _) in SETTINGS.items():
        variable = f"{ENVIRONMENT_PREFIX}{name.upper()}"
        raw = os.environ.get(variable, _TAKEN.get(variable))
        if raw is None:
            raw = configured.get(name) if isinstance(configured, Mapping) else None
        if raw is not None:
            found[name] = _typed(name, kind, raw)
    return found


def _typed(name: str, kind: type, raw: Any) -> Any:
    if kind is list:
        if isinstance(raw, str):
            return [part for part in raw.replace(",", " ").split() if part]
        if isinstance(raw, (list, tuple)):
            return [str(part) for part in raw]
    elif kind is bool:
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in _TRUE or text in _FALSE:
            return text in _TRUE
    elif kind is int and isinstance(raw, float):
        if raw.is_integer():
            return int(raw)
    elif kind is str and isinstance(raw, str) and not raw.strip():
        # Most often an unset variable (INVOKE_QLESS_POOL_USER=$RUN_AS): never the default.
        raise Exit(f"qless_pool.{name}: empty (an unset variable?)", code=2)
    elif not isinstance(raw, bool):  # YAML's yes/no are not numbers or names
        try:
            return kind(raw)
        except (TypeError, ValueError):
            pass
    what = {list: "a list", bool: "true or false", int: "a whole number", float: "a number"}
    raise Exit(
        f"qless_pool.{name}: must be {what.get(kind, 'a string')}, not {raw!r}", code=2
    ) from None


def _command_line(found: Mapping[str, Any]) -> list[str]:
    """The ``qless-pool`` arguments the settings stand for."""
    argv: list[str] = []
    for name, value in found.items():
        option = SETTINGS[name][1]
        if option is None:
            continue
        for item in value if isinstance(value, list) else [value]:
            argv += [option, str(item)]
    if found.get("fork_per_job") is False:
        argv.append("--no-fork-per-job")
    if found.get("term"):
        argv.append(f"--term-{found['term']}")
    if found.get("daemon"):
        argv.append("--daemon")
    if found.get("drain"):
        argv.append("--drain")
    return argv


# --- the task bodies ------------------------------------------------------------------------------


def _setup(c: Any) -> None:
    """Load the application in this process (the `preload` setting's modules)."""
    from .hooks import preload

    found = settings(c)
    if found.get("metrics_port"):
        from .ops import metrics

        # prometheus_client picks its mode when first imported: before the application is.
        metrics.prepare()
    preload(found.get("preload", ()), found.get("include", ()))


def _pool_setup(c: Any) -> None:
    """Close what must not cross a fork (a hook: chain your own tasks before it)."""


def _pool(
    c: Any,
    config: Optional[str] = None,
    environment: Optional[str] = None,
    redis: Optional[str] = None,
    interval: Optional[str] = None,
    job_timeout: Optional[str] = None,
    reserver: Optional[str] = None,
    no_fork_per_job: bool = False,
    daemon: bool = False,
    drain: bool = False,
) -> None:
    """Run the pool manager in this process (after qless.setup and qless.pool.setup)."""
    from .cli import build_parser, launch

    found = settings(c)
    flags = {"config": config, "environment": environment, "redis": redis}
    found.update({name: value for name, value in flags.items() if value is not None})
    found.update(_worker_flags(interval, job_timeout, reserver, no_fork_per_job))
    found.update({name: True for name, value in (("daemon", daemon), ("drain", drain)) if value})
    args = build_parser().parse_args(_command_line(found))
    status = launch(args, preloaded=True)
    if status:
        raise Exit(code=status)


def _worker_flags(
    interval: Optional[str],
    job_timeout: Optional[str],
    reserver: Optional[str],
    no_fork_per_job: bool,
) -> dict[str, Any]:
    """The worker options given as task flags, typed as the settings are."""
    flags: dict[str, Any] = {}
    for name, value in (("interval", interval), ("job_timeout", job_timeout)):
        if value is not None:
            flags[name] = _typed(name, float, value)
    if reserver:
        flags["reserver"] = reserver
    if no_fork_per_job:
        flags["fork_per_job"] = False
    return flags


def _work(
    c: Any,
    queues: Optional[str] = None,
    redis: Optional[str] = None,
    interval: Optional[str] = None,
    job_timeout: Optional[str] = None,
    reserver: Optional[str] = None,
    no_fork_per_job: bool = False,
) -> None:
    """Run one worker in the foreground on --queues (or $QUEUES), like rake qless:work."""
    from . import logs
    from .cli import bad_redis_url
    from .client import database_problem
    from .config import CONTROL_CHARACTER
    from .urls import redis_url_and_origin
    from .worker.base import Worker

    found = settings(c)
    if redis is not None:
        found["redis"] = _typed("redis", str, redis)
    found.update(_worker_flags(interval, job_timeout, reserver, no_fork_per_job))
    names = queues or os.environ.get("QUEUES") or ",".join(found.get("queues", []))
    queue_list = [name.strip() for name in names.split(",") if name.strip()]
    if not queue_list:
        raise Exit("qless.work: name the queues with --queues foo,bar or QUEUES=foo,bar", code=2)
    for name in queue_list:
        control = CONTROL_CHARACTER.search(name)
        if control:
            raise Exit(
                f"qless.work: queue {name!r} holds the control character {control.group(0)!r}",
                code=2,
            )
    appname = found.get("appname") or os.path.basename(os.getcwd())
    logs.configure(found.get("log_level", "INFO"), appname=appname)
    options = {
        k: found[k]
        for k in (
            "interval",
            "reserver",
            "fork_per_job",
            "prefetch",
            "job_timeout",
            "allow_modules",
        )
        if k in found
    }
    url = found.get("redis")
    problem = bad_redis_url(url)
    if problem:
        raise Exit(problem, code=2)
    problem = database_problem(redis_url_and_origin(url)[0])
    if problem:
        raise Exit(f"qless.work: {problem}", code=2)
    try:
        worker = Worker(queue_list, url, appname=appname, **options)
    except ValueError as error:  # a bad reserver, interval ...
        raise Exit(f"qless.work: {error}", code=2) from None
    worker.work()


_WORKER_HELP = {
    "redis": "qless's Redis URL (setting: redis)",
    "interval": "seconds between an idle worker's polls (setting: interval)",
    "job-timeout": "kill a job running longer and fail it (setting: job_timeout)",
    "reserver": "ordered, round-robin or shuffled-round-robin (setting: reserver)",
    "no-fork-per-job": "run jobs in the worker process (setting: fork_per_job: false)",
}
_HELP = {
    "pool": {
        "config": "the pool's YAML file (setting: config)",
        "environment": "the config section to use (setting: environment)",
        **_WORKER_HELP,
        "daemon": "detach and run in the background (setting: daemon)",
        "drain": "run until the queues are empty, then stop; exit 1 if a job failed",
    },
    "work": {
        "queues": "comma-separated queue names, in priority order (or $QUEUES)",
        **_WORKER_HELP,
    },
}


def collection(setup: Iterable[Task] = (), pool_setup: Iterable[Task] = ()) -> Collection:
    """A fresh ``qless`` collection whose ``qless.setup`` runs the ``setup`` tasks first and
    whose ``qless.pool.setup`` runs the ``pool_setup`` tasks first (after ``qless.setup``).

    Every hook runs exactly once per invocation, however many tasks depend on it.
    """
    setup_task = Task(_setup, name="setup", pre=list(setup))
    # Named "pool_setup" (in logs and `invoke -d`), listed as qless.pool.setup.
    pool_setup_task = Task(_pool_setup, name="pool_setup", pre=[setup_task, *pool_setup])
    pool_task = Task(
        _pool,
        name="pool",
        pre=[setup_task, pool_setup_task],
        help=_HELP["pool"],
        auto_shortflags=False,  # -d, -a ... would not mean what they mean to qless-pool
    )
    work_task = Task(
        _work, name="work", pre=[setup_task], help=_HELP["work"], auto_shortflags=False
    )
    pool = Collection("pool")
    pool.add_task(pool_task, default=True)
    pool.add_task(pool_setup_task, name="setup")
    qless = Collection("qless")
    qless.add_task(setup_task)
    qless.add_task(work_task)
    qless.add_collection(pool)
    return qless


#: ``ns.add_collection(qless_pool.tasks)`` adds this: the chain with no hooks of your own.
ns = collection()
