"""The ``qless-pool`` command (also ``python -m qless_pool``): its parser, made from the options'
declaration (options.py), and its subcommands."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from importlib import metadata
from typing import Any

from . import __version__, options
from .options import COMMAND, Option, Switch

__all__ = ["build_parser", "main"]

DESCRIPTION = (
    "Run a pool of qless workers: one manager process loads the application once, forks a "
    "worker per slot of the config file and keeps the counts right."
)
EPILOG = (
    "Signals to the manager: HUP reload the config, QUIT graceful stop, INT stop, TERM (see "
    "--term-*), WINCH stop workers (daemon only), USR1/USR2/CONT passed to the workers, URG "
    "reload new code (qless-pool reload). "
    "The commands (qless-pool COMMAND --help): status, stop, reload, queues, failed, job, "
    "retry, cancel, pause, unpause."
)


def _version_line() -> str:
    return (
        f"qless-pool {__version__} (qless-py {metadata.version('qless-py')}, "
        f"Python {sys.version.split()[0]})"
    )


def _argument_type(opt: Option) -> Callable[[str], Any]:
    """The argparse type of ``opt``: its kind's reading of one value (a list's: of one item)."""
    kind = options.Text() if isinstance(opt.kind, options.Many) else opt.kind

    def read(text: str) -> Any:
        try:
            return kind.read(text)
        except options.OptionError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    read.__name__ = opt.name  # argparse names the type in some messages
    return read


def _help(opt: Option) -> str:
    default = options.default_text(opt)
    shown = "" if isinstance(opt.kind, Switch) or default == "none" else f" (default: {default})"
    takes = f": {opt.kind.describe()}" if isinstance(opt.kind, options.Choice) else ""
    return f"{opt.help}{takes}{shown}".replace("%", "%%")


def add_option(group: Any, opt: Option) -> None:
    """``opt``'s flags, as the declaration says."""
    if isinstance(opt.kind, Switch):  # the flag turns it from its default
        action = "store_false" if opt.default else "store_true"
        group.add_argument(*opt.flags, dest=opt.name, action=action, help=_help(opt))
        group.set_defaults(**{opt.name: opt.default})
    elif opt.const_flags:  # one flag per value (--term-graceful ...)
        assert isinstance(opt.kind, options.Choice)
        exclusive = group.add_mutually_exclusive_group()
        for flag, value, text in zip(opt.flags, opt.kind.values, opt.kind.helps):
            default = " (default)" if value == opt.default else ""
            exclusive.add_argument(
                flag, dest=opt.name, action="store_const", const=value, help=f"{text}{default}"
            )
        group.set_defaults(**{opt.name: opt.default})
    else:
        many = isinstance(opt.kind, options.Many)
        group.add_argument(
            *opt.flags,
            dest=opt.name,
            action="append" if many else "store",
            type=_argument_type(opt),
            metavar=opt.metavar or opt.kind.metavar,
            default=opt.default,
            help=_help(opt),
        )
    if opt.off_flag:
        group.add_argument(
            opt.off_flag, dest=opt.name, action="store_const", const=False,
            help=f"no {opt.name} (of {opt.flags[-1]} and {opt.off_flag}, the last one wins)",
        )  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qless-pool", description=DESCRIPTION, epilog=EPILOG)
    groups = {section: parser.add_argument_group(section) for section in options.sections()}
    for opt in options.for_entry(COMMAND):
        add_option(groups[opt.section], opt)
    groups[options.OTHER].add_argument("-v", "--version", action="version", version=_version_line())
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["web"]:  # the dashboard (the web extra)
        from .web.serve import main as web

        return web(argv[1:])
    if argv[:1] == ["status"]:
        from .ops import status

        return status.main(argv[1:])
    if argv and not argv[0].startswith("-"):  # the pool's command line has no word of its own
        from .ops import commands

        if argv[0] in commands.COMMANDS:
            return commands.main(argv[0], argv[1:])
        names = ", ".join(["status", *commands.COMMANDS, "web"])
        build_parser().error(f"unknown command {argv[0]!r} (the commands: {names})")
    from .pool.launch import launch

    values = vars(build_parser().parse_args(argv))
    return launch(values)
