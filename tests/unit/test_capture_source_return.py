"""agent.capture.source_return: the agent side stays free of pyroute2; the netlink child answers in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_agent_imports_no_pyroute2_for_the_return_path() -> None:
    script = ("import sys, agent.app, agent.capture.source_return; "
              "print(sorted(m for m in sys.modules if m.split('.')[0] == 'pyroute2'))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", f"pyroute2 in the agent (+9 MiB resident): {done.stdout[:300]}"


def test_the_child_refuses_an_unknown_operation_in_one_json_line() -> None:
    done = subprocess.run([sys.executable, "-m", "agent.capture.source_return_child", json.dumps({"op": "nonsense"})],
                          capture_output=True, text=True, timeout=60, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 1
    assert json.loads(done.stdout) == {"ok": False, "error": "unknown operation 'nonsense'"}
