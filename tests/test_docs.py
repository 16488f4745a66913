"""Every snippet in README.md and docs/*.md is run: each fenced block follows a marker that says
how, and a document's blocks run in order in one project directory, on the test's Redis
($QLESS_URL), with the installed commands on $PATH:

    <!-- test: file path=myapp/jobs.py -->   the block is that file of the project
    <!-- test: python -->                    run with python; must exit 0 (status=N: N)
    <!-- test: sh -->                        run with bash -e; must exit 0 (status=N: N);
                                             background wait="TEXT": started, and running once
                                             TEXT is in its output (stopped at the end)
    <!-- test: config [env=E] -->            the block is qless-pool.yml; --dry-run takes it
    <!-- test: output -->                    the previous block's output, "..." matching any
                                             text in a line, a line "..." any lines
    <!-- test: yaml -->                      a file of another tool (a Kubernetes manifest):
                                             it parses
    <!-- test: illustration -->              a ```text block only: what a screen shows, or a
                                             command for machines the tests do not have
    <!-- test: ci -->                        each command is a line of .ci/run (CI runs it)
    <!-- test: slow by=tests/test_x.py -->   a long run, which that slow test makes smaller

A block without a marker fails the test: no snippet goes unrun.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from processes import wait_for
from workers import TESTS, python_path

ROOT = TESTS.parent
BIN = os.path.dirname(sys.executable)
DOCUMENTS = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
MARKER = re.compile(r"<!-- test: (\w[\w-]*)((?: [\w-]+(?:=(?:\"[^\"]*\"|\S+))?)*) -->")


@dataclass
class Block:
    document: str
    line: int
    language: str
    text: str
    mode: str
    options: dict[str, str] = field(default_factory=dict)

    def where(self) -> str:
        return f"{self.document}:{self.line}"


def blocks_of(document: str) -> list[Block]:
    lines = (ROOT / document).read_text().split("\n")
    found, index = [], 0
    while index < len(lines):
        fence = re.match(r"^(\s*)```(\S*)\s*$", lines[index])
        if not fence:
            index += 1
            continue
        indent, language = fence.groups()
        end = next(i for i in range(index + 1, len(lines)) if lines[i].strip() == "```")
        text = "\n".join(line[len(indent) :] for line in lines[index + 1 : end]) + "\n"
        marker = MARKER.search(lines[index - 1]) if index else None
        if marker is None:
            mode, options = "", {}
        else:
            mode = marker.group(1)
            options = dict([*word.split("=", 1), ""][:2] for word in shlex.split(marker.group(2)))
        found.append(Block(document, index + 1, language, text, mode, options))
        index = end + 1
    return found


MODES = {"file", "python", "sh", "config", "output", "yaml", "illustration", "ci", "slow"}
NOT_RUN_HERE = ("illustration", "ci", "slow")


def test_every_block_of_the_docs_has_a_marker():
    unmarked = [b.where() for d in DOCUMENTS for b in blocks_of(d) if b.mode not in MODES]
    assert not unmarked, f"blocks without a test marker (see tests/test_docs.py): {unmarked}"
    loose = [b.where() for d in DOCUMENTS for b in blocks_of(d)
             if b.mode == "illustration" and b.language != "text"]  # fmt: skip
    assert not loose, f"only a ```text block may be an illustration: {loose}"
    for block in (b for d in DOCUMENTS for b in blocks_of(d) if b.mode == "slow"):
        by = ROOT / block.options["by"]
        assert "pytest.mark.slow" in by.read_text(), f"{block.where()}: {by} is not a slow test"


def test_what_the_docs_say_ci_runs_it_does():
    ci = (ROOT / ".ci/run").read_text().splitlines()
    for document in DOCUMENTS:
        for block in blocks_of(document):
            if block.mode != "ci":
                continue
            for line in block.text.splitlines():
                command = line.split("  #", 1)[0].strip()
                if command and not command.startswith("#"):
                    assert command in ci, f"{block.where()}: .ci/run does not run {command!r}"


RUNNABLE = [d for d in DOCUMENTS if any(b.mode not in NOT_RUN_HERE for b in blocks_of(d))]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("document", RUNNABLE)
def test_the_snippets_of(document, make_project, redis_url):
    project = make_project({})
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("QLESS", "REDIS_URL"))},
        "QLESS_URL": redis_url,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": python_path(project),
    }
    background: list[subprocess.Popen] = []
    output = ""
    try:
        for block in blocks_of(document):
            output = run_block(block, project, env, output, background)
    finally:
        for process in background:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def run_block(block: Block, project: Path, env: dict, previous: str, background: list) -> str:
    """Run one block; returns its output (for an ``output`` block after it)."""
    if block.mode in NOT_RUN_HERE:
        return previous
    if block.mode == "yaml":
        import yaml

        assert list(yaml.safe_load_all(block.text)), block.where()
        return previous
    if block.mode == "file":
        path = project / block.options["path"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(block.text)
        return previous
    if block.mode == "output":
        assert_matches(block, previous)
        return previous
    if block.mode == "config":
        (project / "qless-pool.yml").write_text(block.text)
        argv = ["qless-pool", "--dry-run"]
        if block.options.get("env"):
            argv += ["-E", block.options["env"]]
        return finished(block, subprocess.run(argv, cwd=project, env=env, stdout=subprocess.PIPE,
                                              stderr=subprocess.STDOUT, text=True, timeout=60))  # fmt: skip
    if block.mode == "python":
        argv = [sys.executable, "-c", block.text]
    else:
        argv = ["bash", "-e", "-c", block.text]
    if "background" in block.options:
        log = project / f"background-{block.line}.log"
        with open(log, "w") as out:
            process = subprocess.Popen(argv, cwd=project, env=env, stdout=out,
                                       stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        background.append(process)
        wanted = block.options["wait"]
        wait_for(lambda: wanted in log.read_text(), 30, message=f"{block.where()}: {wanted!r}")
        return log.read_text()
    result = subprocess.run(argv, cwd=project, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, timeout=120)  # fmt: skip
    return finished(block, result)


def finished(block: Block, result: subprocess.CompletedProcess) -> str:
    wanted = int(block.options.get("status", 0))
    assert result.returncode == wanted, (
        f"{block.where()}: exit status {result.returncode}, not {wanted}\n--- output\n{result.stdout}"
    )
    return result.stdout  # stderr with it, in the order written


def assert_matches(block: Block, output: str) -> None:
    pattern = ""
    for line in block.text.rstrip("\n").split("\n"):
        if line.strip() == "...":
            pattern += r"(?:[^\n]*\n)*?"
        else:
            pattern += ".*".join(map(re.escape, line.rstrip().split("..."))) + r"[ \t]*\n"
    text = "\n".join(line.rstrip() for line in output.rstrip("\n").split("\n")) + "\n"
    assert re.fullmatch(pattern, text), (
        f"{block.where()}: the output differs from the document's\n--- output\n{text}"
        f"--- document\n{block.text}"
    )


def test_the_option_reference_is_made_from_the_declaration():
    from qless_pool import options

    reference = (ROOT / "docs/options.md").read_text()
    table = re.search(
        r"<!-- options: made by python -m qless_pool.options -->\n(.*?)\n<!-- /options -->",
        reference, re.S,
    )  # fmt: skip
    assert table, "docs/options.md lacks the option table's markers"
    assert table.group(1) == options.markdown_table(), (
        "docs/options.md's table differs from the declaration: python -m qless_pool.options"
    )
