"""Every setting the pages name is one the config has: a `section.field` in inline code of README.md,
tests/README.md or docs/ (also `section.field: value` and `section.*`), whose section is one of the agent's
config (agent/config/model.py) or the issuer's (agent/issuer/config.py), is a field there — unless it is what else
such a name can be: an admin-socket op (`identity.reload`), a file (`node.key`), or a function or class of agent/
(`identity.issue.sign_leaf`). A renamed or removed setting left in a page fails here with the page and line.

Seen failing on the docs of 2026-12-07: `capture.cidrs` (docs/capture-connect.md, docs/registry.md), a setting the
agent never had — the capture CIDRs are agent/capture/cidrs.py's DEFAULT_CAPTURE_CIDRS.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import re
from pathlib import Path

from agent.config import Config
from agent.issuer.config import IssuerConfig

REPO = Path(__file__).resolve().parents[2]
PAGES = [REPO / "README.md", REPO / "tests" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FILE_SUFFIXES = {"key", "crt", "pem", "csr", "yaml", "yml", "json", "md", "py", "sock", "log", "c", "h"}


def settings() -> set[str]:
    """Every dotted field name of the agent's and the issuer's config (sections and leaves)."""
    def walk(obj, prefix: str = "") -> set[str]:
        found = set()
        for field in dataclasses.fields(obj):
            value = getattr(obj, field.name)
            found.add(prefix + field.name)
            if dataclasses.is_dataclass(value):
                found |= walk(value, f"{prefix}{field.name}.")
        return found
    return walk(Config()) | walk(IssuerConfig())


def admin_ops() -> set[str]:
    return set(re.findall(r'"op": "([a-z_.]+)"', (REPO / "agent" / "control" / "admin_socket.py").read_text()))


def _code_object(name: str) -> bool:
    """``name`` is a function or class of agent/ (or agent/issuer/), e.g. identity.issue.sign_leaf — not a module."""
    parts = name.split(".")
    for base in ("agent.", "agent.issuer."):
        for cut in range(len(parts) - 1, 0, -1):
            try:
                obj = importlib.import_module(base + ".".join(parts[:cut]))
            except ImportError:
                continue
            for attribute in parts[cut:]:
                obj = getattr(obj, attribute, None)
            if obj is not None and not inspect.ismodule(obj):
                return True
    return False


def setting_problems(pages: list[Path], known: set[str]) -> list[str]:
    sections = sorted({name for name in known if any(other.startswith(name + ".") for other in known)})
    span = re.compile(r"`(" + "|".join(sections) + r")((?:\.[a-z_][a-z0-9_]*)+)(\.\*)?(?::[^`]*)?`")
    ops = admin_ops()
    problems = []
    for page in pages:
        for number, line in enumerate(page.read_text().splitlines(), 1):
            for match in span.finditer(line):
                name, star = match.group(1) + match.group(2), match.group(3)
                if star and any(other.startswith(name + ".") for other in known):
                    continue
                if (not star and name in known) or name.rsplit(".", 1)[1] in FILE_SUFFIXES or name in ops \
                        or _code_object(name):
                    continue
                close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.8)
                where = page.relative_to(REPO) if page.is_relative_to(REPO) else page
                problems.append(f"{where}:{number}: {name}{star or ''} is no setting of the agent's or the issuer's "
                                f"config{f'; did you mean {close[0]}?' if close else ''}")
    return problems


def test_every_setting_the_pages_name_exists():
    problems = setting_problems(PAGES, settings())
    assert not problems, "settings the pages name that the config does not have:\n" + "\n".join(problems)


def test_a_misspelled_or_removed_setting_is_named_with_its_page_and_line(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("Set `proxy.max_conections: 100` and `capture.cidrs`; `identity.issuer.*`, `limits.workers`,\n"
                    "`proxy.nothing.*`, the op `identity.reload`, `node.key`, `identity.issue.sign_leaf`.\n")
    assert setting_problems([page], settings()) == [
        f"{page}:1: proxy.max_conections is no setting of the agent's or the issuer's config; did you mean "
        "proxy.max_connections?",
        f"{page}:1: capture.cidrs is no setting of the agent's or the issuer's config",
        f"{page}:2: proxy.nothing.* is no setting of the agent's or the issuer's config"]
