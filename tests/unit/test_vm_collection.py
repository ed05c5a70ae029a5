"""The vm tier builds its image at run time, never while pytest only collects (tests/vm/conftest.py).

Seen failing before the fix: `pytest --collect-only tests/vm` as root with a cold image cache started the
background image build (debootstrap) from ``pytest_collection_finish`` and killed it again at exit — a listing
of the tests cost a build's start and teardown.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_collecting_the_vm_tier_builds_nothing(privileged, tmp_path):
    cache = tmp_path / "cold-cache"
    env = {**os.environ, "TCPMESH_VM_CACHE": str(cache)}
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                             "tests/vm"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "tests collected" in out, out
    build_log = Path(f"/tmp/tcpmesh-vm-image-build-{proc.pid}.log")   # where the background build writes
    assert not build_log.exists(), build_log.read_text(errors="replace")[-2000:]
    assert not cache.exists(), sorted(str(p) for p in cache.rglob("*"))[:20]
