"""From options to a running pool: the one way every entry starts one.

The ``qless-pool`` command (cli.py), ``invoke qless.pool`` (tasks.py) and ``qless_pool.run()``
all end here, with the options read the same way (options.py)::

    check       the config, the Redis URL (and, if Redis answers, its database), the allowlist,
                --user/--group, the metrics extra: nothing is forked or opened yet
    daemonize   -d: detach; from here on the start is reported through a pipe
    open        log files, pidfile, lock, the metrics port (as root, if started as root)
    drop        --user/--group: from here on the application runs unprivileged
    load        --preload (Invoke's qless.setup has loaded it already)
    run         Pool(...).run(), until a signal (or --drain) ends it

A manager started by a reload (pool/reload.py, the same command line re-executed) takes the same
path, as a *successor*: it does not daemonize, bind or take the pidfile (its predecessor holds
them; it takes the pidfile over once it serves every slot), and a failure on the way is said to
the old manager, which serves on. A manager that handed over in the foreground stays as the
keeper of its successor (keeper.py).
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from typing import Any, Optional

from .. import logs, options, proctitle
from ..client import look_at_redis
from ..config import EX_CONFIG, ConfigError, ConfigSource, Groups, groups_to_json
from ..hooks import preload
from ..ops import metrics
from ..ops.daemon import (
    DEFAULT_PIDFILE,
    DEFAULT_STDERR,
    DEFAULT_STDOUT,
    DaemonError,
    Identity,
    LogFiles,
    PoolLock,
    Readiness,
    SystemdNotifier,
    daemonize,
    drop_privileges,
    resolve_identity,
)
from ..ops.pidfile import Pidfile
from ..urls import check_redis_url, mask_secrets, redis_url_and_origin
from ..worker.reservation import check_allowed_modules, default_allowed_modules
from .handover import Successor, logical_directory
from .keeper import become_keeper
from .manager import Pool

__all__ = ["LaunchError", "check", "launch", "run"]

log = logs.logger.getChild("launch")


class LaunchError(Exception):
    """The pool cannot start: one line for the operator, and the exit status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class Checked:
    """Options that passed every check made before anything starts."""

    values: dict[str, Any]
    source: ConfigSource
    groups: Groups
    identity: Optional[Identity]
    redis_unreachable: Optional[str] = None  # at start: said, and ridden out by the workers


def check(values: dict[str, Any], source: Optional[ConfigSource] = None) -> Checked:
    """Everything that can be checked before anything forks, detaches or opens a file; raises
    LaunchError. ``values["redis"]`` becomes the URL to use (the option's, else the
    environment's, else the default), ``values["allow_modules"]`` the allowlist in force."""
    try:
        if source is None:
            source = ConfigSource(
                values["config"], values["environment"], max_workers=values["max_workers"]
            )
        groups = source.load()
    except ConfigError as error:
        raise LaunchError(EX_CONFIG, f"config error: {error}") from None
    # A URL that cannot work is refused here; a Redis that is down is not (the workers ride
    # that out).
    url, origin = redis_url_and_origin(values["redis"])
    try:
        check_redis_url(url)
    except ValueError as error:
        raise LaunchError(2, f"bad Redis URL (from {origin}): {error}") from None
    values["redis"] = url
    allowed = values["allow_modules"]
    try:
        values["allow_modules"] = list(
            check_allowed_modules(default_allowed_modules() if allowed is None else allowed)
        )
    except ValueError as error:
        raise LaunchError(2, f"--allow-module: {error}") from None
    try:
        identity = resolve_identity(values.get("user"), values.get("group"))
    except DaemonError as error:
        raise LaunchError(error.status, str(error)) from None
    if values.get("metrics_port"):
        try:
            metrics.require()
        except metrics.MetricsError as error:
            raise LaunchError(error.status, str(error)) from None
    unreachable = None
    if not values.get("dry_run"):
        found = look_at_redis(url)
        if found.refused:
            raise LaunchError(2, found.refused)
        unreachable = found.unreachable
    return Checked(values, source, groups, identity, unreachable)


def launch(
    values: dict[str, Any], source: Optional[ConfigSource] = None, preloaded: bool = False
) -> int:
    """Start a pool as the command does (also ``invoke qless.pool``): a problem is one line on
    stderr and the exit status. ``preloaded``: the application is loaded in this process
    already (Invoke's ``qless.setup``), so ``--preload`` and ``--include`` are not applied
    again. Returns the exit status."""
    successor = Successor.from_environment()
    environ = _start_environment(successor)
    try:
        checked = check(values, source)
    except LaunchError as error:
        print(f"qless-pool: {error}", file=sys.stderr)
        if successor is not None:
            successor.failed(str(error))
        return error.status
    if values.get("dry_run"):
        print(groups_to_json(checked.groups))
        return 0
    # Everything that can be checked before detaching has been: from here on, a daemon reports
    # its start (or why it failed) through `readiness`, and the command exits with that.
    readiness = daemonize() if values.get("daemon") and successor is None else None
    return _run(checked, readiness, preloaded, True, successor, environ, keeper_in_place=True)


def run(
    config: Any = None,
    environment: Optional[str] = None,
    *,
    log_level: Optional[str] = "INFO",
    **given: Any,
) -> int:
    """Run a pool from a plain script; returns the exit status when the pool stops.

    ``qless_pool.run("config/qless-pool.yml", "production", preload=["myapp"])``. ``config`` is
    a path, a dict in the file's shape, or a callable taking the environment name and
    returning one (config/__init__.py). The keywords are the options (options.py, or the
    option reference, docs/options.md), by their setting names; ``log_level=None`` leaves logging as the
    caller set it up. A bad option raises OptionError, a bad config ConfigError, both before
    the application is loaded; what the command would refuse with an exit status (a bad Redis
    URL, a pidfile held) raises LaunchError.
    """
    successor = Successor.from_environment()
    environ = _start_environment(successor)
    try:
        values = options.read_values(
            {**given, **({"log_level": log_level} if log_level is not None else {})},
            options.RUN,
            where="qless_pool.run(): ",
        )
        source = ConfigSource(config, environment, max_workers=values["max_workers"])
        source.load()  # ConfigError, before anything else
        checked = check(values, source)
    except Exception as error:
        if successor is not None:
            successor.failed(str(error))
        raise
    return _run(checked, None, False, log_level is not None, successor, environ)


def _start_environment(successor: Optional[Successor]) -> dict[str, str]:
    """The environment a reload starts the next manager with: this one's, less the metrics
    directory a reload made for this manager (each manager has its own)."""
    environ = dict(os.environ)
    if successor is not None:
        from ..ops.state import private_base

        made = environ.get(metrics.MULTIPROC_VARIABLE, "")
        if made and os.path.dirname(made) == private_base():
            del environ[metrics.MULTIPROC_VARIABLE]
    return environ


def _run(
    checked: Checked,
    readiness: Optional[Readiness],
    preloaded: bool,
    configure_logging: bool,
    successor: Optional[Successor] = None,
    environ: Optional[dict[str, str]] = None,
    keeper_in_place: bool = False,
) -> int:
    """Open, drop, load and run (the module's docstring). ``successor``: this manager was
    started by a reload; ``environ``: the environment as the pool was started (a reload starts
    the new manager with it); ``keeper_in_place``: after a hand-over in the foreground, this
    process becomes the bare keeper (keeper.py), not returning (``run()`` returns)."""
    values = checked.values
    # The directory as given: /srv/app/current, not the release it points at now.
    appname = values["appname"] or os.path.basename(logical_directory())
    # At once: the command line (which may hold a password) is no longer what ps shows.
    proctitle.set_title(proctitle.manager(appname, []))
    log_files: Optional[LogFiles] = None
    pidfile: Optional[Pidfile] = None
    lock: Optional[PoolLock] = None

    def fail(status: int, message: str) -> int:
        """One line for the operator: on the launching terminal (a daemon's start pipe), and
        in the log file if one is open. The pidfile goes first: once the command has its
        answer, nothing of the failed start is left."""
        if pidfile is not None:
            pidfile.release()
        if successor is not None:
            successor.failed(message)
        if readiness is None:
            print(f"qless-pool: {message}", file=sys.stderr)
        else:
            if log_files is not None:
                log.error("%s", message)
            readiness.failed(status, message)
        return status

    daemon = bool(values.get("daemon"))
    if daemon or values.get("stdout") or values.get("stderr"):
        files = LogFiles(
            values.get("stdout") or DEFAULT_STDOUT,
            values.get("stderr") or DEFAULT_STDERR,
            sync=values["sync"],
        )
        try:
            files.open()
        except DaemonError as error:
            return fail(error.status, str(error))
        log_files = files
    if configure_logging:
        logs.configure(values["log_level"], appname=appname)
    logs.set_role("manager", appname)

    given_pidfile = values.get("pidfile")
    pidfile_path = (DEFAULT_PIDFILE if daemon else None) if given_pidfile is None else given_pidfile
    pidfile = Pidfile(pidfile_path) if pidfile_path else None
    try:
        if pidfile is not None and successor is None:  # a successor takes it over once serving
            pidfile.acquire()
        if values.get("lock"):
            lock = PoolLock(values["lock"])
            lock.acquire()
    except DaemonError as error:
        return fail(error.status, str(error))
    listener = None
    if successor is not None and successor.metrics_fd is not None:
        listener = socket.socket(fileno=successor.metrics_fd)  # the old manager's, handed over
    elif values.get("metrics_port"):  # bound before dropping privileges: a port below 1024 too
        try:
            listener = metrics.bind(values["metrics_address"], values["metrics_port"])
        except metrics.MetricsError as error:
            return fail(error.status, str(error))
    # The files are open: from here on, the application runs without root's privileges.
    if checked.identity is not None:
        drop_privileges(checked.identity, log_files)
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
            modules = values["preload"] or []
            try:
                preload(modules, values["include"] or [])
            except Exception as error:
                log.exception("preloading %s failed", ", ".join(modules))
                return fail(1, f"preloading {', '.join(modules)} failed: {error!r}")
        notifier = SystemdNotifier()

        unreachable = ""
        if checked.redis_unreachable:
            unreachable = (
                f"Redis at {mask_secrets(values['redis'])} is unreachable now "
                f"({checked.redis_unreachable}): the workers wait for it"
            )
            log.warning("%s", unreachable)
            unreachable = "but " + unreachable

        def lifecycle(event: str, pool: Pool) -> None:
            if event == "started" and readiness is not None:
                readiness.started(unreachable)
            # systemd hears a reload's new manager once it has taken over, and the old one no
            # more from then on (NotifyAccess=all: a failed new manager's STOPPING=1 would
            # stop the service).
            taking_over = pool.successor is not None and not pool.successor.serving
            if not (pool.handed_over or taking_over):
                notifier(event, pool)

        pool = Pool(
            checked.source,
            **{**options.going_to("pool", values), "appname": appname},
            worker_options=options.going_to("worker", values),
            daemonized=daemon,
            reopen_logs=log_files.reopen if log_files else None,
            lifecycle=lifecycle,
            close_in_workers=[pidfile.fd] if pidfile and pidfile.fd >= 0 else [],
            metrics_listener=listener,
            successor=successor,
        )
        pool.start_environ = environ
        pool.lock_fd = lock.fd if lock is not None else None
        if successor is not None and pidfile is not None:
            taken = pidfile
            if successor.pidfile_fd is not None:
                pidfile.adopt(successor.pidfile_fd)

            def take_pidfile() -> None:
                taken.take_over()
                pool.pidfile_fd = taken.fd
                pool.close_in_workers = (taken.fd,)  # a worker must not hold its lock

            pool.on_serving.append(take_pidfile)
        if pidfile is not None and pidfile.fd >= 0:
            pool.pidfile_fd = pidfile.fd
            pool.close_in_workers = (pidfile.fd,)
        pool.groups = checked.groups
        pool.launch_options = {
            **{opt.name: values.get(opt.name) for opt in options.OPTIONS if opt.goes_to == "launch"
               and opt.name in values},
            "daemon": daemon,
            "pidfile": pidfile_path or False,
            "stdout": log_files.stdout if log_files else None,
            "stderr": log_files.stderr if log_files else None,
        }  # fmt: skip
        pool.launch_options.pop("dry_run", None)
        status = pool.run()
        if pool.handed_over and pidfile is not None:
            pidfile.disown()  # the new manager's (or about to be): never removed by us
        if pool.handed_over and pool.keeps and pool.handover is not None:
            return become_keeper(pool.handover.new_pid, appname, in_place=keeper_in_place)
        return status
    finally:
        if pidfile is not None:
            pidfile.release()
        if metrics_directory is not None:
            metrics.discard(metrics_directory)
