"""Every option of qless-pool, declared once.

An option has one name, ``max_jobs`` say, and from it every way of giving it:

==========================  ==========================================================
the ``qless-pool`` command  ``--max-jobs N`` (some have a short form: ``-i``, ``-R``)
``invoke qless.pool``       ``--max-jobs N``, the setting ``qless_pool: {max_jobs: N}`` in
and ``invoke qless.work``   invoke.yaml, the variable ``INVOKE_QLESS_POOL_MAX_JOBS``
``qless_pool.run(...)``     ``max_jobs=N``
==========================  ==========================================================

What it takes (its *kind*: seconds in a range, a whole number in a range, a choice, a switch, a
list, text) is checked the same way wherever it comes from, at start: a value outside it stops
the start with one line naming the option, rather than reaching the workers and crashing them
one after the other. Where it makes no sense (``daemon`` for ``qless_pool.run()`` or
``qless.work``) it is refused with one line, never dropped.

Where its value goes: ``config`` (the file and its groups), ``pool`` (the manager: Pool),
``worker`` (every worker parent: Worker), or ``launch`` (what the launcher does before the
manager runs: log files, pidfile, privileges, the application). The parser of the command
(cli.py), the Invoke tasks (tasks.py), ``run()`` (pool/launch.py) and the option reference (docs/options.md)
(:func:`markdown_table`) are all made from :data:`OPTIONS`. gunicorn's config.py is the model,
smaller.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

from .kinds import (
    MAX_SECONDS,
    Choice,
    Kind,
    Many,
    OptionError,
    Seconds,
    Switch,
    Text,
    Whole,
)

__all__ = [
    "COMMAND",
    "ENTRIES",
    "MAX_SECONDS",
    "OPTIONS",
    "POOL",
    "RUN",
    "WORK",
    "Choice",
    "Many",
    "Option",
    "OptionError",
    "Seconds",
    "Switch",
    "Text",
    "Whole",
    "check",
    "choices",
    "default_text",
    "for_entry",
    "going_to",
    "markdown_table",
    "option",
    "read_values",
]

#: The entries: how a pool or a worker is started.
COMMAND, POOL, WORK, RUN = "command", "pool", "work", "run"
ENTRIES = {
    COMMAND: "the qless-pool command",
    POOL: "invoke qless.pool",
    WORK: "invoke qless.work",
    RUN: "qless_pool.run()",
}
EVERYWHERE = frozenset(ENTRIES)
POOLS = frozenset({COMMAND, POOL, RUN})  # everything that starts a pool (a manager)
# --- the declaration ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Option:
    """One option (see the module's docstring).

    ``flags``: the command's (for a switch, the flag that turns it from its default); ``()``:
    not an option of the command. ``off_flag``: a second flag that sets the option to False
    (``--no-pidfile``). For a Choice with ``const_flags``, each flag sets the value at its index
    (``--term-graceful``). ``default_text``: the default as users read it, where it is not a
    plain value. ``keyword``: the name of the Pool or Worker parameter it goes to, when not the
    option's. ``aliases``: names ``run()`` also takes, from earlier releases.
    """

    name: str
    kind: Kind
    help: str
    goes_to: str  # "config", "pool", "worker" or "launch"
    section: str
    entries: frozenset[str] = POOLS
    default: Any = None
    flags: tuple[str, ...] = ()
    metavar: Optional[str] = None
    off_flag: Optional[str] = None
    const_flags: bool = False
    default_text: Optional[str] = None
    keyword: Optional[str] = None
    aliases: tuple[str, ...] = ()

    @property
    def setting(self) -> str:
        """The variable that gives it to the Invoke tasks."""
        return f"INVOKE_QLESS_POOL_{self.name.upper()}"

    @property
    def task_flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def parameter(self) -> str:
        return self.keyword or self.name

    def read(self, value: Any) -> Any:
        """``value`` as the option takes it; OptionError naming the option otherwise. None is
        "not given" where the default is None, and refused where there always is a value."""
        if value is None:
            if self.default is not None:
                raise OptionError(f"{self.name}: must be given, not None")
            return None
        if self.off_flag and (value is False or _turned_off(value)):
            return False
        try:
            return self.kind.read(value)
        except OptionError as error:
            raise OptionError(f"{self.name}: {error}") from None


def _turned_off(value: Any) -> bool:
    return isinstance(value, str) and value.strip().lower() in ("false", "off", "no", "none")


CONFIGURATION = "configuration"
THE_POOL = "the pool"
SCALING = "worker count ranges"
THE_WORKERS = "the workers"
DAEMON = "running as a daemon"
WATCHING = "watching the pool"
OTHER = "other"

OPTIONS: tuple[Option, ...] = (
    # --- configuration
    Option("config", Text(), "the pool's YAML file", "config", CONFIGURATION,
           flags=("-c", "--config"), metavar="FILE",
           default_text="$QLESS_POOL_CONFIG, ./qless-pool.yml, ./config/qless-pool.yml"),
    Option("environment", Text(), "the section of the file to use", "config", CONFIGURATION,
           flags=("-E", "--environment"), metavar="NAME",
           default_text="$QLESS_ENV, $RACK_ENV, $RAILS_ENV"),
    Option("max_workers", Whole(1, 100_000),
           "the most workers the config may ask for, for one queue list and in all", "config",
           CONFIGURATION, default=1000, flags=("--max-workers",), metavar="N"),
    Option("dry_run", Switch(), "print the resolved groups as one JSON object and exit",
           "launch", CONFIGURATION, entries=frozenset({COMMAND, POOL}), default=False,
           flags=("--dry-run",)),
    Option("drain", Switch(),
           "run until the queues are empty, print a summary and stop; exit 1 if a job failed",
           "pool", CONFIGURATION, default=False, flags=("--drain",)),
    # --- the pool
    Option("appname", Text(), "shown in process titles and log lines", "pool", THE_POOL,
           entries=EVERYWHERE, flags=("-a", "--appname"), metavar="NAME",
           default_text="the working directory's name"),
    Option("redis", Text(), "qless's Redis URL", "pool", THE_POOL, entries=EVERYWHERE,
           flags=("-R", "--redis"), metavar="URL", keyword="redis_url", aliases=("redis_url",),
           default_text="$QLESS_URL, $REDIS_URL, redis://localhost:6379/0"),
    Option("preload", Many(),
           "import (and call) in the manager before forking; repeatable", "launch", THE_POOL,
           entries=EVERYWHERE, flags=("-m", "--preload"), metavar="MODULE[:CALLABLE]",
           aliases=("preload_modules",)),
    Option("include", Many(), "put DIR on sys.path (the working directory always is); "
           "repeatable", "launch", THE_POOL, entries=EVERYWHERE, flags=("-I", "--include"),
           metavar="DIR"),
    Option("spawn_delay", Seconds(0.0, 3600.0), "wait this long between starting two workers",
           "pool", THE_POOL, default=0.0, flags=("-s", "--spawn-delay")),
    Option("single_process_group", Switch(), "keep the workers in the manager's process group "
           "(a terminal's Ctrl-C then reaches them too)", "pool", THE_POOL, default=False,
           flags=("--single-process-group",)),
    Option("term", Choice(("immediate", "graceful", "graceful-wait"), helps=(
               "TERM stops the workers now (their jobs are handed back) and exits",
               "TERM lets the workers finish their jobs and exits at once",
               "TERM lets the workers finish their jobs and waits for them (as QUIT)")),
           "what TERM does: stop the workers now (their jobs handed back) and exit; let them "
           "finish their jobs and exit at once; or as QUIT, wait for them", "pool", THE_POOL,
           default="immediate",
           flags=("--term-immediate", "--term-graceful", "--term-graceful-wait"),
           const_flags=True, keyword="term_behaviour", aliases=("term_behaviour",)),
    # --- ranges (a count MIN..MAX in the config: pool/scaling.py)
    Option("scale_interval", Seconds(0.1, 3600.0), "a range: how often the queues' wait is "
           "measured", "pool", SCALING, default=1.0, flags=("--scale-interval",)),
    Option("scale_up_after", Seconds(0.0, MAX_SECONDS), "a range: add workers while the job "
           "next in line has waited longer than this", "pool", SCALING, default=1.0,
           flags=("--scale-up-after",)),
    Option("scale_down_after", Seconds(0.0, MAX_SECONDS), "a range: retire one idle worker "
           "after this long without a waiting job (and again after each such period)", "pool",
           SCALING, default=30.0, flags=("--scale-down-after",)),
    Option("scale_step", Whole(1, 1000), "a range: the most workers added to a group at one "
           "measurement", "pool", SCALING, default=1, flags=("--scale-step",), metavar="N"),
    # --- the workers
    Option("queues", Many(), "the worker's queues, in priority order", "launch", THE_WORKERS,
           entries=frozenset({WORK}), default_text="$QUEUES"),
    Option("interval", Seconds(0.01, 3600.0), "how often an idle worker polls its queues (a "
           "put wakes it at once)", "worker", THE_WORKERS, entries=EVERYWHERE, default=5.0,
           flags=("-i", "--interval")),
    Option("reserver", Choice(("ordered", "round-robin", "shuffled-round-robin")),
           "the order a worker tries its queues in", "worker", THE_WORKERS, entries=EVERYWHERE,
           default="ordered", flags=("--reserver",)),
    Option("fork_per_job", Switch(), "a child process per job; off (--no-fork-per-job): jobs "
           "run in the worker process itself (cheap, trusted jobs)", "worker", THE_WORKERS,
           entries=EVERYWHERE, default=True, flags=("--no-fork-per-job",)),
    Option("prefetch", Whole(1, 1000), "jobs in process: pop N at a time", "worker",
           THE_WORKERS, entries=EVERYWHERE, flags=("--prefetch",),
           default_text="adaptive, 1 to 32: a job popped ahead waits about a second at most"),
    Option("job_timeout", Seconds(0.0, MAX_SECONDS, positive=True),
           "kill a job running longer and fail it as <queue>-TimeoutError", "worker",
           THE_WORKERS, entries=EVERYWHERE, flags=("--job-timeout",), default_text="none"),
    Option("allow_modules", Many(), "run only jobs whose class is in one of these modules or "
           "below (myapp allows myapp.jobs.Mail); others fail as <queue>-ForbiddenClass; "
           "repeatable", "worker", THE_WORKERS, entries=EVERYWHERE, flags=("--allow-module",),
           metavar="PREFIX", default_text="$QLESS_POOL_ALLOW_MODULES (comma-separated); none: "
           "any class"),
    Option("max_jobs", Whole(1, 10**9), "a worker exits after N jobs (plus --max-jobs-jitter) "
           "and is replaced", "worker", THE_WORKERS, entries=EVERYWHERE, flags=("--max-jobs",),
           default_text="none"),
    Option("max_jobs_jitter", Whole(0, 10**9), "add a random 0 to M to each worker's "
           "--max-jobs, so that they do not all restart at once", "worker", THE_WORKERS,
           entries=EVERYWHERE, default=0, flags=("--max-jobs-jitter",), metavar="M"),
    Option("max_memory", Whole(1, 10**7), "a worker above MB (RSS) after a job is replaced; a "
           "job child above it is killed and its job handed back", "worker", THE_WORKERS,
           entries=EVERYWHERE, flags=("--max-memory",), metavar="MB", default_text="none"),
    Option("graceful_timeout", Seconds(0.0, MAX_SECONDS, positive=True), "a job still running "
           "this long after its worker was told to stop gracefully (QUIT, a graceful TERM, HUP, "
           "recycling) is killed and handed back", "worker", THE_WORKERS, entries=EVERYWHERE,
           flags=("--graceful-timeout",), default_text="none: it finishes"),
    # --- running as a daemon
    Option("daemon", Switch(), "detach and run in the background; returns once the pool has "
           "started", "launch", DAEMON, entries=frozenset({COMMAND, POOL}), default=False,
           flags=("-d", "--daemon")),
    Option("pidfile", Text(), "write the manager's pid to FILE; --no-pidfile (as a setting: "
           "false): write none",
           "launch", DAEMON, flags=("-p", "--pidfile"), off_flag="--no-pidfile",
           metavar="FILE", default_text="as a daemon, tmp/pids/qless-pool.pid; else none"),
    Option("stdout", Text(), "append standard output to FILE", "launch", DAEMON,
           flags=("-o", "--stdout"), metavar="FILE",
           default_text="as a daemon, log/qless-pool.stdout.log"),
    Option("stderr", Text(), "append standard error, and so the log, to FILE", "launch",
           DAEMON, flags=("-e", "--stderr"), metavar="FILE",
           default_text="as a daemon, log/qless-pool.stderr.log"),
    Option("sync", Switch(), "write the log files line by line; off (--nosync; the tasks' "
           "--no-sync): in blocks",
           "launch", DAEMON, default=True, flags=("--nosync",)),
    Option("user", Text(), "started as root: run as USER (name or uid) once the pidfile and "
           "log files are open; its primary group unless --group", "launch", DAEMON,
           flags=("--user",), metavar="USER"),
    Option("group", Text(), "started as root: run as GROUP (name or gid)", "launch", DAEMON,
           flags=("--group",), metavar="GROUP"),
    Option("lock", Text(), "hold a shared flock on FILE while any process of the pool lives "
           "(a deploy can wait for them all with: flock FILE true)", "launch", DAEMON,
           flags=("-l", "--lock"), metavar="FILE"),
    # --- watching the pool
    Option("metrics_port", Whole(1, 65535), "serve Prometheus metrics on PORT at /metrics "
           "(needs qless-pool[metrics])", "launch", WATCHING, flags=("--metrics-port",),
           metavar="PORT"),
    Option("metrics_address", Text(), "the address --metrics-port listens on", "launch",
           WATCHING, default="127.0.0.1", flags=("--metrics-address",), metavar="ADDR"),
    # --- other
    Option("log_level", Choice(("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"), upper=True),
           "how much to log", "launch", OTHER, entries=EVERYWHERE, default="INFO",
           flags=("--log-level",), metavar="LEVEL"),
)  # fmt: skip

_BY_NAME = {opt.name: opt for opt in OPTIONS}
_BY_ALIAS = {alias: opt for opt in OPTIONS for alias in opt.aliases}
#: Not options, but numbers Worker() takes with a range all the same.
_INTERNAL = {"kill_grace": Seconds(0.0, 3600.0)}


def option(name: str) -> Option:
    return _BY_NAME[name]


def check(name: str, value: Any) -> Any:
    """``value`` (None stays None) as option (or Worker parameter) ``name`` takes it;
    OptionError naming it otherwise."""
    if name in _INTERNAL:
        if value is None:
            raise OptionError(f"{name}: must be given, not None")
        try:
            return _INTERNAL[name].read(value)
        except OptionError as error:
            raise OptionError(f"{name}: {error}") from None
    return _BY_NAME[name].read(value)


def read_values(
    given: Mapping[str, Any], entry: str, *, where: str = "", defaults: bool = True
) -> dict[str, Any]:
    """The options of ``entry`` from ``given`` (names or aliases), each read as it takes it,
    with the defaults of those not given (unless ``defaults`` is False). An option the entry
    does not have is OptionError, saying where it is one: never dropped."""
    values: dict[str, Any] = {}
    for name, value in given.items():
        known = _BY_NAME.get(name) or _BY_ALIAS.get(name)
        if known is None:
            raise OptionError(f"{where}{name}: no such option")
        if entry not in known.entries:
            have = " and ".join(ENTRIES[e] for e in ENTRIES if e in known.entries)
            raise OptionError(f"{where}{known.name}: not an option of {ENTRIES[entry]} "
                              f"({have} take it)")  # fmt: skip
        values[known.name] = known.read(value)
    if defaults:
        for opt in OPTIONS:
            if entry in opt.entries:
                values.setdefault(opt.name, opt.default)
    return values


def choices(name: str) -> tuple[str, ...]:
    """The values the Choice option ``name`` takes."""
    kind = option(name).kind
    assert isinstance(kind, Choice), name
    return kind.values


def for_entry(entry: str) -> list[Option]:
    return [opt for opt in OPTIONS if entry in opt.entries]


def going_to(target: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """The values that are parameters of ``target`` ("pool" or "worker"), by parameter name."""
    return {
        opt.parameter: values[opt.name]
        for opt in OPTIONS
        if opt.goes_to == target and opt.name in values
    }


# --- the option reference (docs/options.md) ------------------------------------------------------


def default_text(opt: Option) -> str:
    if opt.default_text:
        return opt.default_text
    if opt.default is None:
        return "none"
    if isinstance(opt.default, bool):
        return "on" if opt.default else "off"
    return str(opt.default)


def _flags(opt: Option) -> str:
    flags = [*opt.flags, *([opt.off_flag] if opt.off_flag else [])]
    if not flags:
        return "-"
    metavar = opt.metavar or getattr(opt.kind, "metavar", None)
    if isinstance(opt.kind, Switch) or opt.const_flags:
        return ", ".join(f"`{flag}`" for flag in flags)
    shown = [f"`{flag} {metavar}`" if flag != opt.off_flag else f"`{flag}`" for flag in flags]
    return ", ".join(shown)


def markdown_table(options: Iterable[Option] = OPTIONS) -> str:
    """The table of docs/options.md (tests/test_docs.py checks that it has it)."""
    short = {COMMAND: "command", POOL: "qless.pool", WORK: "qless.work", RUN: "run()"}
    rows = [
        "| setting | `qless-pool` | takes | default | where | meaning |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for opt in options:
        where = ", ".join(short[e] for e in ENTRIES if e in opt.entries)
        rows.append(
            f"| `{opt.name}` | {_flags(opt)} | {opt.kind.describe()} | {default_text(opt)} "
            f"| {where} | {opt.help} |"
        )
    return "\n".join(rows)


def sections() -> Sequence[str]:
    return list(dict.fromkeys(opt.section for opt in OPTIONS))


if __name__ == "__main__":  # python -m qless_pool.options: the table of docs/options.md
    print(markdown_table())
