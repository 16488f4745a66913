"""The command line as users run it: the installed script and ``python -m qless_pool``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import qless_pool

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = os.path.join(os.path.dirname(sys.executable), "qless-pool")


def run(*args, cwd=ROOT, env=None, module=False):
    command = [sys.executable, "-m", "qless_pool", *args] if module else [SCRIPT, *args]
    environ = {
        k: v
        for k, v in os.environ.items()
        if k not in ("QLESS_ENV", "RACK_ENV", "RAILS_ENV", "QLESS_POOL_CONFIG")
    }
    environ.update(env or {})
    return subprocess.run(command, cwd=cwd, env=environ, capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("module", [False, True], ids=["script", "python-m"])
@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (["-c", "config/qless-pool.yml"], {}, {"foo": 1, "bar": 2, "foo,bar,baz": 1}),
        (
            ["-c", "config/qless-pool.yml", "-E", "production"],
            {},
            {"foo": 1, "bar": 2, "foo,bar,baz": 4},
        ),
        (
            [],
            {"RAILS_ENV": "production"},
            {"foo": 1, "bar": 2, "foo,bar,baz": 4},
        ),  # found in ./config
        (
            ["--environment", "production"],
            {"QLESS_ENV": "staging"},
            {"foo": 1, "bar": 2, "foo,bar,baz": 4},
        ),
    ],
)
def test_dry_run_prints_the_resolved_groups(args, env, expected, module):
    result = run(*args, "--dry-run", env=env, module=module)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == expected
    assert list(json.loads(result.stdout)) == list(expected)  # in the file's order
    assert result.stdout.count("\n") == 1


def test_config_error_exits_78_with_one_line_naming_file_and_key(tmp_path):
    (tmp_path / "pool.yml").write_text("foo: 1\nbar: -3\n")
    result = run("-c", "pool.yml", "--dry-run", cwd=tmp_path)
    assert result.returncode == 78
    assert result.stdout == ""
    assert result.stderr == (
        "qless-pool: config error: pool.yml: key 'bar': the worker count must not be negative (-3)\n"
    )


def test_no_config_found_exits_78_naming_the_paths_tried(tmp_path):
    result = run("--dry-run", cwd=tmp_path)
    assert result.returncode == 78
    assert result.stderr == (
        "qless-pool: config error: no config file found (tried ./qless-pool.yml, "
        "./config/qless-pool.yml); name one with --config or $QLESS_POOL_CONFIG\n"
    )


def test_version_and_help():
    version = run("--version")
    assert version.returncode == 0
    assert version.stdout.startswith(f"qless-pool {qless_pool.__version__} (qless-py 0.11.4")
    assert qless_pool.__version__ not in ("", "0+unknown")
    assert run("-v").stdout == version.stdout
    helped = run("--help")
    assert helped.returncode == 0
    for option in ("--config", "--environment", "--dry-run", "--version"):
        assert option in helped.stdout
