"""The pool's configuration: a YAML file (or a dict, or a callable) -> worker groups.

A *group* is a queue list in priority order with the number of workers that serve it::

    {("foo",): 1, ("bar",): 2, ("foo", "bar", "baz"): 4}

The file's rules (README.md, "The config file", says them for users):

- Keys are comma-separated queue lists; whitespace around each name is dropped.
- A root key with a whole-number value is a default for every environment.
- A root key whose value is a mapping is an environment section. The section named by the
  environment is merged over the defaults (the section wins); every other section is ignored.
- ``${VAR}`` and ``${VAR:-default}`` are replaced from the environment before the YAML is read.
- Anything else is an error that names the file and the key.

The manager holds a :class:`ConfigSource` and calls :meth:`ConfigSource.load` at start and on
every HUP; nothing is read in between.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from typing import Any, Optional, Union

import yaml

__all__ = [
    "DEFAULT_PATHS",
    "ENVIRONMENT_VARIABLES",
    "EX_CONFIG",
    "ConfigError",
    "ConfigNotFound",
    "ConfigSource",
    "Groups",
    "environment_name",
    "expand_variables",
    "find_config_file",
    "groups_to_json",
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

Queues = tuple[str, ...]
Groups = dict[Queues, int]
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
            where += f"section {section!r}, "
        if key is not None:
            where += f"key {key!r}: "
        super().__init__(f"{source}: {where}{problem}")


class ConfigNotFound(ConfigError):
    """No config file was named and none was found at the default paths."""

    def __init__(self, tried: list[str]):
        self.tried = tried
        super().__init__(
            "qless-pool",
            "no config file found (tried "
            + ", ".join(tried)
            + f"); name one with --config or ${CONFIG_VARIABLE}",
        )


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
        if not os.path.isfile(os.path.join(cwd, named)):
            via = "" if explicit else f" (from ${CONFIG_VARIABLE})"
            raise ConfigError(named, f"no such config file{via}")
        return named
    tried = []
    for path in DEFAULT_PATHS:
        if os.path.isfile(os.path.join(cwd, path)):
            return path
        tried.append(os.path.join(".", path))
    raise ConfigNotFound(tried)


_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_variables(text: str, source: str, environ: Mapping[str, str] | None = None) -> str:
    """Replace ``${VAR}`` and ``${VAR:-default}`` from the environment (shell semantics).

    The default is used when the variable is unset or empty. An unset variable without a default
    is an error (a silently empty count or queue name is worse). Comment lines are left alone, so
    a commented-out line never fails the file. A value holding a line break is refused: it could
    add keys to the file instead of filling in one value.
    """
    environ = os.environ if environ is None else environ
    lines = text.splitlines(keepends=True)
    for number, line in enumerate(lines, start=1):
        if line.lstrip().startswith("#") or "${" not in line:
            continue

        def replace(match: re.Match[str], number: int = number) -> str:
            name, default = match.group(1), match.group(2)
            value = environ.get(name)
            if default is not None and not value:
                return default
            if value is None:
                raise ConfigError(
                    source,
                    f"line {number}: ${{{name}}} is not set in the environment "
                    f"(write ${{{name}:-default}} to give a default)",
                )
            if "\n" in value or "\r" in value:
                raise ConfigError(source, f"line {number}: ${{{name}}} holds a line break")
            return value

        lines[number - 1] = _VARIABLE.sub(replace, line)
    return "".join(lines)


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a mapping that repeats a key (PyYAML keeps the last one)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    mapping: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in mapping:
            mark = key_node.start_mark
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} appears twice (line {mark.line + 1})", mark
            )
        mapping[key] = loader.construct_object(value_node, deep=deep)
    return mapping


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def parse_groups(
    text: str, source: str, environment: str | None, environ: Mapping[str, str] | None = None
) -> Groups:
    """Parse a config file's text into groups for ``environment``."""
    text = expand_variables(text, source, environ)
    try:
        raw = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(source, f"not valid YAML: {_describe_yaml_error(exc)}") from None
    return resolve_groups(raw, source, environment)


def _describe_yaml_error(exc: yaml.YAMLError) -> str:
    problem = getattr(exc, "problem", None) or str(exc)
    mark = getattr(exc, "problem_mark", None)
    if mark is None:
        return problem
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})"


def resolve_groups(raw: Any, source: str, environment: str | None) -> Groups:
    """Apply the root/section rules to an already parsed config (a mapping, or None if empty)."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ConfigError(
            source,
            f"the top level must be a mapping of queue lists to worker counts, not {_kind(raw)}",
        )
    defaults: dict[Any, Any] = {}
    section: Mapping[Any, Any] | None = None
    for key, value in raw.items():
        if isinstance(value, Mapping):
            if environment is not None and key == environment:
                section = value
        else:
            defaults[key] = value
    groups = _groups(defaults, source, None)
    if section is not None:
        groups.update(_groups(section, source, environment))
    return groups


def _groups(entries: Mapping[Any, Any], source: str, section: str | None) -> Groups:
    groups: Groups = {}
    spelled: dict[Queues, str] = {}
    for key, count in entries.items():
        queues = _queue_list(key, source, section)
        if queues in groups:
            raise ConfigError(
                source,
                f"names the same queue list as key {spelled[queues]!r}",
                key=key,
                section=section,
            )
        groups[queues] = _worker_count(count, source, key, section)
        spelled[queues] = key
    return groups


def _queue_list(key: Any, source: str, section: str | None) -> Queues:
    if not isinstance(key, str):
        raise ConfigError(
            source,
            f"a queue list must be a string, not {_kind(key)} (put it in quotes)",
            key=str(key),
            section=section,
        )
    queues = tuple(name.strip() for name in key.split(","))
    if any(not name for name in queues):
        raise ConfigError(source, "empty queue name in the queue list", key=key, section=section)
    repeated = sorted({name for name in queues if queues.count(name) > 1})
    if repeated:
        raise ConfigError(
            source, f"queue {repeated[0]!r} appears twice in the list", key=key, section=section
        )
    return queues


def _worker_count(count: Any, source: str, key: str, section: str | None) -> int:
    if isinstance(count, bool) or not isinstance(count, int):
        raise ConfigError(
            source,
            f"the worker count must be a whole number, not {_kind(count)}",
            key=key,
            section=section,
        )
    if count < 0:
        raise ConfigError(
            source, f"the worker count must not be negative ({count})", key=key, section=section
        )
    return count


def _kind(value: Any) -> str:
    if value is None:
        return "empty"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, str):
        return f"a string ({value!r})"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, float):
        return f"a fraction ({value!r})"
    return f"{type(value).__name__} ({value!r})"


def groups_to_json(groups: Groups) -> str:
    """One JSON object, ``{"foo": 1, "foo,bar,baz": 4}``, in the file's order."""
    return json.dumps({",".join(queues): count for queues, count in groups.items()})


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
    ):
        self.environ = os.environ if environ is None else environ
        self.environment = environment_name(environment, self.environ)
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
        if self.path is not None:
            try:
                with open(self.path, encoding="utf-8") as file:
                    text = file.read()
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(self.name, f"cannot be read: {exc}") from None
            return parse_groups(text, self.name, self.environment, self.environ)
        if self.loader is not None:
            try:
                raw = self.loader(self.environment)
            except Exception as exc:
                raise ConfigError(self.name, f"raised {exc.__class__.__name__}: {exc}") from exc
            return resolve_groups(raw, self.name, self.environment)
        return resolve_groups(self.mapping, self.name, self.environment)

    def __repr__(self) -> str:
        return f"ConfigSource({self.name!r}, environment={self.environment!r})"
