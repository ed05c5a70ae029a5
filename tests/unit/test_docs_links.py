"""Every docs/ page the repository names exists, every file and module the docs name exists, and
nothing points outside the repository.

A newcomer has only this repository: a design fact cited from ../shared/, from a page that was
renamed or split, or pinned to a module that moved is a fact they cannot follow. Scans the README,
docs/, the code, the BPF sources, the tests and the deployment files for page names; the README,
docs/ and tests/README.md for file paths and ``python -m`` modules, relative ``[text](target#anchor)`` links, and
the sections they cite (``docs/identity.md "The issuer"``).
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCANNED = ("README.md", "Makefile", "pyproject.toml", "docs", "agent", "bpf", "tests", "bench", "deploy", "systemd",
           "vagrant")
SUFFIXES = {".md", ".py", ".c", ".h", ".sh", ".service", ".yml", ".yaml", ".json", ".toml", ""}
DOC_REF = re.compile(r"\bdocs/([A-Za-z0-9_.-]+\.md)")
OUTSIDE = re.compile(r"\.\./shared|shared/notes/|\bDESIGN\.md|\bSTYLE\.md")
# a repository path with a file extension, not a glob (``tests/unit/test_fuzz_*.py``) or a template (``<pod>``)
FILE_REF = re.compile(r"(?<![\w/.-])((?:agent|bpf|tests|deploy|systemd|vagrant|bench)/[\w/.-]*\.(?:py|c|h|md|sh|json|yml|yaml|"
                      r"service|toml|rb))(?![\w*<{])")
BRACE_REF = re.compile(r"(?<![\w/.-])((?:agent|bpf|tests)/[\w/]*)\{([\w,]+)\}(\.(?:py|c|h))")  # agent/{a,b}.py
MODULE_REF = re.compile(r"python3? -m (agent(?:\.\w+)*)")
PROSE = ("README.md", "docs", "tests/README.md")


def repository_files():
    for name in SCANNED:
        path = REPO / name
        candidates = [path] if path.is_file() else sorted(path.rglob("*"))
        for file in candidates:
            if (file.is_file() and not file.is_symlink() and file.suffix in SUFFIXES and "__pycache__" not in file.parts
                    and "out" not in file.relative_to(REPO).parts[:2]):
                yield file


def test_every_named_docs_page_exists():
    missing = []
    for file in repository_files():
        if file == Path(__file__):
            continue
        for match in DOC_REF.finditer(file.read_text(errors="replace")):
            if not (REPO / "docs" / match.group(1)).is_file():
                missing.append(f"{file.relative_to(REPO)}: docs/{match.group(1)}")
    assert not missing, "pages named but not in docs/:\n" + "\n".join(missing)


def test_nothing_points_outside_the_repository():
    outside = [f"{file.relative_to(REPO)}:{n}: {line.strip()}"
               for file in repository_files() if file != Path(__file__)
               for n, line in enumerate(file.read_text(errors="replace").splitlines(), 1) if OUTSIDE.search(line)]
    assert not outside, "links to files outside this repository (carry the fact into docs/):\n" + "\n".join(outside)


def prose_files():
    for name in PROSE:
        path = REPO / name
        yield from [path] if path.is_file() else sorted(path.glob("*.md"))


def test_every_file_and_module_the_docs_name_exists():
    missing = []
    for file in prose_files():
        text = file.read_text()
        for match in FILE_REF.finditer(text):
            if not (REPO / match.group(1)).exists():
                missing.append(f"{file.relative_to(REPO)}: {match.group(1)}")
        for match in BRACE_REF.finditer(text):
            head, names, suffix = match.groups()
            missing += [f"{file.relative_to(REPO)}: {head}{name}{suffix}" for name in names.split(",")
                        if not (REPO / f"{head}{name}{suffix}").exists()]
        for match in MODULE_REF.finditer(text):
            module = REPO / match.group(1).replace(".", "/")
            if not (module.with_suffix(".py").is_file() or (module / "__main__.py").is_file()):
                missing.append(f"{file.relative_to(REPO)}: python -m {match.group(1)}")
    assert not missing, "named in the docs but not in the repository (moved? say where it is now):\n" + \
        "\n".join(missing)


LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)\)")  # [text](target): README and docs/ write few, but each must land
SECTION_REF = re.compile(r'docs/([A-Za-z0-9_.-]+\.md)`?,?\s*\(?"([^"\n]+)"')  # docs/identity.md "The issuer"
BOLD_LEAD = re.compile(r"^\*\*(.+?)\*\*")  # a paragraph that opens with its title in bold, cited like a heading


def prose_lines(text: str):
    """(line number, line) outside fenced blocks: a link or a heading in a code sample is not one."""
    fenced = False
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
        elif not fenced:
            yield number, line


def titles(page: Path) -> list[str]:
    """A page's headings and bold paragraph leads, as a reader sees them (no `#`, no backticks)."""
    found = []
    for _, line in prose_lines(page.read_text()):
        if line.startswith("#"):
            found.append(line.lstrip("#").strip())
        elif match := BOLD_LEAD.match(line):
            found.append(match.group(1))
    return [title.replace("`", "") for title in found]


def anchor(title: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def link_problems(page: Path) -> list[str]:
    """Every relative [text](target) of ``page`` that names no file, or an anchor no heading of it has."""
    problems = []
    for number, line in prose_lines(page.read_text()):
        for match in LINK.finditer(line):
            target = match.group(1)
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: — not this repository's
                continue
            path, _, fragment = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            where = f"{page.name}:{number}: ({target})"
            if not file.exists():
                problems.append(f"{where}: no file {file}")
            elif fragment and file.suffix == ".md" and fragment not in {anchor(t) for t in titles(file)}:
                problems.append(f"{where}: no heading of {file.name} has the anchor #{fragment}")
    return problems


def test_every_relative_link_of_the_docs_lands():
    problems = [problem for page in prose_files() for problem in link_problems(page)]
    assert not problems, "relative links to nothing (a page or file renamed? point at where it is now):\n" + \
        "\n".join(problems)


def test_a_broken_link_is_found(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A page\n\n## Its part\n")
    page = tmp_path / "README.md"
    page.write_text("[ok](docs/a.md#its-part) [gone](docs/b.md) [moved](docs/a.md#old-part)\n"
                    "```text\n[in a sample](nowhere.md)\n```\n[web](https://example.com/x)\n")
    assert [problem.split(": ")[1] for problem in link_problems(page)] == [
        "(docs/b.md)", "(docs/a.md#old-part)"]


def test_every_section_the_docs_cite_exists():
    """`docs/identity.md "The issuer"` is how pages point into each other: the title must still be a heading or a
    bold paragraph lead of that page (a substring of one: citations shorten long titles)."""
    missing = []
    for file in prose_files():
        for number, line in enumerate(file.read_text().splitlines(), 1):
            for match in SECTION_REF.finditer(line):
                page, cited = REPO / "docs" / match.group(1), match.group(2).replace("`", "")
                if page.is_file() and not any(cited in title for title in titles(page)):
                    missing.append(f"{file.relative_to(REPO)}:{number}: docs/{match.group(1)} \"{match.group(2)}\"")
    assert not missing, "sections cited but not on that page (renamed? cite the title it has now):\n" + \
        "\n".join(missing)
