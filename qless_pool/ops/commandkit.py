"""What every operator's command shares (commands.py, poolcommands.py): the exit statuses, the
parser's common flags, and how an answer is printed."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

__all__ = ["EX_NOT_FOUND", "EX_NO_POOL", "EX_UNAVAILABLE", "EX_USAGE", "Failed", "command_parser",
           "print_json", "print_text", "whole"]  # fmt: skip

EX_NOT_FOUND = 1
EX_USAGE = 2
EX_NO_POOL = 3
EX_UNAVAILABLE = 69


class Failed(Exception):
    """One line for stderr, and the exit status."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


def command_parser(name: str, description: str, redis: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"qless-pool {name}", description=description)
    if redis:
        parser.add_argument(
            "-R", "--redis", metavar="URL",
            help="qless's Redis (default: $QLESS_URL, $REDIS_URL, redis://localhost:6379/0)",
        )  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    return parser


def whole(low: int, high: int) -> Callable[[str], int]:
    def read(text: str) -> int:
        if not text.isdigit() or not low <= int(text) <= high:
            raise argparse.ArgumentTypeError(f"a whole number from {low} to {high:,}: {text!r}")
        return int(text)

    return read


def print_text(text: str) -> int:
    print(text)
    return 0


def print_json(value: Any) -> int:
    print(json.dumps(value, indent=2, sort_keys=True))
    return 0
