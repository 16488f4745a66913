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
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Optional, Union

import yaml

__all__ = [
    "DEFAULT_PATHS",
    "ENVIRONMENT_VARIABLES",
    "EX_CONFIG",
    "MAX_WORKERS",
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
#: The most workers one queue list may ask for (a typo of a few digits must not fork until
#: fork fails).
MAX_WORKERS = 1000
#: The most characters of a value from the file an error message shows.
SHOWN_LIMIT = 60
#: YAML's limit on the length of a key written the usual way (``"key": value``).
SIMPLE_KEY_LIMIT = 1024

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
            where += f"section {_shown(section)}, "
        if key is not None:
            where += f"key {_shown(key)}: "
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


_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
#: Stands in the YAML text for the n-th ``${VAR}`` until the file's structure is read: letters
#: and digits only, so it reads as part of whatever scalar the variable was written in.
_MARK = re.compile(r"qlesspoolvar([0-9]+)x")


@dataclass(frozen=True)
class _Variable:
    name: str
    default: Optional[str]
    line: int


def _mark_variables(text: str) -> tuple[str, list[_Variable]]:
    """The text with each ``${VAR}`` replaced by a mark, and the variables in order."""
    variables: list[_Variable] = []
    lines = text.splitlines(keepends=True)
    for number, line in enumerate(lines, start=1):
        if "${" not in line:
            continue

        def mark(match: re.Match[str], number: int = number) -> str:
            variables.append(_Variable(match.group(1), match.group(2), number))
            return f"qlesspoolvar{len(variables) - 1}x"

        lines[number - 1] = _VARIABLE.sub(mark, line)
    return "".join(lines), variables


def _value_of(variable: _Variable, source: str, environ: Mapping[str, str]) -> str:
    """Shell semantics: the default is used when the variable is unset or empty."""
    value = environ.get(variable.name)
    if variable.default is not None and not value:
        return variable.default
    if value is None:
        raise ConfigError(
            source,
            f"line {variable.line}: ${{{variable.name}}} is not set in the environment "
            f"(write ${{{variable.name}:-default}} to give a default)",
        )
    if "\n" in value or "\r" in value:
        raise ConfigError(source, f"line {variable.line}: ${{{variable.name}}} holds a line break")
    return value


def expand_variables(text: str, source: str, environ: Mapping[str, str] | None = None) -> str:
    """Replace ``${VAR}`` and ``${VAR:-default}`` in ``text`` from the environment (shell
    semantics), as text. The config file itself is expanded scalar by scalar instead (see
    :func:`parse_groups`), so that a value can never add keys or change the file's structure."""
    environ = os.environ if environ is None else environ
    marked, variables = _mark_variables(text)
    return _MARK.sub(lambda m: _value_of(variables[int(m.group(1))], source, environ), marked)


class _Expander:
    """Fills in the variables of a composed YAML document, one scalar at a time.

    A variable can only ever become (part of) the one scalar it was written in: whatever its
    value, it cannot add a key, a list or a section. Where it is the whole of an unquoted
    scalar, its value is typed as YAML would type it written there (``${N}`` holding ``3`` is
    the number 3), and a value YAML would read as anything but one scalar (``{x: 1}``, ``- a``)
    is refused.
    """

    def __init__(
        self,
        loader: yaml.SafeLoader,
        variables: list[_Variable],
        source: str,
        environ: Mapping[str, str],
    ):
        self.loader = loader
        self.variables = variables
        self.source = source
        self.environ = environ

    def fill(self, node: yaml.Node, section: Optional[str] = None, key=None, depth: int = 0):
        """Fill in ``node`` and everything below it; ``section`` and ``key`` name the place in
        messages (depth 0 is the file's top level, depth 1 an environment section's)."""
        if isinstance(node, yaml.ScalarNode):
            self._scalar(node, section, key)
        elif isinstance(node, yaml.SequenceNode):
            for item in node.value:
                self.fill(item, section, key, depth + 1)
        elif isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                self.fill(key_node, section, key, depth + 1)
                name = key_node.value if isinstance(key_node, yaml.ScalarNode) else key
                if depth == 0 and isinstance(value_node, yaml.MappingNode):
                    self.fill(value_node, name, None, depth + 1)
                else:
                    self.fill(value_node, section, name if depth <= 1 else key, depth + 1)

    def _scalar(self, node: yaml.ScalarNode, section, key) -> None:
        marks = list(_MARK.finditer(node.value))
        if not marks:
            return
        values = [
            _value_of(self.variables[int(m.group(1))], self.source, self.environ) for m in marks
        ]
        whole = len(marks) == 1 and marks[0].group(0) == node.value
        if whole and node.style is None:  # unquoted: typed as if written there
            variable = self.variables[int(marks[0].group(1))]
            if not _is_one_scalar(values[0]):
                raise ConfigError(
                    self.source,
                    f"line {variable.line}: ${{{variable.name}}} must be one plain value, "
                    f"not {_shown(values[0])} (a variable cannot add keys, lists or sections)",
                    key=key,
                    section=section,
                )
        filled = iter(values)
        node.value = _MARK.sub(lambda m: next(filled), node.value)
        if node.style is None:
            node.tag = self.loader.resolve(yaml.ScalarNode, node.value, (True, False))


def _is_one_scalar(value: str) -> bool:
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        return False
    return not isinstance(parsed, (dict, list))


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
                None, None, f"key {_shown(key)} appears twice", mark
            )
        mapping[key] = loader.construct_object(value_node, deep=deep)
    return mapping


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def parse_groups(
    text: str,
    source: str,
    environment: str | None,
    environ: Mapping[str, str] | None = None,
    warn: Optional[Callable[[str], None]] = None,
) -> Groups:
    """Parse a config file's text into groups for ``environment``.

    ``${VAR}`` and ``${VAR:-default}`` are filled in from ``environ`` scalar by scalar once the
    file's structure is read (see ``_Expander``); comments are never expanded. ``warn``: see
    :func:`resolve_groups`.
    """
    environ = os.environ if environ is None else environ
    marked, variables = _mark_variables(text)
    loader = _StrictLoader(marked)
    try:
        node = loader.get_single_node()
        if node is not None:
            _Expander(loader, variables, source, environ).fill(node)
        raw = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        raise ConfigError(source, f"not valid YAML: {_describe_yaml_error(exc, text)}") from None
    finally:
        loader.dispose()
    return resolve_groups(raw, source, environment, warn)


def _describe_yaml_error(exc: yaml.YAMLError, text: str = "") -> str:
    problem = getattr(exc, "problem", None) or str(exc)
    mark = getattr(exc, "problem_mark", None)
    if mark is None:
        return problem
    described = f"{problem} (line {mark.line + 1}, column {mark.column + 1})"
    lines = text.splitlines()
    if mark.line < len(lines) and len(lines[mark.line]) > SIMPLE_KEY_LIMIT:
        # YAML limits a key written the usual way ("key": value) to 1024 characters.
        described += (
            f"; a queue list longer than {SIMPLE_KEY_LIMIT} characters must be written as an "
            'explicit key: `? "foo,bar,..."` on one line, then `: 4` on the next'
        )
    return described


def resolve_groups(
    raw: Any,
    source: str,
    environment: str | None,
    warn: Optional[Callable[[str], None]] = None,
) -> Groups:
    """Apply the root/section rules to an already parsed config (a mapping, or None if empty).

    An ``environment`` the file has no section for, while it has sections, is an error listing
    the sections it has (a mistyped ``-E`` would otherwise run the defaults); with ``warn``
    given (the environment came from $QLESS_ENV and the like, which are often set for other
    reasons), it is ``warn(message)`` instead, and the defaults are used.
    """
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ConfigError(
            source,
            f"the top level must be a mapping of queue lists to worker counts, not {_kind(raw)}",
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
            + ", ".join(_shown(str(name)) for name in sections)
            + ")"
        )
        if warn is None:
            raise ConfigError(source, message)
        warn(f"{source}: {message}; using the defaults")
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
                f"names the same queue list as key {_shown(spelled[queues])}",
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
            source,
            f"queue {_shown(repeated[0])} appears twice in the list",
            key=key,
            section=section,
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
    if count > MAX_WORKERS:
        raise ConfigError(
            source,
            f"the worker count must be at most {MAX_WORKERS} ({count})",
            key=key,
            section=section,
        )
    return count


def _kind(value: Any) -> str:
    if value is None:
        return "empty"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, str):
        return f"a string ({_shown(value)})"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, float):
        return f"a fraction ({_shown(value)})"
    return f"{type(value).__name__} ({_shown(value)})"


def _shown(value: Any) -> str:
    """``repr(value)``, cut to SHOWN_LIMIT characters: the message of a config that is (a symlink
    to) some other file, a secret perhaps, must not print that file."""
    text = repr(value)
    return text if len(text) <= SHOWN_LIMIT else text[: SHOWN_LIMIT - 3] + "..."


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
            try:
                with open(self.path, encoding="utf-8") as file:
                    text = file.read()
            except OSError as exc:
                raise ConfigError(self.name, f"cannot be read: {exc.strerror or exc}") from None
            except UnicodeDecodeError as exc:
                raise ConfigError(self.name, f"cannot be read: not UTF-8 text ({exc})") from None
            return parse_groups(text, self.name, self.environment, self.environ, warn)
        if self.loader is not None:
            try:
                raw = self.loader(self.environment)
            except Exception as exc:
                raise ConfigError(self.name, f"raised {exc.__class__.__name__}: {exc}") from exc
            return resolve_groups(raw, self.name, self.environment, warn)
        return resolve_groups(self.mapping, self.name, self.environment, warn)

    def __repr__(self) -> str:
        return f"ConfigSource({self.name!r}, environment={self.environment!r})"
