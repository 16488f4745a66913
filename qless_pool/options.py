"""The values the pool's options may take, checked the same way in every entry.

Every number an operator can give has a range, checked at start wherever it comes from: the
``qless-pool`` command line, the Invoke settings and task flags, ``qless_pool.run(...)`` and a
:class:`~qless_pool.worker.Worker` made by hand. A value outside it is refused with one line
that names the option, never carried into the workers to crash them one after the other.

:data:`RANGES` is the table; :func:`check` applies it to a value given in Python, and
:func:`parse` to one given as text (a flag, an environment variable).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional, Union

__all__ = ["MAX_SECONDS", "RANGES", "OptionError", "Seconds", "Whole", "check", "parse"]

#: The longest time an option may name: about 115 days (setitimer and poll take no more).
MAX_SECONDS = 10_000_000.0
_DECIMAL = re.compile(r"\+?[0-9]+")


def _number(value: float) -> str:
    """3600.0 -> "3,600"; 0.01 -> "0.01"."""
    return f"{int(value):,}" if float(value).is_integer() else f"{value:g}"


class OptionError(ValueError):
    """A value outside its option's range; the message says what the option takes."""


@dataclass(frozen=True)
class Seconds:
    """A finite number of seconds in ``[minimum, maximum]``; ``positive``: more than 0."""

    minimum: float = 0.0
    maximum: float = MAX_SECONDS
    positive: bool = False

    def describe(self) -> str:
        low = "more than 0" if self.minimum == 0 and self.positive else _number(self.minimum)
        return f"seconds from {low} to {_number(self.maximum)}"

    def __call__(self, value: Union[str, float, int]) -> float:
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
    """A whole number in ``[minimum, maximum]``, written in plain decimal when given as text."""

    minimum: int = 0
    maximum: int = 10**9

    def describe(self) -> str:
        return f"a whole number from {self.minimum:,} to {self.maximum:,}"

    def __call__(self, value: Union[str, int, float]) -> int:
        if isinstance(value, str):
            if not _DECIMAL.fullmatch(value.strip()):
                if re.fullmatch(r"\s*-[0-9]+\s*", value) and self.minimum == 0:
                    raise OptionError(f"must not be negative: {value!r}")
                raise OptionError(f"not a whole number: {value!r}")
            number = int(value)
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


Range = Union[Seconds, Whole]

#: Each numeric option and the values it takes (README.md, "Options", says them for users).
RANGES: Mapping[str, Range] = {
    "interval": Seconds(0.01, 3600.0),
    "spawn_delay": Seconds(0.0, 3600.0),
    "job_timeout": Seconds(0.0, MAX_SECONDS, positive=True),
    "graceful_timeout": Seconds(0.0, MAX_SECONDS, positive=True),
    "kill_grace": Seconds(0.0, 3600.0),
    "prefetch": Whole(1, 1000),
    "max_jobs": Whole(1, 10**9),
    "max_jobs_jitter": Whole(0, 10**9),
    "max_memory": Whole(1, 10**7),
    "max_workers": Whole(1, 100_000),
    "metrics_port": Whole(1, 65535),
}


#: Options that always have a value (None is not "not given" for them).
_GIVEN = frozenset({"interval", "spawn_delay", "kill_grace", "max_jobs_jitter"})


def check(name: str, value: Any) -> Any:
    """``value`` (None stays None: not given) if option ``name`` takes it; else OptionError
    naming the option."""
    if value is None:
        if name in _GIVEN:
            raise OptionError(f"{name}: must be given, not None")
        return None
    try:
        return RANGES[name](value)
    except OptionError as error:
        raise OptionError(f"{name}: {error}") from None


def parse(name: str, text: str) -> Any:
    """The value option ``name`` takes from ``text`` (OptionError without the name: the caller
    says how the option was spelled)."""
    return RANGES[name](text)


def checked(options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` with each of those that has a range checked (OptionError on the first bad)."""
    return {
        name: check(name, value) if name in RANGES else value for name, value in options.items()
    }


def nonempty(what: str, value: Optional[str]) -> Optional[str]:
    """None (not given) or a non-empty string: an empty one is most often an unset variable
    (``--user "$RUN_AS"``), which must not quietly mean the default."""
    if value is not None and not value.strip():
        raise OptionError(f"{what}: empty (an unset variable?)")
    return value
