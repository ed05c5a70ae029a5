"""Shared test fixtures and the privilege policy.

Tests that need root, namespaces, cgroup v2 or BPF ask for a capability fixture. When the capability
is missing they skip with the precise reason — unless TCPMESH_REQUIRE_PRIVILEGED=1 (set by .ci/run),
which turns every such skip into a failure, so nothing privileged "just appears to pass" in CI.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import pytest

from agent import hostcheck

REQUIRE_PRIVILEGED = os.environ.get("TCPMESH_REQUIRE_PRIVILEGED") == "1"


def skip_or_fail(reason: str) -> None:
    if REQUIRE_PRIVILEGED:
        pytest.fail(f"TCPMESH_REQUIRE_PRIVILEGED=1 but: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def privileged() -> None:
    """Root and network namespaces."""
    problem = hostcheck.netns_problem()
    if problem:
        skip_or_fail(problem)


@pytest.fixture(scope="session")
def bpf_capable(privileged) -> None:
    """Root, cgroup v2 and an importable bcc."""
    problem = hostcheck.cgroup2_problem() or hostcheck.bcc_problem()
    if problem:
        skip_or_fail(problem)


@pytest.fixture(scope="session")
def cgroup2_mount(privileged) -> str:
    mount = hostcheck.find_cgroup2_mount()
    problem = hostcheck.cgroup2_problem()
    if problem or mount is None:
        skip_or_fail(problem or "cgroup v2 not mounted")
    return mount


@pytest.fixture
def test_cgroup(cgroup2_mount) -> Path:
    """A fresh per-test cgroup under the v2 mount (never the root cgroup), removed afterwards."""
    path = Path(cgroup2_mount) / f"tcpmesh-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    try:
        yield path
    finally:
        remove_cgroup_tree(path)


def remove_cgroup_tree(path: Path) -> None:
    """rmdir a cgroup tree bottom-up, moving any leftover processes to the parent first."""
    if not path.exists():
        return
    for child in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        _rmdir_cgroup(child)
    _rmdir_cgroup(path)


def _rmdir_cgroup(path: Path) -> None:
    procs = path / "cgroup.procs"
    if procs.exists():
        for pid in procs.read_text().split():
            try:
                (path.parent / "cgroup.procs").write_text(pid)
            except OSError:
                pass
    try:
        path.rmdir()
    except FileNotFoundError:
        pass


@pytest.fixture(scope="session")
def tcpdump_path() -> str | None:
    return shutil.which("tcpdump")
