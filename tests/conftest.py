"""Shared test fixtures and the skip policy.

Every environmental skip goes through one helper, ``skip_or_fail`` (or its wrappers
``require_binary`` / ``require_module`` and the capability fixtures ``privileged``, ``bpf_capable``,
``cgroup2_mount``): without the tool, module or capability a test skips with the precise reason and
the fix — unless TCPMESH_REQUIRE_PRIVILEGED=1 (set by .ci/run), which turns every such skip into a
failure, so nothing "just appears to pass" in CI. As a backstop, a run with that switch set fails
when any test was skipped at all (a bare ``pytest.skip`` included) and lists what was skipped
(``SkipLedger``; tests/unit/test_skip_policy.py proves both).
"""

from __future__ import annotations

import importlib
import os
import shutil
import signal
import threading
import uuid
from pathlib import Path
from types import ModuleType

import pytest

from agent.host import checks

REQUIRE_PRIVILEGED = os.environ.get("TCPMESH_REQUIRE_PRIVILEGED") == "1"
# A test that bounds how long something takes (a compile, an adoption) multiplies its bound by this:
# the vm tier's software-emulated guests (tests/vm) set it; real machines keep 1.
TIME_SCALE = float(os.environ.get("TCPMESH_TEST_TIME_SCALE") or 1)


def skip_or_fail(reason: str, *, module_level: bool = False) -> None:
    """Skip with ``reason`` (say what is missing and how to get it), or fail under CI."""
    if REQUIRE_PRIVILEGED:
        pytest.fail(f"TCPMESH_REQUIRE_PRIVILEGED=1 but: {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=module_level)


def require_binary(name: str, package: str) -> str:
    """The path of the program ``name`` (from the Debian package ``package``), else skip_or_fail."""
    path = shutil.which(name)
    if path is None:
        skip_or_fail(f"{name} is not installed (Debian package `{package}`; deploy/bootstrap-debian.sh installs it)")
    return path


def require_module(name: str, fix: str, *, module_level: bool = False) -> ModuleType:
    """The imported module ``name``, else skip_or_fail saying ``fix``."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        skip_or_fail(f"cannot import {name} ({exc}); {fix}", module_level=module_level)
        raise  # not reached: skip_or_fail raises


class SkipLedger:
    """Records every skipped test and module; with TCPMESH_REQUIRE_PRIVILEGED=1 a run that skipped
    anything fails, and the summary lists what was skipped and why."""

    def __init__(self, strict: bool) -> None:
        self.strict = strict
        self.skipped: list[str] = []

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.skipped and not hasattr(report, "wasxfail"):
            self.skipped.append(f"{report.nodeid}: {_skip_reason(report)}")

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.skipped:
            self.skipped.append(f"{report.nodeid} (whole module): {_skip_reason(report)}")

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self.strict and self.skipped and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if self.strict and self.skipped:
            terminalreporter.section("TCPMESH_REQUIRE_PRIVILEGED=1: skips fail this run", red=True)
            for line in self.skipped:
                terminalreporter.line(line, red=True)


def _skip_reason(report) -> str:
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    return reason.removeprefix("Skipped: ")


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(SkipLedger(REQUIRE_PRIVILEGED), "tcpmesh-skip-ledger")
    config.pluginmanager.register(InterruptTeardown(), "tcpmesh-interrupt-teardown")
    load_hypothesis_profile(os.environ)


class InterruptTeardown:
    """An interrupted run still tears its labs down: SIGTERM and SIGHUP (a CI job cut at a session's
    end) raise KeyboardInterrupt as SIGINT does, so pytest runs every fixture's finalizer (each lab's
    lab_down) and exits; and SIGINT is made to interrupt even when the run inherited it ignored (a
    background job of a non-interactive shell: before, such a run went on to its end whatever was
    sent). Labs and pods made by `tcpmesh lab up` in subprocesses are owned by this run
    (TCPMESH_LAB_OWNER_PID), so if it is SIGKILLed the next `lab up` reaps them (agent/lab/owner.py).
    The previous handlers and environment come back at the end of the run."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.previous: dict[int, object] = {}
        self.owner_env: str | None = None
        self.pid = os.getpid()

    def _interrupt(self, signum: int, frame) -> None:
        if os.getpid() == self.pid:
            raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")
        # A child forked from this run (pyroute2 forks one to make a netns) must not run the session's
        # teardown — it would take the labs down under the run. It gets what it would have had without us.
        previous = self.previous.get(signum, signal.SIG_DFL)
        signal.signal(signum, previous)
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:
            os.kill(os.getpid(), signum)

    def pytest_sessionstart(self, session: pytest.Session) -> None:
        from agent.lab.owner import OWNER_ENV

        self.owner_env = os.environ.get(OWNER_ENV)
        os.environ[OWNER_ENV] = str(os.getpid())
        if threading.current_thread() is not threading.main_thread():
            return   # an in-process run on another thread cannot take signals
        for signum in self.SIGNALS:
            self.previous[signum] = signal.signal(signum, self._interrupt)

    def pytest_unconfigure(self, config: pytest.Config) -> None:
        from agent.lab.owner import OWNER_ENV

        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        if self.owner_env is None:
            os.environ.pop(OWNER_ENV, None)
        else:
            os.environ[OWNER_ENV] = self.owner_env


# Hypothesis (the fuzzers in tests/unit/test_fuzz_*.py): CI runs them derandomized, so a run is
# reproducible and a red CI is red again on a re-run; `make fuzz` runs them with fresh randomness
# (HYPOTHESIS_PROFILE=fresh) to look for new failures. Outside CI the default is fresh too.
HYPOTHESIS_PROFILES = {"ci": dict(derandomize=True, database=None), "fresh": dict(derandomize=False)}


def load_hypothesis_profile(environ) -> str:
    from hypothesis import settings

    for name, values in HYPOTHESIS_PROFILES.items():
        settings.register_profile(name, **values)
    name = environ.get("HYPOTHESIS_PROFILE") or ("ci" if environ.get("TCPMESH_REQUIRE_PRIVILEGED") == "1" else "fresh")
    settings.load_profile(name)
    return name


@pytest.fixture(scope="session")
def privileged() -> None:
    """Root and network namespaces."""
    problem = checks.netns_problem()
    if problem:
        skip_or_fail(problem)


@pytest.fixture(scope="session")
def bpf_capable(privileged) -> None:
    """Root, cgroup v2 and an importable bcc."""
    problem = checks.cgroup2_problem() or checks.bcc_problem()
    if problem:
        skip_or_fail(problem)


@pytest.fixture(scope="session")
def cgroup2_mount(privileged) -> str:
    mount = checks.find_cgroup2_mount()
    problem = checks.cgroup2_problem()
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
