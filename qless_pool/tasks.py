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
loaded in it) into the pool manager: no re-exec, no subprocess. Its settings and config are
checked first (``qless.check``), before any task of the user's loads the application.

Every option (options.py) is a setting, under ``qless_pool:`` in invoke.yaml or as the variable
``INVOKE_QLESS_POOL_<NAME>``, and a flag of the tasks it is an option of (``--max-jobs``); a flag
wins over the variable, which wins over invoke.yaml. A setting that is not an option of the task
run (``daemon`` for ``qless.work``: invoke.yaml is shared by both) is said in one line and not
used; a flag that is not is refused by Invoke.

Two Invoke traps are designed around here (Invoke 3.0.3). Replacing a task by name does not
rewire the ``pre=`` of tasks that already reference the original, so the user's tasks are
handed to :func:`collection`, which builds the chain around them. And a pre-task sees only the
root collection's configuration, so the settings are not kept in this collection's
configuration: they are read from the Invoke config the files and the environment give (the
``qless_pool:`` section of ``invoke.yaml``, ``INVOKE_QLESS_POOL_*``), which every task sees.
"""

from __future__ import annotations

import inspect
import os
import re
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from invoke.collection import Collection
from invoke.exceptions import Exit
from invoke.tasks import Task

from . import options
from .options import POOL, WORK, Many, Option, OptionError, Switch

__all__ = ["collection", "settings"]

#: Our variables, taken out of the environment when this module is imported (Invoke imports
#: the tasks before it reads the environment). Invoke would otherwise cast each to the type
#: invoke.yaml gives the setting, and fail before any task runs: a list can take no variable
#: (UncastableEnvVar), and int("0.5") raises. Here every one is read as its option says.
ENVIRONMENT_PREFIX = "INVOKE_QLESS_POOL_"
_TAKEN = {
    name: os.environ.pop(name) for name in list(os.environ) if name.startswith(ENVIRONMENT_PREFIX)
}
#: The options that are settings: those of either task.
_SETTINGS = [opt for opt in options.OPTIONS if opt.entries & {POOL, WORK}]


def settings(c: Any) -> dict[str, Any]:
    """The ``qless_pool`` settings given, each read as its option takes it:
    ``INVOKE_QLESS_POOL_<NAME>``, else the Invoke config (``invoke.yaml``). A value an option
    does not take, or a setting that is no option, is one line and exit status 2."""
    configured = c.config.get("qless_pool", None) or {}
    if not isinstance(configured, Mapping):
        raise Exit(f"qless_pool: must be a mapping of settings, not {configured!r}", code=2)
    known = {opt.name for opt in _SETTINGS}
    for name in [*configured, *(v[len(ENVIRONMENT_PREFIX) :].lower() for v in _environ())]:
        if name not in known:
            raise Exit(f"qless_pool.{name}: no such setting (the options: docs/options.md)", code=2)
    found: dict[str, Any] = {}
    for opt in _SETTINGS:
        raw = _environ().get(opt.setting)
        if raw is None:
            raw = configured.get(opt.name)
        if raw is not None:
            found[opt.name] = _read(opt, raw)
    return found


def _environ() -> dict[str, str]:
    """Our variables: those taken at import, and any set since (a test's, a task's)."""
    now = {k: v for k, v in os.environ.items() if k.startswith(ENVIRONMENT_PREFIX)}
    return {**_TAKEN, **now}


def _read(opt: Option, raw: Any) -> Any:
    try:
        return opt.read(raw)
    except OptionError as error:
        raise Exit(f"qless_pool.{error}", code=2) from None


def _values(c: Any, entry: str, task: str, flags: Mapping[str, Any]) -> dict[str, Any]:
    """The options of ``entry``: its flags given, else the settings, else the defaults. The
    settings that are not options of the entry are said once, not used."""
    found = settings(c)
    ignored = [name for name in found if entry not in options.option(name).entries]
    if ignored:
        print(f"{task}: not using the settings {', '.join(ignored)} (not options of "
              f"{task})", file=sys.stderr)  # fmt: skip
    given = {name: value for name, value in found.items() if name not in ignored}
    for name, value in flags.items():
        opt = options.option(name)
        if isinstance(opt.kind, Switch):
            if value != opt.default or _switch_given(opt):
                given[name] = value
        elif value not in (None, [], ()):
            try:
                given[name] = opt.read(value)
            except OptionError as error:
                message = str(error).split(": ", 1)[1]
                raise Exit(f"{task}: {opt.task_flag}: {message}", code=2) from None
    try:
        return options.read_values(given, entry)
    except OptionError as error:
        raise Exit(f"{task}: {error}", code=2) from None


def _body(entry: str, run: Callable[..., None], name: str) -> Callable[..., None]:
    """A task body taking a flag per option of ``entry`` (Invoke reads the signature)."""

    def body(c: Any, **flags: Any) -> None:
        run(c, flags)

    parameters = [inspect.Parameter("c", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    for opt in options.for_entry(entry):
        if isinstance(opt.kind, Switch):
            default: Any = opt.default
        elif isinstance(opt.kind, Many):
            default = []
        else:
            default = None
        parameters.append(
            inspect.Parameter(opt.name, inspect.Parameter.KEYWORD_ONLY, default=default)
        )
    body.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    body.__name__ = body.__qualname__ = name
    body.__doc__ = run.__doc__
    return body


def _task(entry: str, run: Callable[..., None], name: str, **kwargs: Any) -> Task[Any]:
    entry_options = options.for_entry(entry)
    return Task(
        _body(entry, run, name),
        name=name,
        help={opt.name.replace("_", "-"): _flag_help(opt) for opt in entry_options},
        iterable=[opt.name for opt in entry_options if isinstance(opt.kind, Many)],
        auto_shortflags=False,  # -d, -a ... would not mean what they mean to qless-pool
        **kwargs,
    )


def _flag_help(opt: Option) -> str:
    default = options.default_text(opt)
    shown = "" if isinstance(opt.kind, Switch) or default == "none" else f" (default: {default})"
    return f"{opt.help}{shown}; setting: {opt.name}"


# --- the task bodies ------------------------------------------------------------------------------


def _check(c: Any) -> None:
    """Check the qless_pool settings, before any task loads the application."""
    settings(c)


def _check_pool(c: Any) -> None:
    """Check the settings and the config qless.pool will use, before anything loads."""
    # As qless.pool will read them: its flags win over the settings. A pre-task is given no
    # flags by Invoke: those three are read from the command line (_task_words).
    found = settings(c)
    values = {name: value for name, value in found.items() if POOL in options.option(name).entries}
    for name in ("config", "environment", "max_workers"):
        given = _flag_in_argv(options.option(name).task_flag)
        if given is not None:
            values[name] = _read(options.option(name), given)
    values = options.read_values(values, POOL)
    from .config import ConfigError, ConfigSource

    try:
        ConfigSource(
            values["config"], values["environment"], max_workers=values["max_workers"]
        ).load()
    except ConfigError as error:
        raise Exit(f"qless-pool: config error: {error}", code=78) from None


#: Invoke's own flags that take a value: a word after one is not a task name.
_INVOKE_VALUE_FLAGS = {"-c", "--collection", "-f", "--config", "-r", "--search-root", "-T",
                       "--command-timeout", "--hide", "-D", "--list-depth", "-F",
                       "--list-format", "--print-completion-script"}  # fmt: skip
#: qless.pool (qless.pool.run) or qless.work, under whatever name the collection is mounted.
_OUR_TASK = re.compile(r"(?:[\w-]+\.)*(?:pool(?:\.run)?|work)")


def _task_words() -> tuple[str, list[str]]:
    """Which of our tasks the command line runs (POOL or WORK), and the words given to it: the
    flags between its name and the next task's. A pre-task is given no flags by Invoke, so it
    reads them here; Invoke's own (its ``--config``) and another task's are not ours."""
    argv = sys.argv[1:]
    index = 0
    while index < len(argv):
        word = argv[index]
        if word in _INVOKE_VALUE_FLAGS:
            index += 2
            continue
        if not word.startswith("-") and _OUR_TASK.fullmatch(word):
            entry = WORK if word.endswith("work") else POOL
            valued = {
                o.task_flag for o in options.for_entry(entry) if not isinstance(o.kind, Switch)
            }
            words: list[str] = []
            rest = argv[index + 1 :]
            while rest and rest[0].startswith("-"):
                flag = rest.pop(0)
                words.append(flag)
                if flag in valued and rest:
                    words.append(rest.pop(0))
            return entry, words
        index += 1
    return POOL, []


def _flag_in_argv(flag: str) -> Any:
    """The value of our task's ``flag`` (``--config x`` or ``--config=x``), if given (the last
    one, as Invoke takes it)."""
    given = _flags_in_argv(flag)
    return given[-1] if given else None


def _flags_in_argv(flag: str) -> list[str]:
    """Every value of a flag of our task given again and again (``--preload a --preload b``)."""
    _, words = _task_words()
    found = []
    for index, word in enumerate(words):
        if word == flag and index + 1 < len(words):
            found.append(words[index + 1])
        elif word.startswith(flag + "="):
            found.append(word[len(flag) + 1 :])
    return found


def _switch_given(opt: Option) -> bool:
    """Whether our task's words turn ``opt`` on or off (``--sync``, ``--no-sync``): a flag
    given as its default still wins over a setting."""
    _, words = _task_words()
    return bool({opt.task_flag, "--no-" + opt.task_flag[2:]} & set(words))


def _setup(c: Any) -> None:
    """Load the application in this process (the preload option's modules)."""
    from .hooks import preload

    found = settings(c)
    # A pre-task is given no flags by Invoke: the tasks' --preload, --include and
    # --metrics-port are read from the command line (they win over the settings, as flags do).
    given = {
        name: _flags_in_argv(options.option(name).task_flag) or found.get(name) or []
        for name in ("preload", "include")
    }
    port = _flag_in_argv(options.option("metrics_port").task_flag) or found.get("metrics_port")
    if port:
        from .ops import metrics

        # prometheus_client picks its mode when first imported: before the application is.
        metrics.prepare()
    preload(given["preload"], given["include"])


def _pool_setup(c: Any) -> None:
    """Close what must not cross a fork (a hook: chain your own tasks before it)."""


def _pool(c: Any, flags: Mapping[str, Any]) -> None:
    """Run the pool manager in this process (after qless.setup and qless.pool.setup)."""
    from .pool.launch import launch

    status = launch(_values(c, POOL, "qless.pool", flags), preloaded=True)
    if status:
        raise Exit(code=status)


def _work(c: Any, flags: Mapping[str, Any]) -> None:
    """Run one worker in the foreground on --queues (or $QUEUES), like rake qless:work."""
    from . import logs
    from .client import look_at_redis
    from .config import CONTROL_CHARACTER
    from .urls import check_redis_url, redis_url_and_origin
    from .worker import Worker

    values = _values(c, WORK, "qless.work", flags)
    names = values["queues"] or [os.environ.get("QUEUES", "")]
    queues = [name.strip() for text in names for name in text.split(",") if name.strip()]
    if not queues:
        raise Exit("qless.work: name the queues with --queues foo,bar or QUEUES=foo,bar", code=2)
    for name in queues:
        control = CONTROL_CHARACTER.search(name)
        if control:
            raise Exit(
                f"qless.work: queue {name!r} holds the control character {control.group(0)!r}",
                code=2,
            )
    appname = values["appname"] or os.path.basename(os.getcwd())
    logs.configure(values["log_level"], appname=appname)
    url, origin = redis_url_and_origin(values["redis"])
    try:
        check_redis_url(url)
    except ValueError as error:
        raise Exit(f"qless-pool: bad Redis URL (from {origin}): {error}", code=2) from None
    found = look_at_redis(url)
    if found.refused:
        raise Exit(f"qless.work: {found.refused}", code=2)
    try:
        worker = Worker(queues, url, appname=appname, **options.going_to("worker", values))
    except ValueError as error:  # a bad allowlist ...
        raise Exit(f"qless.work: {error}", code=2) from None
    worker.work()


def _reload(
    c: Any, pid: Any = None, pidfile: Any = None, timeout: Any = None, wait: bool = False
) -> None:
    """Run new code without a stop (qless-pool reload): the running pool's manager starts a new
    one, which loads the application afresh and takes the workers over one by one."""
    from .ops.commands import main as command

    argv = [*(["--timeout", str(timeout)] if timeout else []), *(["--wait"] if wait else [])]
    if pid:
        argv += ["--pid", str(pid)]
    else:
        pidfile = pidfile or settings(c).get("pidfile")
        if pidfile:
            argv += ["--pidfile", str(pidfile)]
    status = command("reload", argv)
    if status:
        raise Exit(code=status)


RELOAD_HELP = {
    "pid": "the manager's pid",
    "pidfile": "the pool's pidfile (default: the qless_pool.pidfile setting, else "
    "tmp/pids/qless-pool.pid, else the pool started in this directory)",
    "timeout": "how long the new manager has to load and serve every slot (default 60)",
    "wait": "wait too until the old manager has exited",
}


def collection(setup: Iterable[Task[Any]] = (), pool_setup: Iterable[Task[Any]] = ()) -> Collection:
    """A fresh ``qless`` collection whose ``qless.setup`` runs the ``setup`` tasks first and
    whose ``qless.pool.setup`` runs the ``pool_setup`` tasks first (after ``qless.setup``).

    Every hook runs exactly once per invocation, however many tasks depend on it.
    """
    check_task: Task[Any] = Task(_check, name="check")
    check_pool_task: Task[Any] = Task(_check_pool, name="check_pool")
    # Invoke annotates pre= as task names; it takes tasks, as its documentation says.
    setup_task: Task[Any] = Task(_setup, name="setup", pre=[check_task, *setup])  # type: ignore[list-item]
    # Named "pool_setup" (in logs and `invoke -d`), listed as qless.pool.setup.
    pool_setup_task: Task[Any] = Task(
        _pool_setup,
        name="pool_setup",
        pre=[setup_task, *pool_setup],  # type: ignore[list-item]
    )
    pool_task = _task(POOL, _pool, "pool", pre=[check_pool_task, setup_task, pool_setup_task])
    work_task = _task(WORK, _work, "work", pre=[setup_task])
    pool = Collection("pool")
    pool.add_task(pool_task, name="run", default=True)
    pool.add_task(pool_setup_task, name="setup")
    pool.add_task(check_pool_task, name="check")
    # Long flags only: -p is --pidfile to qless-pool, and Invoke would make it --pid.
    reload_task: Task[Any] = Task(_reload, name="reload", help=RELOAD_HELP, auto_shortflags=False)
    pool.add_task(reload_task, name="reload")
    qless = Collection("qless")
    qless.add_task(check_task)
    qless.add_task(setup_task)
    qless.add_task(work_task)
    qless.add_collection(pool)
    return qless


#: ``ns.add_collection(qless_pool.tasks)`` adds this: the chain with no hooks of your own.
ns = collection()
