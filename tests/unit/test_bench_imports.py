"""bench/ does not import tests/: the benchmark runs from a checkout without pytest's world, and a test
helper changed for a test must not silently change what a benchmark measures. What both need (an
in-memory TLS tunnel, the data-path switch) lives in bench/tls_pair.py and tests import it from there.
Seen failing before: bench/hop_steps.py imported tests.hotpath_impls and tests.unit.test_endpoints_tls_buffer."""

from __future__ import annotations

import ast
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"
# Known and left: hop_cpu builds the two-node loopback mesh of tests/integration/test_proxy_loopback.py.
# By design: kernel_tls_vm boots guests with the vm tier's machinery (tests/vm/images.py, machine.py) rather
# than a copy of it; what it measures runs in the guest (bench/kernel_tls.py), which imports no tests.
NOT_YET = {"hop_cpu.py", "kernel_tls_vm.py"}


def imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def test_no_bench_module_imports_tests():
    offenders = {p.name: sorted(m for m in imported_modules(p) if m == "tests" or m.startswith("tests."))
                 for p in sorted(BENCH.glob("*.py")) if p.name not in NOT_YET}
    assert {name: mods for name, mods in offenders.items() if mods} == {}
