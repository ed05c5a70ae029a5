"""Imports point down (docs/architecture.md, "Packages"): read from the source with ``ast``, nothing imported.

The data path (``agent.proxy``) must never import telemetry or a command line; the shared flow record lives
below both (``agent.connection``); identity sits below the config; and there is no import cycle among the
modules of any package, nor between packages (``ACYCLIC``: every package and top-level module). Every import counts, also one
inside a function (a lazy import is still a dependency); only ``if TYPE_CHECKING:`` blocks are skipped.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
AGENT = ROOT / "agent"

# (importer prefix, forbidden prefix, why)
FORBIDDEN = (
    ("agent.proxy", "agent.telemetry", "the data path reports through the Protocols of agent.proxy.server"),
    ("agent.proxy", "agent.cli", "the data path never imports the command line"),
    ("agent.proxy", "agent.app", "the composition root builds the proxy, not the other way round"),
    ("agent.connection", "agent.proxy", "the flow record lies below the proxy"),
    ("agent.connection", "agent.telemetry", "the flow record lies below telemetry"),
    ("agent.identity", "agent.config", "the config sits above identity (it validates SPIFFE names)"),
    ("agent.registry", "agent.proxy", "the registry lies below the data path"),
    ("agent.service", "agent.app", "service helpers are used by the composition root"),
)
# every package and top-level module of the agent: none may form an import cycle, alone or with another
ACYCLIC = tuple(sorted({".".join(p.relative_to(ROOT).with_suffix("").parts[:2]) for p in AGENT.rglob("*.py")}
                       - {"agent.__init__"}))


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in AGENT.rglob("*.py")}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imported(node: ast.AST, package: str) -> set[str]:
    """The agent modules ``node`` imports (``from agent.x import y`` is module ``agent.x.y`` when that exists)."""
    names: set[str] = set()
    if isinstance(node, ast.Import):
        names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
        submodules = {f"{base}.{alias.name}" for alias in node.names} & MODULES.keys()
        names.update(submodules)
        if len(submodules) < len(node.names):  # a name defined in ``base`` itself (its __init__, or a module)
            names.add(base)
    return {n for n in names if n in MODULES}


def imports_of(name: str) -> set[str]:
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    stack: list[ast.AST] = [ast.parse(path.read_text(), str(path))]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        found |= _imported(node, package)
        stack.extend(ast.iter_child_nodes(node))
    found.discard(name)
    return found


GRAPH = {name: imports_of(name) for name in MODULES}


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one member (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _in_acyclic(name: str) -> bool:
    return any(_under(name, p) for p in ACYCLIC)


def test_the_graph_is_read() -> None:
    """A guard for the guard: the reader sees the imports we know are there."""
    assert "agent.connection.flow" in GRAPH["agent.proxy.server"]
    assert "agent.connection.flow" in GRAPH["agent.telemetry.metrics"]
    assert "agent.identity.root_rotation" in GRAPH["agent.identity.cli"]  # a lazy import inside a function


@pytest.mark.parametrize("importer,forbidden,why", FORBIDDEN)
def test_no_import_runs_back_up(importer: str, forbidden: str, why: str) -> None:
    wrong = sorted(f"{a} imports {b}" for a, targets in GRAPH.items() if _under(a, importer)
                   for b in targets if _under(b, forbidden))
    assert not wrong, f"{importer} must not import {forbidden} ({why}): " + "; ".join(wrong)


def test_no_module_cycle() -> None:
    graph = {a: {b for b in targets if _in_acyclic(b)} for a, targets in GRAPH.items() if _in_acyclic(a)}
    cycles = _cycles(graph)
    assert not cycles, f"modules that import each other in a circle (move the shared part below both): {cycles}"


def test_no_package_cycle() -> None:
    def package(name: str) -> str:
        return next(p for p in ACYCLIC if _under(name, p))

    graph: dict[str, set[str]] = {}
    for a, targets in GRAPH.items():
        if _in_acyclic(a):
            graph.setdefault(package(a), set()).update(package(b) for b in targets
                                                       if _in_acyclic(b) and package(b) != package(a))
    cycles = _cycles(graph)
    assert not cycles, f"packages that import each other (one of them must stop reaching up): {cycles}"
