"""The ``qless-pool`` command (also ``python -m qless_pool``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib import metadata

from . import __version__
from .config import EX_CONFIG, ConfigError, ConfigSource, groups_to_json

__all__ = ["build_parser", "main"]


def _version_line() -> str:
    return (
        f"qless-pool {__version__} (qless-py {metadata.version('qless-py')}, "
        f"Python {sys.version.split()[0]})"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qless-pool",
        description="Run a pool of qless workers: one manager process forks and supervises "
        "one worker per slot of the config file.",
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
    parser.add_argument("-v", "--version", action="version", version=_version_line())
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        source = ConfigSource(args.config, args.environment)
        groups = source.load()
    except ConfigError as exc:
        print(f"qless-pool: config error: {exc}", file=sys.stderr)
        return EX_CONFIG
    if args.dry_run:
        print(groups_to_json(groups))
        return 0
    print("qless-pool: the pool manager is not built yet; use --dry-run", file=sys.stderr)
    return 2
