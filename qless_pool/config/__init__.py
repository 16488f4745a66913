"""The pool's configuration: a YAML file (or a dict, or a callable) -> worker groups.

A *group* is a queue list in priority order with the number of workers that serve it::

    {("foo",): 1, ("bar",): 2, ("foo", "bar", "baz"): 4}

The file's rules (docs/configuration.md says them for users):

- Keys are comma-separated queue lists; whitespace around each name is dropped.
- A root key with a whole-number value is a default for every environment.
- A root key whose value is a mapping is an environment section. The section named by the
  environment is merged over the defaults (the section wins); every other section is ignored.
- ``${VAR}`` and ``${VAR:-default}`` are filled in from the environment, scalar by scalar.
- Counts are whole numbers written in plain decimal, at most ``max_workers`` (the
  ``--max-workers`` option, default MAX_POOL_WORKERS) for one entry and for the pool in all,
  or ranges ``MIN..MAX`` whose MINs count toward that limit (counts.py).
- Queue names hold no control characters (a newline would split the log lines naming them).
- Anything else is an error that names the file and the key.

Reading the file is bounded (MAX_CONFIG_BYTES, then yamlfile.py's depth and value counts), so
that no file, however hostile, can make the manager spin, hang or die on a HUP.

The manager holds a :class:`ConfigSource` and calls :meth:`ConfigSource.load` at start and on
every HUP; nothing is read in between.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any, Optional, Union

from .counts import (
    MAX_RANGE,
    BadCount,
    Count,
    Counts,
    Groups,
    Queues,
    Range,
    has_ranges,
    highest,
    kind,
    lowest,
    worker_count,
)
from .yamlfile import YamlProblem, read_yaml, shown
from .yamlfile import expand_variables as _expand_variables

__all__ = [
    "DEFAULT_PATHS",
    "ENVIRONMENT_VARIABLES",
    "EX_CONFIG",
    "MAX_CONFIG_BYTES",
    "MAX_POOL_WORKERS",
    "MAX_RANGE",
    "ConfigError",
    "ConfigNotFound",
    "ConfigSource",
    "Count",
    "Counts",
    "Groups",
    "Queues",
    "Range",
    "describe_groups",
    "environment_name",
    "expand_variables",
    "find_config_file",
    "groups_to_json",
    "has_ranges",
    "highest",
    "lowest",
    "parse_groups",
    "resolve_groups",
]

#: Exit status for a configuration error (sysexits.h EX_CONFIG).
EX_CONFIG = 78
#: Looked for, in this order, relative to the working directory, when no file is named.
DEFAULT_PATHS = ("qless-pool.yml", "config/qless-pool.yml")
#: The first of these that is set names the environment when none is given.
ENVIRONMENT_VARIABLES = ("QLESS_ENV", "RACK_ENV", "RAILS_ENV")
CONFIG_VARIABLE = "QLESS_POOL_CONFIG"
#: The most workers a pool runs in all (so also for one queue list), unless --max-workers says
#: otherwise: a typo of a few digits must not fork until fork fails.
MAX_POOL_WORKERS = 1000
#: The most queues one queue list may name.
MAX_QUEUES = 1000
#: The largest config file read (a pool's config is a few hundred bytes).
MAX_CONFIG_BYTES = 1 << 20


RawConfig = Mapping[Any, Any]
ConfigLoader = Callable[[Optional[str]], Optional[RawConfig]]


class ConfigError(Exception):
    """A configuration that cannot be used; the message names the source and the key."""

    def __init__(
        self, source: str, problem: str, key: str | None = None, section: str | None = None
    ):
        self.source = source
        self.problem = problem
        self.key = key
        self.section = section
        where = ""
        if section is not None:
            where += f"section {shown(section)}, "
        if key is not None:
            where += f"key {shown(key)}: "
        super().__init__(f"{source}: {where}{problem}")


class ConfigNotFound(ConfigError):
    """No config file was named and none was found at the default paths."""

    def __init__(self, tried: list[str]):
        self.tried = tried
        Exception.__init__(
            self,
            "no config file found (tried "
            + ", ".join(tried)
            + f"); name one with --config or ${CONFIG_VARIABLE}",
        )
        self.source, self.problem, self.key, self.section = "", str(self), None, None


def environment_name(
    explicit: str | None = None, environ: Mapping[str, str] | None = None
) -> str | None:
    """The environment: ``explicit``, else the first of $QLESS_ENV, $RACK_ENV, $RAILS_ENV set."""
    if explicit:
        return explicit
    environ = os.environ if environ is None else environ
    for variable in ENVIRONMENT_VARIABLES:
        if environ.get(variable):
            return environ[variable]
    return None


def find_config_file(
    explicit: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    cwd: str | None = None,
) -> str:
    """The config file to use: ``explicit``, else $QLESS_POOL_CONFIG, else a default path.

    A file that is named (either way) must exist; the default paths are tried in order. Relative
    paths are taken from ``cwd`` (the working directory) and returned as given.
    """
    environ = os.environ if environ is None else environ
    cwd = os.getcwd() if cwd is None else cwd
    named = os.fspath(explicit) if explicit else environ.get(CONFIG_VARIABLE)
    if named:
        via = "" if explicit else f" (from ${CONFIG_VARIABLE})"
        try:
            info = os.stat(os.path.join(cwd, named))
        except FileNotFoundError:
            raise ConfigError(named, f"no such config file{via}") from None
        except NotADirectoryError:
            raise ConfigError(
                named, f"no such config file{via}: a part of the path is not a directory"
            ) from None
        except PermissionError:
            raise ConfigError(
                named, f"cannot be read{via}: a directory on its path cannot be searched"
            ) from None
        if stat.S_ISDIR(info.st_mode):
            raise ConfigError(named, f"is a directory, not a config file{via}")
        return named
    tried = []
    for path in DEFAULT_PATHS:
        if os.path.isfile(os.path.join(cwd, path)):
            return path
        tried.append(os.path.join(".", path))
    raise ConfigNotFound(tried)


def parse_groups(
    text: str,
    source: str,
    environment: str | None,
    environ: Mapping[str, str] | None = None,
    warn: Optional[Callable[[str], None]] = None,
    max_workers: int = MAX_POOL_WORKERS,
) -> Groups:
    """Parse a config file's text into groups for ``environment``.

    The YAML is read within bounds, its ``${VAR}`` filled in from ``environ`` scalar by scalar
    (yamlfile.py); comments are never expanded. ``warn`` and ``max_workers``: see
    :func:`resolve_groups`.
    """
    environ = os.environ if environ is None else environ
    try:
        raw = read_yaml(text, environ)
    except YamlProblem as problem:
        raise ConfigError(source, problem.problem, problem.key, problem.section) from None
    return resolve_groups(raw, source, environment, warn, max_workers)


def expand_variables(text: str, source: str, environ: Mapping[str, str] | None = None) -> str:
    """Replace ``${VAR}`` and ``${VAR:-default}`` in ``text`` from the environment (shell
    semantics), as text. The config file itself is expanded scalar by scalar instead (see
    :func:`parse_groups`), so that a value can never add keys or change the file's structure."""
    try:
        return _expand_variables(text, os.environ if environ is None else environ)
    except YamlProblem as problem:
        raise ConfigError(source, problem.problem) from None


def resolve_groups(
    raw: Any,
    source: str,
    environment: str | None,
    warn: Optional[Callable[[str], None]] = None,
    max_workers: int = MAX_POOL_WORKERS,
) -> Groups:
    """Apply the root/section rules to an already parsed config (a mapping, or None if empty).

    An ``environment`` the file has no section for, while it has sections, is an error listing
    the sections it has (a mistyped ``-E`` would otherwise run the defaults); with ``warn``
    given (the environment came from $QLESS_ENV and the like, which are often set for other
    reasons), it is ``warn(message)`` instead, and the defaults are used. More than
    ``max_workers`` workers in all is an error.
    """
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ConfigError(
            source,
            f"the top level must be a mapping of queue lists to worker counts, not {kind(raw)}",
        )
    defaults: dict[Any, Any] = {}
    sections: list[Any] = []
    section: Mapping[Any, Any] | None = None
    for key, value in raw.items():
        if isinstance(value, Mapping):
            sections.append(key)
            if environment is not None and key == environment:
                section = value
        else:
            defaults[key] = value
    if environment is not None and section is None and sections:
        message = (
            f"no section {environment!r} (the file has sections "
            + ", ".join(shown(str(name)) for name in sections)
            + ")"
        )
        if warn is None:
            raise ConfigError(source, message)
        warn(f"{source}: {message}; using the defaults")
    groups = _groups(defaults, source, None, max_workers)
    if section is not None:
        groups.update(_groups(section, source, environment, max_workers))
    total = sum(lowest(count) for count in groups.values())
    if total > max_workers:
        least = " at least" if any(isinstance(c, Range) for c in groups.values()) else ""
        raise ConfigError(
            source,
            f"asks for{least} {total} workers in all; a pool runs at most {max_workers} "
            "(--max-workers raises the limit)",
        )
    return groups


def _groups(
    entries: Mapping[Any, Any], source: str, section: str | None, max_workers: int
) -> Groups:
    groups: Groups = {}
    spelled: dict[Queues, str] = {}
    for key, count in entries.items():
        queues = _queue_list(key, source, section)
        if queues in groups:
            raise ConfigError(
                source,
                f"names the same queue list as key {shown(spelled[queues])}",
                key=key,
                section=section,
            )
        try:
            groups[queues] = worker_count(count, max_workers)
        except BadCount as problem:
            raise ConfigError(source, str(problem), key=key, section=section) from None
        spelled[queues] = key
    return groups


def _queue_list(key: Any, source: str, section: str | None) -> Queues:
    if not isinstance(key, str):
        raise ConfigError(
            source,
            f"a queue list must be a string, not {kind(key)} (put it in quotes)",
            key=str(key),
            section=section,
        )
    queues = tuple(name.strip() for name in key.split(","))
    if any(not name for name in queues):
        raise ConfigError(source, "empty queue name in the queue list", key=key, section=section)
    control = CONTROL_CHARACTER.search(key)
    if control:
        raise ConfigError(
            source,
            f"a queue name holds the control character {control.group(0)!r}",
            key=key,
            section=section,
        )
    if len(queues) > MAX_QUEUES:
        raise ConfigError(
            source,
            f"names {len(queues):,} queues; a worker takes at most {MAX_QUEUES:,} (it tries "
            "each in turn every time it looks for a job)",
            key=key,
            section=section,
        )
    repeated = sorted(name for name, times in Counter(queues).items() if times > 1)
    if repeated:
        raise ConfigError(
            source,
            f"queue {shown(repeated[0])} appears twice in the list",
            key=key,
            section=section,
        )
    return queues


#: C0 and C1 control characters, DEL among them: not in a queue name.
CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _too_big(size: int) -> str:
    return f"is {size:,} bytes; a config file may be at most {MAX_CONFIG_BYTES:,} bytes"


def describe_groups(groups: Groups) -> str:
    """``foo: 1, foo,bar,baz: 4, bar: 1..8`` (or ``no workers``), for log lines."""
    return ", ".join(f"{','.join(q)}: {n}" for q, n in groups.items()) or "no workers"


def groups_to_json(groups: Groups) -> str:
    """One JSON object, ``{"foo": 1, "foo,bar,baz": 4, "bar": "1..8"}``, in the file's order."""
    return json.dumps(
        {
            ",".join(queues): str(count) if isinstance(count, Range) else count
            for queues, count in groups.items()
        }
    )


ConfigSpec = Union[str, "os.PathLike[str]", RawConfig, ConfigLoader, None]


class ConfigSource:
    """Where the pool's groups come from, read anew on every :meth:`load`.

    ``config`` is a path, a mapping in the file's shape, a callable taking the environment name
    and returning such a mapping (a custom loader, called on every load), or None to search the
    default places. The file to read is found once, here; its contents are read on each load.
    """

    def __init__(
        self,
        config: ConfigSpec = None,
        environment: str | None = None,
        environ: Mapping[str, str] | None = None,
        cwd: str | None = None,
        max_workers: int = MAX_POOL_WORKERS,
    ):
        self.environ = os.environ if environ is None else environ
        self.max_workers = max_workers
        self.environment = environment_name(environment, self.environ)
        # Named by -E (a missing section is an error) or by $QLESS_ENV and the like (a warning).
        self.environment_given = bool(environment)
        #: What the last load() had to say that is not an error (the manager logs it).
        self.warnings: list[str] = []
        self.path: str | None = None
        self.mapping: RawConfig | None = None
        self.loader: ConfigLoader | None = None
        if isinstance(config, Mapping):
            self.mapping = config
            self.name = "<config dict>"
        elif callable(config):
            self.loader = config
            self.name = f"<config loader {getattr(config, '__qualname__', config)!s}>"
        else:
            relative = find_config_file(config, self.environ, cwd)
            self.path = os.path.join(cwd or os.getcwd(), relative)
            self.name = relative

    def load(self) -> Groups:
        """The groups as the source says now. Raises :class:`ConfigError`."""
        self.warnings = []
        warn = None if self.environment_given else self.warnings.append
        if self.path is not None:
            text = self._read()
            return parse_groups(
                text, self.name, self.environment, self.environ, warn, self.max_workers
            )
        if self.loader is not None:
            try:
                raw = self.loader(self.environment)
            except Exception as exc:
                raise ConfigError(self.name, f"raised {exc.__class__.__name__}: {exc}") from exc
        else:
            raw = self.mapping
        return resolve_groups(raw, self.name, self.environment, warn, self.max_workers)

    def _read(self) -> str:
        """The file's text, at most MAX_CONFIG_BYTES of it. Opened without blocking (a FIFO put
        in its place must not hang the manager) and read only if it is a regular file."""
        assert self.path is not None
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
        except OSError as exc:
            raise ConfigError(self.name, f"cannot be read: {exc.strerror or exc}") from None
        with os.fdopen(fd, "rb") as file:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise ConfigError(self.name, "cannot be read: not a regular file")
            if info.st_size > MAX_CONFIG_BYTES:
                raise ConfigError(self.name, _too_big(info.st_size))
            try:
                data = file.read(MAX_CONFIG_BYTES + 1)
            except OSError as exc:
                raise ConfigError(self.name, f"cannot be read: {exc.strerror or exc}") from None
        if len(data) > MAX_CONFIG_BYTES:  # it grew while being read
            raise ConfigError(self.name, _too_big(len(data)))
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(self.name, f"cannot be read: not UTF-8 text ({exc})") from None

    def __repr__(self) -> str:
        return f"ConfigSource({self.name!r}, environment={self.environment!r})"
