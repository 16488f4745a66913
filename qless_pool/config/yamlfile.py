"""A config file's text -> a plain mapping: YAML, read safely and within bounds.

The package (config/__init__.py) applies the pool's rules to what this returns. Here the file is only *read*:

- Bounded before anything is built from it: at most MAX_DEPTH levels of nesting and at most
  MAX_NODES values, counting every value an alias repeats (an alias bomb, nine aliases of nine
  aliases of ..., is refused from its event stream, long before it could be expanded). The file
  size is bounded by the caller (config.MAX_CONFIG_BYTES).
- ``${VAR}`` and ``${VAR:-default}`` are filled in from the environment scalar by scalar, once the
  file's structure is read, so that a variable can never add a key, a list or a section.
- A mapping that repeats a key is refused (PyYAML would keep the last one).
- A number is a number only when written in plain decimal: YAML 1.1 also reads ``0x10``, ``1_0``,
  ``010`` (octal 8) and ``1:20`` (sexagesimal 80) as integers; here they stay strings, which the
  rules then refuse as counts.

libyaml's parser is used where PyYAML has it (the usual wheels do): it reads a megabyte in tens of
milliseconds where the pure-Python one takes seconds, which matters on HUP, when the manager
reads the file in its loop.
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import Any, Optional

import yaml

__all__ = [
    "MAX_DEPTH",
    "MAX_NODES",
    "NotDecimal",
    "YamlProblem",
    "expand_variables",
    "read_yaml",
    "shown",
]

#: The deepest nesting a config file may have (the rules need three: root, section, value).
MAX_DEPTH = 8
#: The most values a config file may hold, counting each value an alias repeats.
MAX_NODES = 10_000
#: The most characters of a value from the file a message shows.
SHOWN_LIMIT = 60
#: YAML's limit on the length of a key written the usual way (``"key": value``).
SIMPLE_KEY_LIMIT = 1024

_C_PARSER = getattr(yaml, "CSafeLoader", None)
_BASE_LOADER: type = _C_PARSER or yaml.SafeLoader


class YamlProblem(Exception):
    """The file cannot be read as a config; the package adds the file's name."""

    def __init__(self, problem: str, key: Any = None, section: Any = None):
        super().__init__(problem)
        self.problem = problem
        self.key = key
        self.section = section


def shown(value: Any) -> str:
    """``repr(value)``, cut to SHOWN_LIMIT characters: the message of a config that is (a symlink
    to) some other file, a secret perhaps, must not print that file."""
    text = repr(value)
    return text if len(text) <= SHOWN_LIMIT else text[: SHOWN_LIMIT - 3] + "..."


# --- ${VAR} ---------------------------------------------------------------------------------------

_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
#: Stands in the YAML text for the n-th ``${VAR}`` until the file's structure is read
#: (``qlesspoolvar3x``): letters and digits only, so it reads as part of whatever scalar the
#: variable was written in; lengthened until the file holds no such text of its own.
_MARK_PREFIX = "qlesspoolvar"


@dataclass(frozen=True)
class _Variable:
    name: str
    default: Optional[str]
    line: int


@dataclass
class _Marked:
    text: str  # with a mark for each variable
    variables: list[_Variable]
    mark: re.Pattern[str]  # a mark; its group 1 is the variable's index


def _mark_variables(text: str) -> _Marked:
    """The text with each ``${VAR}`` replaced by a mark, and the variables in order."""
    prefix = _MARK_PREFIX
    while prefix in text:
        prefix += "q"
    variables: list[_Variable] = []
    lines = text.splitlines(keepends=True)
    for number, line in enumerate(lines, start=1):
        if "${" not in line:
            continue

        def mark(match: re.Match[str], number: int = number) -> str:
            variables.append(_Variable(match.group(1), match.group(2), number))
            return f"{prefix}{len(variables) - 1}x"

        lines[number - 1] = _VARIABLE.sub(mark, line)
    return _Marked("".join(lines), variables, re.compile(prefix + r"([0-9]+)x"))


def _value_of(variable: _Variable, environ: Mapping[str, str]) -> str:
    """Shell semantics: the default is used when the variable is unset or empty."""
    value = environ.get(variable.name)
    if variable.default is not None and not value:
        return variable.default
    if value is None:
        raise YamlProblem(
            f"line {variable.line}: ${{{variable.name}}} is not set in the environment "
            f"(write ${{{variable.name}:-default}} to give a default)"
        )
    if "\n" in value or "\r" in value:
        raise YamlProblem(f"line {variable.line}: ${{{variable.name}}} holds a line break")
    return value


def expand_variables(text: str, environ: Mapping[str, str]) -> str:
    """Replace ``${VAR}`` and ``${VAR:-default}`` in ``text`` from the environment (shell
    semantics), as text. A config file is expanded scalar by scalar instead (read_yaml)."""
    marked = _mark_variables(text)
    return marked.mark.sub(lambda m: _value_of(marked.variables[int(m.group(1))], environ),
                           marked.text)  # fmt: skip


# --- bounds ---------------------------------------------------------------------------------------


def _check_bounds(text: str) -> None:
    """Refuse a file nested deeper than MAX_DEPTH or holding more than MAX_NODES values (aliases
    counted as what they repeat), reading only its event stream: nothing is built, so neither a
    deep file (a recursion in the composer) nor an alias bomb (an exponential walk) can be
    reached. A file YAML cannot parse is left to the loader, which says where."""
    depth = 0
    nodes = 0
    sizes: dict[str, int] = {}  # anchor -> the values it stands for
    open_collections: list[tuple[Optional[str], int]] = []  # (anchor, nodes before it)
    try:
        for event in yaml.parse(text, Loader=_BASE_LOADER):
            if isinstance(event, yaml.AliasEvent):
                nodes += sizes.get(event.anchor or "", 1)
            elif isinstance(event, yaml.ScalarEvent):
                nodes += 1
                if event.anchor:
                    sizes[event.anchor] = 1
            elif isinstance(event, yaml.CollectionStartEvent):
                open_collections.append((event.anchor, nodes))
                nodes += 1
                depth += 1
                if depth > MAX_DEPTH:
                    raise YamlProblem(
                        f"nested deeper than {MAX_DEPTH} levels (line {_line(event)}); a pool's "
                        "config needs three at most"
                    )
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
                anchor, before = open_collections.pop()
                if anchor:
                    sizes[anchor] = nodes - before
            if nodes > MAX_NODES:
                raise YamlProblem(
                    f"holds more than {MAX_NODES:,} values (counting each value an alias "
                    f"repeats; line {_line(event)}): not a pool's config"
                )
    except yaml.YAMLError as error:
        if "nesting depth" in str(getattr(error, "problem", "")):  # libyaml's own limit
            raise YamlProblem(
                f"nested deeper than {MAX_DEPTH} levels; a pool's config needs three at most"
            ) from None
        return  # the loader says what is wrong, and where


def _line(event: Any) -> int:
    mark = event.start_mark
    return int(mark.line) + 1 if mark is not None else 0


# --- reading --------------------------------------------------------------------------------------

#: A count written as YAML reads it in plain decimal; other spellings of integers stay strings.
_PLAIN_DECIMAL = re.compile(r"-?(0|[1-9][0-9]*)")
_INT_TAG = "tag:yaml.org,2002:int"
_NOT_DECIMAL_TAG = "tag:qless-pool,2026:not-decimal"


class NotDecimal(str):
    """An integer as YAML 1.1 reads it (``0x10``, ``1_0``, ``010``, ``1:20``), not in plain
    decimal: kept as the text written, for the rules to refuse."""


class _Filler:
    """Fills in the variables of a composed YAML document, one scalar at a time, and keeps
    integers that are not written in plain decimal as strings.

    A variable can only ever become (part of) the one scalar it was written in: whatever its
    value, it cannot add a key, a list or a section. Where it is the whole of an unquoted
    scalar, its value is typed as YAML would type it written there (``${N}`` holding ``3`` is
    the number 3), and a value YAML would read as anything but one scalar (``{x: 1}``, ``- a``)
    is refused.
    """

    def __init__(self, loader: Any, marked: _Marked, environ: Mapping[str, str]):
        self.loader = loader
        self.variables = marked.variables
        self.mark = marked.mark
        self.environ = environ
        self.seen: set[int] = set()  # nodes an alias repeats are filled in once

    def fill(self, node: yaml.Node, section: Any = None, key: Any = None, depth: int = 0) -> None:
        """Fill in ``node`` and everything below it; ``section`` and ``key`` name the place in
        messages (depth 0 is the file's top level, depth 1 an environment section's)."""
        if id(node) in self.seen:
            return
        self.seen.add(id(node))
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

    def _scalar(self, node: yaml.ScalarNode, section: Any, key: Any) -> None:
        marks = list(self.mark.finditer(node.value))
        if marks:
            values = [_value_of(self.variables[int(m.group(1))], self.environ) for m in marks]
            whole = len(marks) == 1 and marks[0].group(0) == node.value
            if whole and not node.style:  # unquoted: typed as if written there
                variable = self.variables[int(marks[0].group(1))]
                if not _is_one_scalar(values[0]):
                    raise YamlProblem(
                        f"line {variable.line}: ${{{variable.name}}} must be one plain value, "
                        f"not {shown(values[0])} (a variable cannot add keys, lists or sections)",
                        key=key,
                        section=section,
                    )
            filled = iter(values)
            node.value = self.mark.sub(lambda m: next(filled), node.value)
            if not node.style:
                node.tag = self.loader.resolve(yaml.ScalarNode, node.value, (True, False))
        if node.tag == _INT_TAG and not _PLAIN_DECIMAL.fullmatch(node.value):
            node.tag = _NOT_DECIMAL_TAG


def _is_one_scalar(value: str) -> bool:
    try:
        parsed = yaml.load(value, Loader=_BASE_LOADER)  # a safe loader
    except Exception:  # anything YAML cannot read as one value
        return False
    return not isinstance(parsed, (dict, list))


class _StrictLoader(_BASE_LOADER):  # type: ignore[misc]  # a class chosen at import
    """YAML's safe loader, refusing a mapping that repeats a key (PyYAML keeps the last one)."""


def _construct_mapping(loader: Any, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    # Keys merged in (``<<: *defaults``) may be given again: the mapping's own ones win.
    own = {id(key) for key, _ in node.value if key.tag != "tag:yaml.org,2002:merge"}
    loader.flatten_mapping(node)
    mapping: dict[Any, Any] = {}
    seen: set[Any] = set()
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if not isinstance(key, Hashable):
            raise yaml.constructor.ConstructorError(
                None, None, "a key is a list or a mapping", key_node.start_mark
            )
        if id(key_node) in own:
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {shown(key)} appears twice", key_node.start_mark
                )
            seen.add(key)
        mapping[key] = loader.construct_object(value_node, deep=deep)
    return mapping


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_StrictLoader.add_constructor(
    _NOT_DECIMAL_TAG, lambda loader, node: NotDecimal(loader.construct_scalar(node))
)


def read_yaml(text: str, environ: Mapping[str, str]) -> Any:
    """The document ``text`` holds (None if it is empty), within bounds and with its variables
    filled in. Raises YamlProblem."""
    marked = _mark_variables(text)
    _check_bounds(marked.text)
    loader = _StrictLoader(marked.text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _Filler(loader, marked, environ).fill(node)
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise YamlProblem(f"not valid YAML: {_describe_yaml_error(exc, text)}") from None
    except (ValueError, TypeError, KeyError, AttributeError, OverflowError) as error:
        # PyYAML's constructors raise these for a value they cannot build: 2001-02-30,
        # !!float abc, !!bool xyz, !!timestamp abc.
        raise YamlProblem(f"not valid YAML: a value cannot be read ({error!r})") from None
    finally:
        loader.dispose()


def _describe_yaml_error(exc: yaml.YAMLError, text: str = "") -> str:
    problem = getattr(exc, "problem", None) or str(exc)
    mark = getattr(exc, "problem_mark", None)
    if mark is None:
        return problem
    described = f"{problem} (line {mark.line + 1}, column {mark.column + 1})"
    lines = text.splitlines()
    long_line = mark.line < len(lines) and len(lines[mark.line]) > SIMPLE_KEY_LIMIT
    if long_line and "mapping values are not allowed" in problem:
        # YAML limits a key written the usual way ("key": value) to 1024 characters.
        described += (
            f"; a queue list longer than {SIMPLE_KEY_LIMIT} characters must be written as an "
            'explicit key: `? "foo,bar,..."` on one line, then `: 4` on the next'
        )
    return described
