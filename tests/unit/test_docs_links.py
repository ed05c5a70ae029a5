"""Every docs/ page the repository names exists, every file and module the docs name exists, and
nothing points outside the repository.

A newcomer has only this repository: a design fact cited from ../shared/, from a page that was
renamed or split, or pinned to a module that moved is a fact they cannot follow. Scans the README,
docs/, the code, the BPF sources, the tests and the deployment files for page names; the README,
docs/ and tests/README.md for file paths and ``python -m`` modules.
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
