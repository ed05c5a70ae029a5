"""systemd/tcpmesh-issuer.service: systemd itself accepts it (`systemd-analyze verify`), it starts what
`tcpmesh issuer run` is, and it grants no capability; systemd/install.sh installs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from agent.cli import main
from tests.conftest import require_binary

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd" / "tcpmesh-issuer.service"


def test_systemd_accepts_the_issuer_unit(tmp_path):
    analyze = require_binary("systemd-analyze", "systemd")
    tcpmesh = Path(sys.executable).with_name("tcpmesh")
    unit = tmp_path / "tcpmesh-issuer.service"   # the binary where this checkout has it, not /usr/local/bin
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/tcpmesh", str(tcpmesh)))
    done = subprocess.run([analyze, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60,
                          cwd=tmp_path)
    assert done.returncode == 0 and not (done.stdout + done.stderr).strip(), done.stdout + done.stderr


def test_the_unit_runs_tcpmesh_issuer_run_with_no_capability():
    lines = dict(line.split("=", 1) for line in UNIT.read_text().splitlines() if "=" in line and not line.startswith("#"))
    assert lines["ExecStart"].split()[1:4] == ["issuer", "run", "--config"]
    assert lines["CapabilityBoundingSet"] == "" and lines["Type"] == "notify"
    assert CliRunner().invoke(main, ["issuer", "run", "--help"]).exit_code == 0
    assert "tcpmesh-issuer.service" in (REPO / "systemd" / "install.sh").read_text()
