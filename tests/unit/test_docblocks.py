"""The executed-docs convention (tests/docblocks.py), without root: every page the docs test runs
follows it (a command block is run or marked `not-run: REASON`, no unlabelled fence, every
```output block belongs to a block that runs), the parser refuses each breach with file:line, the
output matcher means what tests/README.md says, and the sample files in docs/lab.md are what the
lab writes. tests/e2e/test_docs_executed.py runs the blocks themselves."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from agent.lab.files import agent_config
from agent.lab.topology import plan_lab
from tests.docblocks import EXECUTED_DOCS, DocError, command_blocks, missing_output, parse

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("doc", EXECUTED_DOCS)
def test_every_executed_page_follows_the_convention_and_runs_most_of_its_blocks(doc):
    blocks = command_blocks(parse(doc, (REPO / doc).read_text()))
    run = [b for b in blocks if b.not_run_reason is None]
    assert run, f"{doc}: no command block would run"
    assert len(run) >= len(blocks) - 1, f"{doc}: more than one block is marked not-run: " \
                                        f"{[b.where for b in blocks if b.not_run_reason]}"


def test_a_page_that_hides_a_command_in_an_unlabelled_fence_is_refused():
    with pytest.raises(DocError, match=r"page.md:3: a fence without a language"):
        parse("page.md", "text\n\n```\ntcpmesh lab up\n```\n")


@pytest.mark.parametrize("markdown, message", [
    ("```sh not-run:\nmake test\n```\n", r"page.md:1: `not-run` needs a reason"),
    ("```sh maybe\nls\n```\n", r"page.md:1: unknown attributes 'maybe'"),
    ("```output\nhello\n```\n", r"page.md:1: an ```output block must follow the command block"),
    ("```sh not-run: installs\nmake install\n```\n```output\nok\n```\n", r"page.md:4: an ```output block after a not-run"),
    ("```sh\nls\n```\n```output\na\n```\n```output\nb\n```\n", r"page.md:7: a second ```output block in a row"),
    ("```yaml\na: 1\n```\n```output\na\n```\n", r"page.md:4: an ```output block must follow"),
    ("```console\n$ ls\n```\n```perl\nprint 1\n```\n", r"page.md:4: language 'perl'"),
    ("```sh\nls\n", r"page.md:1: the fence opened here is never closed"),
])
def test_each_breach_of_the_convention_names_the_line_and_the_fix(markdown, message):
    with pytest.raises(DocError, match=message):
        parse("page.md", markdown)


def test_blocks_carry_their_line_attributes_and_output():
    blocks = parse("page.md", "# t\n\n```sh\necho hi\n```\n\nprose\n\n```output\nhi\n```\n\n```sh fails\nfalse\n```\n"
                              "```sh not-run: changes the host\nmake install\n```\n```yaml\nk: v\n```\n")
    first, failing, skipped = command_blocks(blocks)
    assert (first.line, first.text, first.expected.text) == (3, "echo hi\n", "hi\n")
    assert failing.must_fail and failing.not_run_reason is None
    assert skipped.not_run_reason == "changes the host" and not skipped.must_fail


@pytest.mark.parametrize("expected, actual, missing", [
    ("a\nc\n", "a\nb\nc\n", []),                                  # other lines may come between
    ("c\na\n", "a\nb\nc\n", ["a"]),                               # but the order counts
    ("tps = … (without initial connection time)\n", "tps = 812.5 (without initial connection time)\n", []),
    ("real 0m…s\n", "real\t0m0.801s\n", []),                      # runs of blanks compare equal
    ("SET: … requests per second…\n", "SET: rps=0.0\rSET: 9000.1 requests per second, p50=1 msec\n", []),
    ("200\n", "", ["200"]),                                       # nothing printed: everything missing
    ("lab 'x' is down\n", "lab 'x' is down: stopped 2 agents\n", ["lab 'x' is down"]),  # whole lines only
    ("a.b\n", "axb\n", ["a.b"]),                                  # only … is special
])
def test_expected_output_lines_appear_in_order_with_the_ellipsis_as_the_only_wildcard(expected, actual, missing):
    assert missing_output(expected, actual) == missing


def yaml_after(markdown: str, heading: str) -> dict:
    rest = markdown[markdown.index(heading):]
    block = rest[rest.index("```yaml\n") + len("```yaml\n"):]
    return yaml.safe_load(block[:block.index("```")])


def test_docs_lab_md_shows_the_agent_config_the_lab_writes():
    plan = plan_lab("demo", 2, 2, "lab.tcpmesh")
    shown = yaml_after((REPO / "docs/lab.md").read_text(), "An agent config (node2 of lab `demo`)")
    from agent.lab import issuer as issuer_lab
    from agent.lab.files import LAB_IDENTITY_POLL_SECONDS

    node = plan.node("node2")  # the default lab: identity mode issuer
    assert shown == agent_config(plan, node, identity=issuer_lab.agent_identity(plan, node, LAB_IDENTITY_POLL_SECONDS,
                                                                                None))
