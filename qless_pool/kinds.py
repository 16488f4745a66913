"""What an option takes (options.py declares which kind each option is): a number of seconds
or a whole number in a range, a choice, a switch, a list, text. Each kind reads a value given
as text (a flag, a variable) or typed (invoke.yaml, Python) the same way, and refuses what it
does not take with OptionError, saying what it takes.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Union

__all__ = [
    "MAX_SECONDS",
    "Choice",
    "Kind",
    "Many",
    "OptionError",
    "Seconds",
    "Switch",
    "Text",
    "Whole",
]

#: The longest time an option may name: about 115 days (setitimer and poll take no more).
MAX_SECONDS = 10_000_000.0
_DECIMAL = re.compile(r"\+?[0-9]+")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class OptionError(ValueError):
    """A value an option does not take, or an option an entry does not have; the message says
    what it takes, or where it is."""


def _number(value: float) -> str:
    """3600.0 -> "3,600"; 0.01 -> "0.01"."""
    return f"{int(value):,}" if float(value).is_integer() else f"{value:g}"


# --- kinds: what an option takes ------------------------------------------------------------------


@dataclass(frozen=True)
class Seconds:
    """A finite number of seconds in ``[minimum, maximum]``; ``positive``: more than 0."""

    minimum: float = 0.0
    maximum: float = MAX_SECONDS
    positive: bool = False
    metavar = "SECONDS"

    def describe(self) -> str:
        low = "more than 0" if self.minimum == 0 and self.positive else _number(self.minimum)
        return f"seconds, {low} to {_number(self.maximum)}"

    def read(self, value: Any) -> float:
        if isinstance(value, str):
            text = value.strip()
            try:
                if "_" in text:
                    raise ValueError
                number = float(text)
            except ValueError:
                raise OptionError(f"not a number of seconds: {value!r}") from None
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise OptionError(f"not a number of seconds: {value!r}")
        else:
            number = float(value)
        if not math.isfinite(number):
            raise OptionError(f"not a finite number of seconds: {value!r}")
        if number < 0:
            raise OptionError(f"must not be negative: {value!r}")
        if self.positive and number == 0:
            raise OptionError("must be more than 0")
        if number < self.minimum:
            raise OptionError(f"must be at least {_number(self.minimum)} seconds: {value!r}")
        if number > self.maximum:
            raise OptionError(f"must be at most {_number(self.maximum)} seconds: {value!r}")
        return number


@dataclass(frozen=True)
class Whole:
    """A whole number in ``[minimum, maximum]``, in plain decimal when given as text."""

    minimum: int = 0
    maximum: int = 10**9
    metavar = "N"

    def describe(self) -> str:
        return f"{self.minimum:,} to {self.maximum:,}"

    def read(self, value: Any) -> int:
        if isinstance(value, str):
            text = value.strip()
            if not _DECIMAL.fullmatch(text):
                if self.minimum == 0 and re.fullmatch(r"-[0-9]+", text):
                    raise OptionError(f"must not be negative: {value!r}")
                raise OptionError(f"not a whole number: {value!r}")
            number = int(text)
        elif isinstance(value, float) and value.is_integer():
            number = int(value)
        elif isinstance(value, bool) or not isinstance(value, int):
            raise OptionError(f"not a whole number: {value!r}")
        else:
            number = value
        if number < self.minimum:
            if self.minimum == 0:
                raise OptionError(f"must not be negative: {value!r}")
            raise OptionError(f"must be {self.minimum} or more: {value!r}")
        if number > self.maximum:
            raise OptionError(f"must be at most {self.maximum:,}: {value!r}")
        return number


@dataclass(frozen=True)
class Text:
    """A non-empty string. Empty is refused: most often an unset variable (``--user "$RUN_AS"``),
    which must not quietly mean the default."""

    metavar = "TEXT"

    def describe(self) -> str:
        return "text"

    def read(self, value: Any) -> str:
        if not isinstance(value, str):
            raise OptionError(f"must be text, not {value!r}")
        if not value.strip():
            raise OptionError("empty (an unset variable?)")
        return value


@dataclass(frozen=True)
class Choice:
    """One of ``values`` (``upper``: compared in upper case, as log levels are)."""

    values: tuple[str, ...]
    upper: bool = False
    helps: tuple[str, ...] = ()  # one per value, for options with a flag per value
    metavar = "NAME"

    def describe(self) -> str:
        return ", ".join(self.values)

    def read(self, value: Any) -> str:
        text = value.strip() if isinstance(value, str) else value
        if self.upper and isinstance(text, str):
            text = text.upper()
        if text not in self.values:
            raise OptionError(f"must be one of {', '.join(self.values)}, not {value!r}")
        return str(text)


@dataclass(frozen=True)
class Switch:
    """On or off: a flag; in a setting, true or false (also yes/no, on/off, 1/0)."""

    metavar = None

    def describe(self) -> str:
        return "true or false"

    def read(self, value: Any) -> bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise OptionError(f"must be true or false, not {value!r}")


@dataclass(frozen=True)
class Many:
    """A list of non-empty strings: a flag given again and again; in a setting, a list, or one
    string with commas or spaces between the items."""

    metavar = "ITEM"

    def describe(self) -> str:
        return "a list"

    def read(self, value: Any) -> list[str]:
        if isinstance(value, str):
            return [part for part in value.replace(",", " ").split() if part]
        if isinstance(value, (list, tuple)):
            items = [Text().read(item) if isinstance(item, str) else item for item in value]
            if not all(isinstance(item, str) for item in items):
                raise OptionError(f"must be a list of names, not {value!r}")
            return items
        raise OptionError(f"must be a list, not {value!r}")


Kind = Union[Seconds, Whole, Text, Choice, Switch, Many]
