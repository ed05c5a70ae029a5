"""The fenced blocks of a Markdown page, read as the executed-docs test runs them (pure: no I/O).

The convention, written in the Markdown itself (tests/README.md, "Executed docs"):

- A block whose language is a shell (```` ```sh ````, ``bash``, ``shell``, ``console``) is a
  *command block*. The executed-docs test (tests/e2e/test_docs_executed.py) runs every command block
  of a page, in order, in one bash session (so variables and background jobs carry over, as in the
  reader's shell), with ``set -e -o pipefail``: a command that fails fails the test.
- ```` ```sh fails ```` — run, and the block's last command must fail (a denial the page demonstrates).
- ```` ```sh not-run: REASON ```` — deliberately not run; the reason is required and says why
  (e.g. another test covers it, or it changes the host).
- An ```` ```output ```` block shows what the command block before it prints (only prose may stand
  between them). Each of its lines must appear in that output, in this order (other lines may come
  between); ``…`` in a line stands for any text, and runs of blanks compare equal.
- Every other fence names its language (``text``, ``yaml``, ``json``, ``python``, ...): an unlabelled
  fence is refused, so a command cannot hide from the test in a block without a language.

``parse`` checks all of this and raises ``DocError`` naming the file, the line and the fix.
This module must not import the product (agent.*) or pytest.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# The pages whose command blocks tests/e2e/test_docs_executed.py runs (tests/unit/test_docblocks.py checks
# their convention without root).
EXECUTED_DOCS = ("README.md", "docs/lab.md", "docs/tutorial-postgres-redis.md")
COMMAND_LANGUAGES = frozenset({"sh", "bash", "shell", "console"})
OUTPUT_LANGUAGE = "output"
OTHER_LANGUAGES = frozenset({"text", "yaml", "json", "python", "ini", "promql", "toml", "c", "diff"})
ELLIPSIS = "…"
_FENCE = re.compile(r"^( {0,3})(`{3,}|~{3,})(.*)$")


class DocError(ValueError):
    """A page breaks the executed-docs convention (the message names file:line and the fix)."""


@dataclass
class Block:
    path: str
    line: int              # 1-based line of the opening fence
    language: str
    attributes: str        # the info string after the language
    text: str
    expected: "Block | None" = field(default=None, repr=False)  # the output block that follows

    @property
    def is_command(self) -> bool:
        return self.language in COMMAND_LANGUAGES

    @property
    def not_run_reason(self) -> str | None:
        match = re.match(r"not-run:\s*(.*)$", self.attributes)
        return match.group(1).strip() if match else None

    @property
    def must_fail(self) -> bool:
        return self.attributes == "fails"

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


def fenced_blocks(path: str, markdown: str) -> list[Block]:
    """Every fenced block of ``markdown`` with its language, attributes and text."""
    blocks, lines, i = [], markdown.splitlines(), 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, fence, info = opening.groups()
        language, _, attributes = info.strip().partition(" ")
        body, j = [], i + 1
        while j < len(lines) and not re.match(rf"^ {{0,3}}{re.escape(fence[0])}{{{len(fence)},}}\s*$", lines[j]):
            body.append(lines[j][len(indent):] if lines[j].startswith(indent) else lines[j])
            j += 1
        if j == len(lines):
            raise DocError(f"{path}:{i + 1}: the fence opened here is never closed")
        blocks.append(Block(path, i + 1, language, attributes.strip(), "\n".join(body) + "\n"))
        i = j + 1
    return blocks


def parse(path: str, markdown: str) -> list[Block]:
    """The page's blocks, each output block attached to its command block; DocError on any breach."""
    blocks = fenced_blocks(path, markdown)
    previous: Block | None = None
    for block in blocks:
        if not block.language:
            raise DocError(f"{block.where}: a fence without a language; write ```sh for a command the docs test "
                           f"runs, ```sh not-run: REASON for one it must not, or ```text for anything else")
        if block.language == OUTPUT_LANGUAGE:
            if previous is not None and previous.language == OUTPUT_LANGUAGE:
                raise DocError(f"{block.where}: a second ```output block in a row ({previous.where}): merge them")
            if previous is None or not previous.is_command:
                raise DocError(f"{block.where}: an ```output block must follow the command block whose output it shows")
            if previous.not_run_reason is not None:
                raise DocError(f"{block.where}: an ```output block after a not-run block ({previous.where}) "
                               f"is never checked: run that block, or show the output as ```text")
            previous.expected = block
        elif block.is_command:
            if block.attributes.startswith("not-run") and not block.not_run_reason:
                raise DocError(f"{block.where}: `not-run` needs a reason: ```sh not-run: WHY")
            if block.attributes and block.not_run_reason is None and not block.must_fail:
                raise DocError(f"{block.where}: unknown attributes {block.attributes!r} on a command block; "
                               f"use none, `fails` or `not-run: REASON`")
        elif block.language not in OTHER_LANGUAGES:
            raise DocError(f"{block.where}: language {block.language!r} is neither a shell (run by the docs test) "
                           f"nor one of {', '.join(sorted(OTHER_LANGUAGES))}; add it to OTHER_LANGUAGES in "
                           f"tests/docblocks.py only if it can never hold a command")
        previous = block
    return blocks


def command_blocks(blocks: list[Block]) -> list[Block]:
    return [b for b in blocks if b.is_command]


def _normalise(line: str) -> str:
    return " ".join(line.split())


def _line_pattern(expected: str) -> re.Pattern:
    parts = [re.escape(part) for part in _normalise(expected).split(ELLIPSIS)]
    return re.compile("^" + ".*".join(parts) + "$")


def missing_output(expected: str, actual: str) -> list[str]:
    """The expected lines not found in ``actual`` in order (empty: the output matches).

    Each non-blank expected line must match a later line of ``actual`` than the previous one did;
    ``…`` matches any text; blanks are compared as single spaces; carriage returns (progress
    redraws) split lines.
    """
    actual_lines = [_normalise(line) for line in re.split(r"[\r\n]+", actual)]
    missing, position = [], 0
    for wanted in (line for line in expected.splitlines() if line.strip()):
        pattern = _line_pattern(wanted)
        for index in range(position, len(actual_lines)):
            if pattern.match(actual_lines[index]):
                position = index + 1
                break
        else:
            missing.append(wanted)
    return missing
