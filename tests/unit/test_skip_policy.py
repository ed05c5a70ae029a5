"""The skip policy of tests/conftest.py, on a throw-away suite run by a real pytest: with
TCPMESH_REQUIRE_PRIVILEGED=1 (what .ci/run sets) a skip through the helper is a failure, and a run
that skipped anything at all — a bare ``pytest.skip`` too — exits non-zero and lists it; without the
switch the same suite skips and passes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

SUITE = {
    "test_bare.py": "import pytest\n\ndef test_bare():\n    pytest.skip('no frobnicator here')\n",
    "test_helper.py": ("from tests.conftest import require_binary\n\n"
                       "def test_helper():\n    require_binary('tcpmesh-no-such-tool', 'tcpmesh-no-such-package')\n"),
    "test_module.py": ("from tests.conftest import require_module\n"
                       "require_module('tcpmesh_no_such_module', 'pip install it', module_level=True)\n\n"
                       "def test_never_collected():\n    pass\n"),
    "test_fine.py": "def test_fine():\n    pass\n",
}


def run_suite(tmp_path: Path, files: list[str], strict: bool) -> subprocess.CompletedProcess:
    for name in files:
        (tmp_path / name).write_text(SUITE[name])
    (tmp_path / "pytest.ini").write_text("[pytest]\naddopts = -ra\n")
    env = {k: v for k, v in os.environ.items() if k != "TCPMESH_REQUIRE_PRIVILEGED"}
    env["PYTHONPATH"] = str(REPO)
    env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    if strict:
        env["TCPMESH_REQUIRE_PRIVILEGED"] = "1"
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "tests.conftest", "-p", "no:cacheprovider",
                           "-c", str(tmp_path / "pytest.ini"), "--rootdir", str(tmp_path), *files],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def test_under_ci_a_bare_skip_fails_the_run_and_is_listed(tmp_path):
    done = run_suite(tmp_path, ["test_bare.py", "test_fine.py"], strict=True)
    assert done.returncode == pytest.ExitCode.TESTS_FAILED, done.stdout + done.stderr
    assert "1 passed, 1 skipped" in done.stdout
    assert "TCPMESH_REQUIRE_PRIVILEGED=1: skips fail this run" in done.stdout
    assert "test_bare.py::test_bare: no frobnicator here" in done.stdout


def test_under_ci_the_helpers_fail_instead_of_skipping(tmp_path):
    done = run_suite(tmp_path, ["test_helper.py", "test_module.py"], strict=True)
    assert done.returncode == pytest.ExitCode.INTERRUPTED, done.stdout + done.stderr  # a collection error
    assert "ERROR test_module.py" in done.stdout
    assert "cannot import tcpmesh_no_such_module" in done.stdout and "pip install it" in done.stdout
    done = run_suite(tmp_path, ["test_helper.py"], strict=True)
    assert done.returncode == pytest.ExitCode.TESTS_FAILED, done.stdout + done.stderr
    assert "FAILED test_helper.py::test_helper" in done.stdout and "skipped" not in done.stdout
    assert "tcpmesh-no-such-tool is not installed (Debian package `tcpmesh-no-such-package`" in done.stdout


def test_outside_ci_the_same_suite_skips_with_the_reasons(tmp_path):
    done = run_suite(tmp_path, ["test_bare.py", "test_helper.py", "test_module.py", "test_fine.py"], strict=False)
    assert done.returncode == pytest.ExitCode.OK, done.stdout + done.stderr
    assert "1 passed, 3 skipped" in done.stdout
    assert "tcpmesh-no-such-tool is not installed" in done.stdout
    assert "skips fail this run" not in done.stdout


def test_a_clean_ci_run_passes(tmp_path):
    done = run_suite(tmp_path, ["test_fine.py"], strict=True)
    assert done.returncode == pytest.ExitCode.OK, done.stdout + done.stderr


def test_ci_runs_the_fuzzers_derandomized_and_make_fuzz_with_fresh_randomness():
    from hypothesis import settings

    from tests.conftest import load_hypothesis_profile

    try:
        assert load_hypothesis_profile({"TCPMESH_REQUIRE_PRIVILEGED": "1"}) == "ci"
        assert settings().derandomize and settings().database is None
        assert load_hypothesis_profile({"TCPMESH_REQUIRE_PRIVILEGED": "1", "HYPOTHESIS_PROFILE": "fresh"}) == "fresh"
        assert not settings().derandomize
        assert load_hypothesis_profile({}) == "fresh"
    finally:
        load_hypothesis_profile(os.environ)
