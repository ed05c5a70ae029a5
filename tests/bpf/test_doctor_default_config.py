"""The config `make install` writes (systemd/config.yaml), filled in as docs/install-systemd.md says, judged by
`tcpmesh doctor --config` on this machine: the agent would capture with ebpf-connect, whatever the host's
cgroup v2 mount is (capture.cgroup_root auto).

Seen failing before capture.cgroup_root auto: the shipped config named /sys/fs/cgroup, this machine mounts
cgroup v2 at /sys/fs/cgroup/unified (systemd's hybrid hierarchy), and doctor — like the agent's own
``capture.mode: auto`` — chose ebpf-tc, "ebpf-connect unusable (missing cgroup2)". A stock Debian 12 node with
the old default (/sys/fs/cgroup/unified, for a config without cgroup_root) was the mirror case.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from agent.host import checks

REPO = Path(__file__).resolve().parents[2]


def test_the_installed_config_filled_in_captures_with_ebpf_connect_here(bpf_capable, tmp_path):
    doc = yaml.safe_load((REPO / "systemd/config.yaml").read_text())
    doc["node"] = {"name": "node1", "address": "10.99.0.1"}
    doc["capture"]["redirect_address"] = "10.99.0.1"
    doc["identity"]["issuer"]["addresses"] = ["10.99.0.5:15012"]
    doc["policy"]["dir"] = str(tmp_path / "policies")
    doc["registry"]["file"] = str(tmp_path / "workloads.yaml")
    doc["access_log"] = {"path": "off"}
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(doc))
    out = subprocess.run([sys.executable, "-m", "agent", "doctor", "--config", str(config), "--json"],
                         capture_output=True, text=True, timeout=120)
    report = json.loads(out.stdout)  # exit 1 here: no registry file, no agent answering; the capture verdict stands
    cgroup2 = next(c for c in report["checks"] if c["name"] == "cgroup2")
    assert cgroup2["result"] == "ok" and checks.find_cgroup2_mount() in cgroup2["detail"], cgroup2
    assert report["selected_mode"] == "ebpf-connect", report["reason"]
