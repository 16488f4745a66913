"""The config loader: every rule of docs/configuration.md, table by table."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest
from processes import as_unprivileged

from qless_pool.config import (
    MAX_CONFIG_BYTES,
    MAX_POOL_WORKERS,
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
        # a file without sections: any environment gets the defaults
        ("foo: 1\n", "test", {("foo",): 1}),
        # a file of sections only
        ("prod:\n  foo: 3\n", "prod", {("foo",): 3}),
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


@pytest.mark.parametrize(
    ("text", "value", "where"),
    [
        # A mapping for a count: it dropped queue bar, or overrode another key, before.
        ("foo: 1\nbar: ${V}\n", "{x: 1}", "key 'bar'"),
        ("foo: 1\nbar: ${V}\n", "{foo: 50}", "key 'bar'"),
        ("foo: 1\nbar: ${V}\n", "[1, 2]", "key 'bar'"),
        ("foo: 1\nbar: ${V}\n", "- 1", "key 'bar'"),
        ("foo: 1\nbar: ${V}\n", "a: b", "key 'bar'"),
        ("prod:\n  bar: ${V}\n", "{x: 1}", "section 'prod', key 'bar'"),
    ],
)
def test_a_variable_must_be_one_plain_value(text, value, where):
    with pytest.raises(ConfigError) as error:
        parse(text, "prod", {"V": value})
    assert str(error.value).startswith(f"pool.yml: {where}: line ")
    assert f"${{V}} must be one plain value, not {value!r}" in str(error.value)


@pytest.mark.parametrize(
    ("text", "value", "expected"),
    [
        # Inside quotes a value is text, whatever it holds: it cannot end the quotes.
        ('"foo,${V}": 1\n', 'bar": 100, "baz', {("foo", 'bar": 100', '"baz'): 1}),
        ("'${V}': 2\n", "x': 9, 'y", {("x': 9", "'y"): 2}),
        ("${V}: 3\n", "foo", {("foo",): 3}),
        # A count from a variable is typed as YAML types it.
        ("foo: ${V}\n", "4", {("foo",): 4}),
    ],
)
def test_a_variable_fills_in_one_scalar_and_nothing_else(text, value, expected):
    assert parse(text, None, {"V": value}) == expected


def test_a_variable_in_a_count_that_is_not_a_number_is_named():
    with pytest.raises(ConfigError) as error:
        parse('foo: "${V}"\n', None, {"V": "3"})
    assert str(error.value) == (
        "pool.yml: key 'foo': the worker count must be a whole number, not a string ('3')"
    )


def test_a_count_above_the_limit_is_refused():
    assert parse(f"foo: {MAX_POOL_WORKERS}\n") == {("foo",): MAX_POOL_WORKERS}
    with pytest.raises(ConfigError) as error:
        parse("foo: 99999999999999999999999\n")
    assert str(error.value) == (
        "pool.yml: key 'foo': the worker count must be at most 1000 (99999999999999999999999)"
    )


def test_a_queue_list_longer_than_yamls_key_limit_gets_a_way_to_write_it():
    queues = ",".join(f"queue{i}" for i in range(200))
    with pytest.raises(ConfigError) as error:
        parse(f'"{queues}": 4\n')
    message = str(error.value)
    assert message.startswith("pool.yml: not valid YAML: ")
    assert 'must be written as an explicit key: `? "foo,bar,..."`' in message
    # Written that way, it works.
    assert parse(f'? "{queues}"\n: 4\n') == {tuple(queues.split(",")): 4}


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


LONG = "s3cret-" + "x" * 200


@pytest.mark.parametrize(
    ("text", "environment", "message"),
    [
        (f"foo: {LONG}\n", None, "pool.yml: key 'foo': the worker count must be a whole number, not a string ('s3cret-" + "x" * 49 + "...)"),
        (f'"{LONG}": many\n', None, "pool.yml: key 's3cret-" + "x" * 49 + "...: the worker count must be a whole number, not a string ('many')"),
        (f'"{LONG}": 1\n"{LONG}": 2\n', None, "pool.yml: not valid YAML: key 's3cret-" + "x" * 49 + "... appears twice (line 2, column 1)"),
        (f"{LONG}:\n  foo: 1\n", "production", "pool.yml: no section 'production' (the file has sections 's3cret-" + "x" * 49 + "...)"),
        (f"{LONG}\n", None, "pool.yml: the top level must be a mapping of queue lists to worker counts, not a string ('s3cret-" + "x" * 49 + "...)"),
    ],
)  # fmt: skip
def test_a_long_value_from_the_file_is_cut_short_in_messages(text, environment, message):
    with pytest.raises(ConfigError) as error:
        parse(text, environment)
    assert str(error.value) == message


def test_a_config_that_is_a_symlink_to_a_secret_does_not_print_the_secret(tmp_path):
    # Root starts the pool with a config file its user could replace by a symlink.
    secret = tmp_path / "shadow"
    secret.write_text(
        "root:$6$saltsalt$" + "h" * 86 + ":19000:0:99999:7:::\ndaemon:*:19000:0:99999:7:::\n"
    )
    (tmp_path / "pool.yml").symlink_to(secret)
    with pytest.raises(ConfigError) as error:
        ConfigSource(str(tmp_path / "pool.yml")).load()
    message = str(error.value)
    # Its first line reads as a key (it ends in ':'), shown cut short.
    assert message.endswith(
        "pool.yml: key 'root:$6$saltsalt$" + "h" * 39 + "...: "
        "the worker count must be a whole number, not empty"
    )
    assert "h" * 40 not in message and "daemon" not in message


def test_unparsable_yaml_names_the_file_and_the_line():
    with pytest.raises(ConfigError) as error:
        parse("foo: 1\nbar: [2\n")
    assert str(error.value).startswith("pool.yml: not valid YAML: ")
    assert "line 3" in str(error.value)


def test_a_key_written_twice_is_an_error():
    with pytest.raises(ConfigError) as error:
        parse("foo: 1\nfoo: 2\n")
    # The place is said once.
    assert str(error.value) == (
        "pool.yml: not valid YAML: key 'foo' appears twice (line 2, column 1)"
    )


def test_a_bad_section_of_another_environment_is_ignored():
    text = "foo: 1\nstaging:\n  foo: -1\nproduction:\n  bar: 2\n"
    assert parse(text, "production") == {("foo",): 1, ("bar",): 2}


def test_an_environment_named_by_e_needs_its_section():
    with pytest.raises(ConfigError) as error:
        parse("foo: 1\nproduction:\n  foo: 3\nstaging:\n  foo: 2\n", "prodution")
    assert str(error.value) == (
        "pool.yml: no section 'prodution' (the file has sections 'production', 'staging')"
    )


def test_an_environment_from_a_variable_without_a_section_warns_and_uses_the_defaults(tmp_path):
    (tmp_path / "qless-pool.yml").write_text("foo: 1\nproduction:\n  foo: 3\n")
    source = ConfigSource(environ={"RAILS_ENV": "development"}, cwd=str(tmp_path))
    assert source.load() == {("foo",): 1}
    assert source.warnings == [
        "qless-pool.yml: no section 'development' (the file has sections 'production'); "
        "using the defaults"
    ]
    with pytest.raises(ConfigError, match="no section 'development'"):
        ConfigSource("qless-pool.yml", "development", environ={}, cwd=str(tmp_path)).load()


# --- where the file is found --------------------------------------------------------------------


@pytest.fixture
def project(make_project):
    return make_project(
        {
            "config/qless-pool.yml": "config_dir: 1\n",
            "qless-pool.yml": "top: 1\n",
            "env.yml": "from_env: 1\n",
            "explicit.yml": "explicit: 1\n",
        }
    )


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


def test_a_directory_given_as_the_config_is_named_as_one(tmp_path):
    (tmp_path / "config").mkdir()
    with pytest.raises(ConfigError) as error:
        find_config_file("config", {}, str(tmp_path))
    assert str(error.value) == "config: is a directory, not a config file"
    with pytest.raises(ConfigError) as error:
        find_config_file(None, {"QLESS_POOL_CONFIG": "config"}, str(tmp_path))
    assert str(error.value) == (
        "config: is a directory, not a config file (from $QLESS_POOL_CONFIG)"
    )


def test_a_config_in_a_directory_that_cannot_be_searched_says_so(tmp_path):
    shared = tempfile.mkdtemp()  # not under tmp_path, which only its owner may enter
    try:
        os.chmod(shared, 0o755)
        os.mkdir(os.path.join(shared, "locked"), 0o700)
        with open(os.path.join(shared, "locked", "pool.yml"), "w") as file:
            file.write("foo: 1\n")

        def find() -> str:
            try:
                find_config_file("locked/pool.yml", {}, shared)
            except ConfigError as error:
                return str(error)
            return "found"

        assert as_unprivileged(find) == (
            "locked/pool.yml: cannot be read: a directory on its path cannot be searched"
        )
    finally:
        shutil.rmtree(shared)


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


# --- hostile files: bounded reading ---------------------------------------------------------------


def test_a_deeply_nested_file_is_refused_without_recursing():
    with pytest.raises(ConfigError) as error:
        parse("a: " + "[" * 1000 + "]" * 1000 + "\n")
    assert str(error.value) == (
        "pool.yml: nested deeper than 8 levels; a pool's config needs three at most"
    )


def test_an_alias_bomb_is_refused_before_it_is_expanded():
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    for level in range(1, 10):
        previous = f"*a{level - 1}"
        lines.append(f"a{level}: &a{level} [{', '.join([previous] * 9)}]")
    with pytest.raises(ConfigError) as error:
        parse("\n".join(lines) + "\n")
    assert str(error.value).startswith(
        "pool.yml: holds more than 10,000 values (counting each value an alias repeats; line "
    )


def test_anchors_aliases_and_merge_keys_are_read_as_usual():
    text = (
        "defaults: &defaults\n  foo: 1\n  bar: 2\n"
        "production:\n  <<: *defaults\n  bar: 4\n"
        "staging: *defaults\n"
    )
    assert parse(text, "production") == {("foo",): 1, ("bar",): 4}
    assert parse(text, "staging") == {("foo",): 1, ("bar",): 2}


def test_a_file_over_the_size_limit_is_refused_unread(tmp_path):
    path = tmp_path / "pool.yml"
    path.write_text("foo: 1\n" + "#" * MAX_CONFIG_BYTES + "\n")
    with pytest.raises(ConfigError) as error:
        ConfigSource(str(path)).load()
    assert str(error.value).endswith(
        f"pool.yml: is {MAX_CONFIG_BYTES + 8:,} bytes; a config file may be at most "
        f"{MAX_CONFIG_BYTES:,} bytes"
    )


def test_a_fifo_in_place_of_the_config_is_refused_without_blocking(tmp_path):
    path = tmp_path / "pool.yml"
    os.mkfifo(path)
    with pytest.raises(ConfigError) as error:
        ConfigSource(str(path)).load()
    assert str(error.value).endswith("pool.yml: cannot be read: not a regular file")


def test_the_pool_in_all_is_capped_and_the_cap_can_be_raised(tmp_path):
    text = "".join(f"q{i}: 1000\n" for i in range(100))
    with pytest.raises(ConfigError) as error:
        parse(text)
    assert str(error.value) == (
        "pool.yml: asks for 100000 workers in all; a pool runs at most 1000 "
        "(--max-workers raises the limit)"
    )
    (tmp_path / "pool.yml").write_text(text)
    groups = ConfigSource(str(tmp_path / "pool.yml"), max_workers=100_000).load()
    assert sum(groups.values()) == 100_000


@pytest.mark.parametrize("count", ["0x10", "1_0", "010", "1:20", "+5", "0b11"])
def test_a_count_must_be_written_in_plain_decimal(count):
    with pytest.raises(ConfigError) as error:
        parse(f"foo: {count}\n")
    assert str(error.value) == (
        f"pool.yml: key 'foo': the worker count must be a whole number in plain decimal, "
        f"not {count!r}"
    )


def test_a_count_that_yaml_reads_as_text_is_a_string():
    with pytest.raises(ConfigError) as error:
        parse("foo: 0o7\n")
    assert str(error.value).endswith("not a string ('0o7')")


@pytest.mark.parametrize(
    ("key", "character"),
    [("foo\\nbar", "\n"), ("foo\\0", "\0"), ("foo\\x1b[31m", "\x1b"), ("foo\\x85", "\x85")],
)
def test_a_queue_name_with_a_control_character_is_refused(key, character):
    with pytest.raises(ConfigError) as error:
        parse(f'"{key}": 1\n')
    assert str(error.value).endswith(
        f"the queue name holds the control character {character!r}".replace("the queue", "a queue")
    )


@pytest.mark.parametrize("text", ["[a]: 1\n", "{a: 1}: 2\n", "? [a]\n: 1\n"])
def test_a_key_that_is_a_list_or_a_mapping_is_a_config_error(text):
    with pytest.raises(ConfigError) as error:
        parse(text)
    assert "not valid YAML: a key is a list or a mapping (line 1, column" in str(error.value)


def test_a_self_referencing_alias_is_a_config_error():
    with pytest.raises(ConfigError) as error:
        parse("prod: &p\n  foo: *p\n", "prod")
    assert str(error.value) == (
        "pool.yml: not valid YAML: found unconstructable recursive node (line 1, column 7)"
    )


def test_a_queue_list_of_more_than_a_thousand_queues_is_refused_at_once():
    queues = ",".join(f"q{i}" for i in range(150_000))
    with pytest.raises(ConfigError) as error:
        parse(f'? "{queues}"\n: 1\n')
    assert str(error.value).endswith(
        "names 150,000 queues; a worker takes at most 1,000 (it tries each in turn every time it "
        "looks for a job)"
    )
    assert parse(f'? "{",".join(f"q{i}" for i in range(1000))}"\n: 1\n')


def test_text_like_a_variable_mark_is_kept_as_written():
    assert parse("foo: 1\nqlesspoolvar0x: 2\n") == {("foo",): 1, ("qlesspoolvar0x",): 2}
    assert parse("foo: ${N}\nqlesspoolvar0x: 2\n", environ={"N": "3"}) == {
        ("foo",): 3,
        ("qlesspoolvar0x",): 2,
    }


@pytest.mark.parametrize("value", ["2001-02-30", "!!float abc", "!!bool xyz", "!!timestamp abc"])
def test_a_value_yaml_cannot_build_is_a_config_error(value):
    with pytest.raises(ConfigError) as error:
        parse(f"foo: {value}\n")
    assert str(error.value).startswith("pool.yml: not valid YAML: a value cannot be read (")
