"""Every `tcpmesh …` command the docs show — in a command block or in inline code, on every page,
also those no test can run here (install-*.md, identity.md: real nodes, scp, systemd) — names
subcommands and options the CLI has. Pages whose blocks run (tests/docblocks.py EXECUTED_DOCS) are
checked for real by tests/e2e/test_docs_executed.py; this catches the rest of the drift: a renamed
option, a removed subcommand, `[--json]` written where a shell sees an argument."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest

from agent.cli import main
from tests.docblocks import fenced_blocks

REPO = Path(__file__).resolve().parents[2]
PAGES = sorted([REPO / "README.md", *(REPO / "docs").glob("*.md")])
SHELLS = ("sh", "bash", "shell", "console")
INLINE = re.compile(r"`(tcpmesh [^`\n]+)`")
SEPARATORS = re.compile(r"\s(?:\|\||&&|;|\||&)\s?")
# Words in prose placeholders that are not shell: an inline span holding one is a sketch, not a command.
SKETCH = re.compile(r"…|\.\.\.|\||[<>{}\[\]]")


def commands_in(page: Path) -> list[tuple[str, str]]:
    """(where, command text) for every `tcpmesh …` invocation the page shows."""
    found = []
    text = page.read_text()
    for block in fenced_blocks(page.name, text):
        if block.language not in SHELLS:
            continue
        joined = block.text.replace("\\\n", " ")
        for offset, line in enumerate(joined.splitlines()):
            for segment in SEPARATORS.split(line.split(" #", 1)[0]):
                words = segment.split()
                while words and (words[0] in ("time", "sudo", "until", "!", "do", "then") or "=" in words[0]):
                    words = words[1:]
                if words and words[0] == "tcpmesh":
                    found.append((f"{page.relative_to(REPO)}:{block.line + 1 + offset}", " ".join(words)))
    for number, line in enumerate(text.splitlines(), 1):
        for match in INLINE.finditer(line):
            span = match.group(1)
            if not SKETCH.search(span.removeprefix("tcpmesh ")):
                found.append((f"{page.relative_to(REPO)}:{number}", span))
    return found


def problems_of(command: str) -> list[str]:
    try:
        words = shlex.split(command, comments=True)
    except ValueError as exc:
        return [f"not a shell command ({exc})"]
    words = words[:words.index("--")] if "--" in words else words
    cmd: click.Command = main
    path = ["tcpmesh"]
    rest = words[1:]
    while isinstance(cmd, click.Group) and rest and not rest[0].startswith("-"):
        if "/" in rest[0]:  # prose listing alternatives: `tcpmesh workload add/del/list`
            return [f"`{' '.join(path)}` has no subcommand {name!r}" for name in rest[0].split("/")
                    if cmd.get_command(click.Context(cmd), name) is None]
        sub = cmd.get_command(click.Context(cmd), rest[0])
        if sub is None:
            return [f"`{' '.join(path)}` has no subcommand {rest[0]!r}"]
        cmd, path, rest = sub, path + [rest[0]], rest[1:]
    known = {"-h", "--help"} | {name for param in cmd.params for name in (*param.opts, *param.secondary_opts)}
    problems = []
    for word in rest:
        if word.startswith("[") or word.endswith("]"):
            problems.append(f"{word!r} is not shell: a reader's shell passes it as an argument")
        elif word.startswith("-") and word != "-" and not word[1:2].isdigit() and word.split("=", 1)[0] not in known:
            problems.append(f"`{' '.join(path)}` has no option {word.split('=', 1)[0]}")
    return problems


def test_the_scan_finds_the_commands_of_blocks_and_inline_code():
    found = {command for page in PAGES for _, command in commands_in(page)}
    assert any(c.startswith("tcpmesh lab up --nodes 2") for c in found)
    assert any(c.startswith("tcpmesh ca issue-node node1") for c in found)     # install-systemd.md's block
    assert any(c.startswith("tcpmesh flows --node node1") for c in found)
    assert len(found) > 40


@pytest.mark.parametrize("command, problem", [
    ("tcpmesh lab status [--json]", "'[--json]' is not shell"),
    ("tcpmesh lab stauts", "`tcpmesh lab` has no subcommand 'stauts'"),
    ("tcpmesh flows --nod node1", "`tcpmesh flows` has no option --nod"),
    ("tcpmesh lab exec n1p1 -- psql --whatever", None),
    ("tcpmesh flows --port=5432 -f", None),
    ("tcpmesh workload add/del/list", None),
    ("tcpmesh policy check/explian", "`tcpmesh policy` has no subcommand 'explian'"),
])
def test_the_check_names_what_is_wrong(command, problem):
    problems = problems_of(command)
    assert any(p.startswith(problem) for p in problems) if problem else problems == []


def test_every_tcpmesh_command_the_docs_show_exists_with_its_options():
    wrong = [f"{where}: {command}: {problem}" for page in PAGES for where, command in commands_in(page)
             for problem in problems_of(command)]
    assert not wrong, "the docs show commands the CLI does not have:\n" + "\n".join(wrong)
