"""The config loader: every rule of README.md's "The config file", table by table."""

from __future__ import annotations

import os

import pytest

from qless_pool.config import (
    ConfigError,
    ConfigNotFound,
    ConfigSource,
    environment_name,
    expand_variables,
    find_config_file,
    groups_to_json,
    parse_groups,
)

README_EXAMPLE = """\
foo: 1
bar: 2
"foo,bar,baz": 1

production:
  "foo,bar,baz": 4
"""


def parse(text, environment=None, environ=None):
    return parse_groups(text, "pool.yml", environment, environ or {})


# --- environment selection ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("explicit", "environ", "expected"),
    [
        (None, {}, None),
        ("staging", {"QLESS_ENV": "production"}, "staging"),
        (None, {"QLESS_ENV": "q", "RACK_ENV": "r", "RAILS_ENV": "s"}, "q"),
        (None, {"RACK_ENV": "r", "RAILS_ENV": "s"}, "r"),
        (None, {"RAILS_ENV": "s"}, "s"),
        (None, {"QLESS_ENV": "", "RAILS_ENV": "s"}, "s"),  # set but empty counts as unset
    ],
)
def test_environment_name(explicit, environ, expected):
    assert environment_name(explicit, environ) == expected


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, {("foo",): 1, ("bar",): 2, ("foo", "bar", "baz"): 1}),
        ({"QLESS_ENV": "production"}, {("foo",): 1, ("bar",): 2, ("foo", "bar", "baz"): 4}),
        ({"RACK_ENV": "production"}, {("foo",): 1, ("bar",): 2, ("foo", "bar", "baz"): 4}),
        ({"RAILS_ENV": "production"}, {("foo",): 1, ("bar",): 2, ("foo", "bar", "baz"): 4}),
        ({"RAILS_ENV": "development"}, {("foo",): 1, ("bar",): 2, ("foo", "bar", "baz"): 1}),
    ],
)
def test_environment_chosen_by_each_variable_and_by_none(tmp_path, environ, expected):
    (tmp_path / "qless-pool.yml").write_text(README_EXAMPLE)
    assert ConfigSource(environ=environ, cwd=str(tmp_path)).load() == expected


# --- root defaults and sections -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "environment", "expected"),
    [
        ("", None, {}),
        ("# only a comment\n", "production", {}),
        ("foo: 1\n", None, {("foo",): 1}),
        # the section wins over the root, and adds keys of its own
        (
            "foo: 1\nbar: 1\nprod:\n  foo: 3\n  baz: 2\n",
            "prod",
            {("foo",): 3, ("bar",): 1, ("baz",): 2},
        ),
        # other environments are excluded, root-only without an environment
        ("foo: 1\nprod:\n  foo: 3\nstaging:\n  qux: 9\n", "prod", {("foo",): 3}),
        ("foo: 1\nprod:\n  foo: 3\nstaging:\n  qux: 9\n", None, {("foo",): 1}),
        # an environment with no section gets the defaults
        ("foo: 1\nprod:\n  foo: 3\n", "test", {("foo",): 1}),
        # a file of sections only
        ("prod:\n  foo: 3\n", "prod", {("foo",): 3}),
        ("prod:\n  foo: 3\n", "dev", {}),
        # count 0 means no workers, and a section can switch a default off
        ("foo: 1\nprod:\n  foo: 0\n", "prod", {("foo",): 0}),
        # whitespace around names is ignored, so these are one queue list
        ('"foo, bar": 1\nprod:\n  " foo ,bar ": 5\n', "prod", {("foo", "bar"): 5}),
        # order is priority order, kept as written
        ('"baz,foo": 2\n', None, {("baz", "foo"): 2}),
        # an empty section is allowed
        ("foo: 1\nprod: {}\n", "prod", {("foo",): 1}),
    ],
)
def test_root_and_section_rules(text, environment, expected):
    assert parse(text, environment) == expected


def test_groups_to_json_keeps_the_file_order():
    groups = parse(README_EXAMPLE, "production")
    assert groups_to_json(groups) == '{"foo": 1, "bar": 2, "foo,bar,baz": 4}'


# --- ${VAR} expansion ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "environ", "expected"),
    [
        ("foo: ${N}\n", {"N": "3"}, {("foo",): 3}),
        ("foo: ${N:-2}\n", {}, {("foo",): 2}),
        ("foo: ${N:-2}\n", {"N": ""}, {("foo",): 2}),
        ("foo: ${N:-2}\n", {"N": "7"}, {("foo",): 7}),
        ('"${Q:-foo},bar": 1\n', {}, {("foo", "bar"): 1}),
        ('"${Q},bar": 1\n', {"Q": "urgent"}, {("urgent", "bar"): 1}),
        ("${ENV_NAME}:\n  foo: 4\n", {"ENV_NAME": "prod"}, {("foo",): 4}),
        # a commented-out line is not expanded, so its variable need not be set
        ("# foo: ${NOT_SET}\nfoo: 1\n", {}, {("foo",): 1}),
        # not the syntax: left as it is
        ('"$N": 1\n', {"N": "x"}, {("$N",): 1}),
    ],
)
def test_variable_expansion(text, environ, expected):
    assert parse(text, "prod", environ) == expected


def test_unset_variable_without_default_names_file_line_and_variable():
    with pytest.raises(ConfigError) as error:
        expand_variables("foo: 1\nbar: ${BAR_WORKERS}\n", "pool.yml", {})
    assert str(error.value) == (
        "pool.yml: line 2: ${BAR_WORKERS} is not set in the environment "
        "(write ${BAR_WORKERS:-default} to give a default)"
    )


def test_variable_holding_a_line_break_is_refused():
    with pytest.raises(ConfigError, match=r"line 1: \$\{N\} holds a line break"):
        parse("foo: ${N}\n", environ={"N": "1\nevil: 100"})


# --- errors name the file and the key -----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "environment", "message"),
    [
        ("foo: -1\n", None, "pool.yml: key 'foo': the worker count must not be negative (-1)"),
        ("foo: two\n", None, "pool.yml: key 'foo': the worker count must be a whole number, not a string ('two')"),
        ('foo: "2"\n', None, "pool.yml: key 'foo': the worker count must be a whole number, not a string ('2')"),
        ("foo: 1.5\n", None, "pool.yml: key 'foo': the worker count must be a whole number, not a fraction (1.5)"),
        ("foo: true\n", None, "pool.yml: key 'foo': the worker count must be a whole number, not a boolean (true)"),
        ("foo:\n", None, "pool.yml: key 'foo': the worker count must be a whole number, not empty"),
        ("foo: [1]\n", None, "pool.yml: key 'foo': the worker count must be a whole number, not a list"),
        ('"foo,,bar": 1\n', None, "pool.yml: key 'foo,,bar': empty queue name in the queue list"),
        ('"": 1\n', None, "pool.yml: key '': empty queue name in the queue list"),
        ('"foo, ": 1\n', None, "pool.yml: key 'foo, ': empty queue name in the queue list"),
        ('"foo,bar,foo": 1\n', None, "pool.yml: key 'foo,bar,foo': queue 'foo' appears twice in the list"),
        ("1: 2\n", None, "pool.yml: key '1': a queue list must be a string, not int (1) (put it in quotes)"),
        ("yes: 2\n", None, "pool.yml: key 'True': a queue list must be a string, not a boolean (true) (put it in quotes)"),
        ('"foo,bar": 1\n"foo, bar": 2\n', None, "pool.yml: key 'foo, bar': names the same queue list as key 'foo,bar'"),
        ("prod:\n  foo: -2\n", "prod", "pool.yml: section 'prod', key 'foo': the worker count must not be negative (-2)"),
        ("prod:\n  foo:\n    bar: 1\n", "prod", "pool.yml: section 'prod', key 'foo': the worker count must be a whole number, not dict ({'bar': 1})"),
        ("- foo\n- bar\n", None, "pool.yml: the top level must be a mapping of queue lists to worker counts, not a list"),
        ("just text\n", None, "pool.yml: the top level must be a mapping of queue lists to worker counts, not a string ('just text')"),
    ],
)  # fmt: skip
def test_bad_input_is_an_error_naming_the_file_and_the_key(text, environment, message):
    with pytest.raises(ConfigError) as error:
        parse(text, environment)
    assert str(error.value) == message


def test_unparsable_yaml_names_the_file_and_the_line():
    with pytest.raises(ConfigError) as error:
        parse("foo: 1\nbar: [2\n")
    assert str(error.value).startswith("pool.yml: not valid YAML: ")
    assert "line 3" in str(error.value)


def test_a_key_written_twice_is_an_error():
    with pytest.raises(
        ConfigError, match=r"pool.yml: not valid YAML: key 'foo' appears twice \(line 2\)"
    ):
        parse("foo: 1\nfoo: 2\n")


def test_a_bad_section_of_another_environment_is_ignored():
    assert parse("foo: 1\nstaging:\n  foo: -1\n", "production") == {("foo",): 1}


# --- where the file is found --------------------------------------------------------------------


@pytest.fixture
def project(tmp_path):
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "qless-pool.yml").write_text("config_dir: 1\n")
    (tmp_path / "qless-pool.yml").write_text("top: 1\n")
    (tmp_path / "env.yml").write_text("from_env: 1\n")
    (tmp_path / "explicit.yml").write_text("explicit: 1\n")
    return tmp_path


@pytest.mark.parametrize(
    ("explicit", "environ", "remove", "expected", "queue"),
    [
        ("explicit.yml", {"QLESS_POOL_CONFIG": "env.yml"}, [], "explicit.yml", "explicit"),
        (None, {"QLESS_POOL_CONFIG": "env.yml"}, [], "env.yml", "from_env"),
        (None, {}, [], "qless-pool.yml", "top"),
        (None, {}, ["qless-pool.yml"], "config/qless-pool.yml", "config_dir"),
    ],
)
def test_search_order(project, explicit, environ, remove, expected, queue):
    for name in remove:
        (project / name).unlink()
    assert find_config_file(explicit, environ, str(project)) == expected
    source = ConfigSource(explicit, environ=environ, cwd=str(project))
    assert source.name == expected
    assert source.load() == {(queue,): 1}


def test_file_given_by_environment_variable_is_loaded(project):
    source = ConfigSource(environ={"QLESS_POOL_CONFIG": "env.yml"}, cwd=str(project))
    assert source.load() == {("from_env",): 1}


def test_no_file_found_names_the_paths_tried(tmp_path):
    with pytest.raises(ConfigNotFound) as error:
        find_config_file(None, {}, str(tmp_path))
    assert "./qless-pool.yml, ./config/qless-pool.yml" in str(error.value)
    assert "--config" in str(error.value)


@pytest.mark.parametrize(
    ("explicit", "environ", "message"),
    [
        ("missing.yml", {}, "missing.yml: no such config file"),
        (
            None,
            {"QLESS_POOL_CONFIG": "gone.yml"},
            "gone.yml: no such config file (from $QLESS_POOL_CONFIG)",
        ),
    ],
)
def test_a_named_file_must_exist(tmp_path, explicit, environ, message):
    (tmp_path / "qless-pool.yml").write_text("foo: 1\n")  # never a silent fallback
    with pytest.raises(ConfigError) as error:
        find_config_file(explicit, environ, str(tmp_path))
    assert str(error.value) == message


def test_the_file_is_read_on_load_only(tmp_path):
    path = tmp_path / "pool.yml"
    path.write_text("foo: 1\n")
    source = ConfigSource(str(path), environ={})
    first = source.load()
    path.write_text("foo: 2\nbar: 1\n")
    assert first == {("foo",): 1}  # what was loaded does not change under the pool
    assert source.load() == {("foo",): 2, ("bar",): 1}  # a reload reads the file anew
    path.unlink()
    with pytest.raises(ConfigError, match="cannot be read"):
        source.load()


def test_relative_path_is_resolved_against_the_working_directory_once(tmp_path, monkeypatch):
    (tmp_path / "pool.yml").write_text("foo: 1\n")
    monkeypatch.chdir(tmp_path)
    source = ConfigSource("pool.yml", environ={})
    monkeypatch.chdir("/")
    assert source.load() == {("foo",): 1}
    assert source.path == os.path.join(str(tmp_path), "pool.yml")


# --- a dict or a callable instead of a file -----------------------------------------------------


def test_a_dict_follows_the_same_rules():
    config = {"foo": 1, "foo, bar": 2, "production": {"foo,bar": 4}}
    assert ConfigSource(config, "production").load() == {("foo",): 1, ("foo", "bar"): 4}
    assert ConfigSource(config, environ={}).load() == {("foo",): 1, ("foo", "bar"): 2}
    with pytest.raises(
        ConfigError, match=r"^<config dict>: key 'foo': the worker count must not be"
    ):
        ConfigSource({"foo": -1}, environ={}).load()


def test_a_callable_is_called_with_the_environment_on_every_load():
    calls = []

    def loader(environment):
        calls.append(environment)
        return {"foo": len(calls)}

    source = ConfigSource(loader, "staging")
    assert source.load() == {("foo",): 1}
    assert source.load() == {("foo",): 2}
    assert calls == ["staging", "staging"]


def test_a_callable_that_raises_or_returns_nonsense_is_a_config_error():
    def broken(environment):
        raise RuntimeError("database down")

    with pytest.raises(
        ConfigError, match=r"<config loader .*broken>: raised RuntimeError: database down"
    ):
        ConfigSource(broken, environ={}).load()
    with pytest.raises(ConfigError, match="the top level must be a mapping"):
        ConfigSource(lambda environment: ["foo"], environ={}).load()
    assert ConfigSource(lambda environment: None, environ={}).load() == {}
