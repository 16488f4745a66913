"""The ``qless-pool`` command (also ``python -m qless_pool``)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from importlib import metadata
from typing import Any, Optional

from . import __version__, logs, options, proctitle
from .client import database_problem
from .config import EX_CONFIG, MAX_POOL_WORKERS, ConfigError, ConfigSource, groups_to_json
from .hooks import preload
from .ops import metrics
from .ops.daemon import (
    DEFAULT_PIDFILE,
    DEFAULT_STDERR,
    DEFAULT_STDOUT,
    DaemonError,
    Identity,
    LogFiles,
    Pidfile,
    PoolLock,
    Readiness,
    SystemdNotifier,
    daemonize,
    drop_privileges,
    resolve_identity,
)
from .pool.manager import Pool
from .urls import check_redis_url, redis_url_and_origin
from .worker.reservation import RESERVERS, check_allowed_modules, default_allowed_modules

__all__ = ["build_parser", "main"]

log = logs.logger.getChild("cli")


def _version_line() -> str:
    return (
        f"qless-pool {__version__} (qless-py {metadata.version('qless-py')}, "
        f"Python {sys.version.split()[0]})"
    )


def _option(name: str) -> Callable[[str], Any]:
    """The argparse type of option ``name``: its range (options.py)."""

    def parse(text: str) -> Any:
        try:
            return options.parse(name, text)
        except options.OptionError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    parse.__name__ = name  # argparse names the type in some messages
    return parse


def _nonempty(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("empty (an unset variable?)")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qless-pool",
        description="Run a pool of qless workers: one manager process loads the application "
        "once, forks a worker per slot of the config file and keeps the counts right.",
        epilog="Signals to the manager: HUP reload, QUIT graceful stop, INT stop, TERM (see "
        "--term-*), WINCH stop workers (daemon only), USR1/USR2/CONT passed to the workers.",
    )
    config = parser.add_argument_group("configuration")
    config.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        help="the pool's YAML file (default: $QLESS_POOL_CONFIG, ./qless-pool.yml, "
        "./config/qless-pool.yml)",
    )
    config.add_argument(
        "-E",
        "--environment",
        metavar="NAME",
        help="the section of the file to use (default: $QLESS_ENV, $RACK_ENV, $RAILS_ENV)",
    )
    config.add_argument(
        "--dry-run",
        action="store_true",
        help="print the resolved groups as one JSON object and exit",
    )
    config.add_argument(
        "--drain",
        action="store_true",
        help="run until the queues are empty, print a summary and stop; exit 1 if a job failed",
    )

    pool = parser.add_argument_group("the pool")
    pool.add_argument(
        "-a",
        "--appname",
        metavar="NAME",
        help="shown in process titles and log lines (default: the working directory's name)",
    )
    pool.add_argument(
        "-R",
        "--redis",
        metavar="URL",
        type=_nonempty,
        help="qless's Redis (default: $QLESS_URL, $REDIS_URL, redis://localhost:6379/0)",
    )
    pool.add_argument(
        "-m",
        "--preload",
        metavar="MODULE[:CALLABLE]",
        action="append",
        default=[],
        help="import (and call) in the manager before forking; repeatable",
    )
    pool.add_argument(
        "-I",
        "--include",
        metavar="DIR",
        action="append",
        default=[],
        help="put DIR on sys.path (the working directory always is); repeatable",
    )
    pool.add_argument(
        "--max-workers",
        metavar="N",
        type=_option("max_workers"),
        default=MAX_POOL_WORKERS,
        help=f"the most workers the config may ask for in all (default: {MAX_POOL_WORKERS})",
    )
    pool.add_argument(
        "-s",
        "--spawn-delay",
        metavar="SECONDS",
        type=_option("spawn_delay"),
        default=0.0,
        help="wait this long between starting two workers (default: 0)",
    )
    pool.add_argument(
        "--single-process-group",
        action="store_true",
        help="keep the workers in the manager's process group (a terminal's Ctrl-C then "
        "reaches them too)",
    )
    term = pool.add_mutually_exclusive_group()
    term.add_argument(
        "--term-immediate",
        dest="term_behaviour",
        action="store_const",
        const="immediate",
        help="TERM stops the workers now (their jobs are handed back) and exits (default)",
    )
    term.add_argument(
        "--term-graceful",
        dest="term_behaviour",
        action="store_const",
        const="graceful",
        help="TERM lets the workers finish their jobs and exits at once",
    )
    term.add_argument(
        "--term-graceful-wait",
        dest="term_behaviour",
        action="store_const",
        const="graceful-wait",
        help="TERM lets the workers finish their jobs and waits for them (as QUIT)",
    )
    parser.set_defaults(term_behaviour="immediate")

    workers = parser.add_argument_group("the workers")
    workers.add_argument(
        "-i",
        "--interval",
        metavar="SECONDS",
        type=_option("interval"),
        default=5.0,
        help="how often an idle worker polls its queues (a put wakes it at once; default: 5)",
    )
    workers.add_argument(
        "--reserver",
        choices=sorted(RESERVERS),
        default="ordered",
        help="the order a worker tries its queues in (default: ordered)",
    )
    workers.add_argument(
        "--no-fork-per-job",
        dest="fork_per_job",
        action="store_false",
        help="run jobs in the worker process itself (cheap, trusted jobs)",
    )
    workers.add_argument(
        "--prefetch",
        metavar="N",
        type=_option("prefetch"),
        help="with --no-fork-per-job, pop N jobs at a time (default: adaptive, from 1 to 32, so "
        "that a job popped ahead never waits behind the others for more than about a second)",
    )
    workers.add_argument(
        "--max-jobs",
        metavar="N",
        type=_option("max_jobs"),
        help="a worker exits after N jobs (plus --max-jobs-jitter) and is replaced",
    )
    workers.add_argument(
        "--max-jobs-jitter",
        metavar="M",
        type=_option("max_jobs_jitter"),
        default=0,
        help="add a random 0 to M to each worker's --max-jobs, so that they do not all "
        "restart at once (default: 0)",
    )
    workers.add_argument(
        "--max-memory",
        metavar="MB",
        type=_option("max_memory"),
        help="a worker whose memory (RSS) is above MB after a job is replaced; a job child "
        "above it is killed and its job handed back",
    )
    workers.add_argument(
        "--graceful-timeout",
        metavar="SECONDS",
        type=_option("graceful_timeout"),
        help="a job still running SECONDS after its worker was told to stop gracefully (QUIT, a "
        "graceful TERM, HUP, recycling) is killed and handed back (default: none, it finishes)",
    )
    workers.add_argument(
        "--allow-module",
        metavar="PREFIX",
        dest="allow_modules",
        action="append",
        help="run only jobs whose class is in this module or below it (myapp allows "
        "myapp.jobs.Mail); others are failed as <queue>-ForbiddenClass; repeatable "
        "(default: $QLESS_POOL_ALLOW_MODULES, comma-separated; none: any class)",
    )
    workers.add_argument(
        "--job-timeout",
        metavar="SECONDS",
        type=_option("job_timeout"),
        help="kill a job running longer and fail it as <queue>-TimeoutError (default: none)",
    )

    daemon = parser.add_argument_group("running as a daemon")
    daemon.add_argument(
        "-d",
        "--daemon",
        action="store_true",
        help="detach and run in the background; returns once the pool has started",
    )
    daemon.add_argument(
        "-p",
        "--pidfile",
        metavar="FILE",
        help=f"write the manager's pid to FILE (daemon default: {DEFAULT_PIDFILE})",
    )
    daemon.add_argument(
        "--no-pidfile",
        dest="pidfile",
        action="store_const",
        const=False,
        help="write no pidfile (of -p and --no-pidfile, the last one given wins)",
    )
    daemon.add_argument(
        "-o",
        "--stdout",
        metavar="FILE",
        help=f"append standard output to FILE (daemon default: {DEFAULT_STDOUT})",
    )
    daemon.add_argument(
        "-e",
        "--stderr",
        metavar="FILE",
        help=f"append standard error, and so the log, to FILE (daemon default: {DEFAULT_STDERR})",
    )
    daemon.add_argument(
        "--nosync",
        dest="sync",
        action="store_false",
        help="let the log files be written in blocks instead of line by line",
    )
    daemon.add_argument(
        "--user",
        metavar="USER",
        type=_nonempty,
        help="started as root: run as USER (name or uid) once the pidfile and log files are "
        "open; its primary group unless --group",
    )
    daemon.add_argument(
        "--group",
        metavar="GROUP",
        type=_nonempty,
        help="started as root: run as GROUP (name or gid)",
    )
    daemon.add_argument(
        "-l",
        "--lock",
        metavar="FILE",
        help="hold a shared flock on FILE while any process of the pool lives "
        "(a deploy can wait for them all with: flock FILE true)",
    )

    observe = parser.add_argument_group(
        "watching the pool", "qless-pool status [-p PIDFILE | --pid PID] [--json] [--watch [S]] "
        "[--check] shows what a running pool is doing (qless-pool status --help)"
    )  # fmt: skip
    observe.add_argument(
        "--metrics-port",
        metavar="PORT",
        type=_option("metrics_port"),
        help="serve Prometheus metrics on PORT at /metrics (needs qless-pool[metrics])",
    )
    observe.add_argument(
        "--metrics-address",
        metavar="ADDR",
        default="127.0.0.1",
        help="the address --metrics-port listens on (default: 127.0.0.1)",
    )

    other = parser.add_argument_group("other")
    other.add_argument(
        "--log-level",
        metavar="LEVEL",
        default="INFO",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
        help="DEBUG, INFO (default), WARNING, ERROR or CRITICAL",
    )
    other.add_argument("-v", "--version", action="version", version=_version_line())
    return parser


def worker_options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "interval": args.interval,
        "reserver": args.reserver,
        "fork_per_job": args.fork_per_job,
        "job_timeout": args.job_timeout,
        "prefetch": args.prefetch,
        "allow_modules": args.allow_modules,
        "max_jobs": args.max_jobs,
        "max_jobs_jitter": args.max_jobs_jitter,
        "max_memory": args.max_memory,
        "graceful_timeout": args.graceful_timeout,
    }


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["status"]:
        from .ops import status

        return status.main(argv[1:])
    return launch(build_parser().parse_args(argv))


def launch(args: argparse.Namespace, preloaded: bool = False) -> int:
    """Run what the parsed command line asks for; returns the exit status.

    ``preloaded``: the application is already loaded in this process (the Invoke tasks load it
    in ``qless.setup``), so ``--preload`` and ``--include`` are not applied again.
    """
    try:
        source = ConfigSource(args.config, args.environment, max_workers=args.max_workers)
        groups = source.load()
    except ConfigError as exc:
        print(f"qless-pool: config error: {exc}", file=sys.stderr)
        return EX_CONFIG
    # A URL that cannot work is refused here, before anything forks or detaches; a Redis that
    # is down is not (the workers ride that out).
    problem = bad_redis_url(args.redis)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    args.redis = redis_url_and_origin(args.redis)[0]
    try:
        allowed = default_allowed_modules() if args.allow_modules is None else args.allow_modules
        args.allow_modules = list(check_allowed_modules(allowed))
    except ValueError as error:
        print(f"qless-pool: --allow-module: {error}", file=sys.stderr)
        return 2
    try:
        identity = resolve_identity(args.user, args.group)
    except DaemonError as error:
        print(f"qless-pool: {error}", file=sys.stderr)
        return error.status
    if args.metrics_port:
        try:
            metrics.require()
        except metrics.MetricsError as error:
            print(f"qless-pool: {error}", file=sys.stderr)
            return error.status
    if args.dry_run:
        print(groups_to_json(groups))
        return 0
    problem = database_problem(args.redis)
    if problem:
        print(f"qless-pool: {problem}", file=sys.stderr)
        return 2
    # Everything that can be checked before detaching has been: from here on, a daemon reports
    # its start (or why it failed) through `readiness`, and the command exits with that.
    readiness = daemonize() if args.daemon else None
    return _run_manager(args, source, groups, readiness, preloaded, identity)


def bad_redis_url(given: Optional[str]) -> Optional[str]:
    """The one-line complaint about the Redis URL to use (``given``, else the environment's, else
    the default), or None if it can work."""
    url, origin = redis_url_and_origin(given)
    try:
        check_redis_url(url)
    except ValueError as error:
        return f"qless-pool: bad Redis URL (from {origin}): {error}"
    return None


def _run_manager(
    args: argparse.Namespace,
    source: ConfigSource,
    groups: Any,
    readiness: Readiness | None,
    preloaded: bool,
    identity: Identity | None = None,
) -> int:
    appname = args.appname or os.path.basename(os.getcwd())
    # At once: the command line (which may hold a password) is no longer what ps shows.
    proctitle.set_title(proctitle.manager(appname, []))
    log_files = None

    def fail(status: int, message: str) -> int:
        """One line for the operator: on the launching terminal (a daemon's start pipe), and in
        the log file if one is open."""
        if readiness is None:
            print(f"qless-pool: {message}", file=sys.stderr)
        else:
            if log_files is not None:
                log.error("%s", message)
            readiness.failed(status, message)
        return status

    if args.daemon or args.stdout or args.stderr:
        files = LogFiles(
            args.stdout or DEFAULT_STDOUT, args.stderr or DEFAULT_STDERR, sync=args.sync
        )
        try:
            files.open()
        except DaemonError as error:
            return fail(error.status, str(error))
        log_files = files
    logs.configure(args.log_level, appname=appname)
    logs.set_role("manager", appname)

    pidfile_path = (
        (DEFAULT_PIDFILE if args.daemon else None) if args.pidfile is None else args.pidfile
    )
    pidfile = Pidfile(pidfile_path) if pidfile_path else None
    try:
        if pidfile is not None:
            pidfile.acquire()
        if args.lock:
            PoolLock(args.lock).acquire()
    except DaemonError as error:
        return fail(error.status, str(error))
    listener = None
    if args.metrics_port:  # bound before dropping privileges: a port below 1024 works too
        try:
            listener = metrics.bind(args.metrics_address, args.metrics_port)
        except metrics.MetricsError as error:
            return fail(error.status, str(error))
    # The files are open: from here on, the application runs without root's privileges.
    if identity is not None:
        drop_privileges(identity, log_files)
    elif os.geteuid() == 0:
        log.warning(
            "running as root: give --user (and --group) to run the pool and its jobs "
            "unprivileged once the pidfile and log files are open"
        )
    metrics_directory = None
    if listener is not None:
        # Before the application is loaded (and imports prometheus_client).
        metrics_directory = metrics.prepare()
    try:
        if not preloaded:
            try:
                preload(args.preload, args.include)
            except Exception as error:
                log.exception("preloading %s failed", ", ".join(args.preload))
                return fail(1, f"preloading {', '.join(args.preload)} failed: {error!r}")
        notifier = SystemdNotifier()

        def lifecycle(event: str, pool: Pool) -> None:
            if event == "started" and readiness is not None:
                readiness.started()
            notifier(event, pool)

        pool = Pool(
            source,
            appname=appname,
            redis_url=args.redis,
            worker_options=worker_options(args),
            term_behaviour=args.term_behaviour,
            spawn_delay=args.spawn_delay,
            single_process_group=args.single_process_group,
            daemonized=args.daemon,
            reopen_logs=log_files.reopen if log_files else None,
            lifecycle=lifecycle,
            close_in_workers=[pidfile.fd] if pidfile else [],
            drain=args.drain,
            metrics_listener=listener,
        )
        pool.groups = groups
        return pool.run()
    finally:
        if pidfile is not None:
            pidfile.release()
        if metrics_directory is not None:
            metrics.discard(metrics_directory)
