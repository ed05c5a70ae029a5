"""What a running agent process carries: `tcpmesh run` (a separate process, capture mode none, loopback) turned
ready — registry applied, which reads this node's own addresses for its nodePort frontends — has not loaded the
pyroute2 package. Importing any part of pyroute2 imports all of it (NDB with sqlite3, multiprocessing, pickle):
≈ 10 MiB of RSS per agent (docs/performance-notes.md; the agent's plumbing runs pyroute2 in child processes).

Seen failing before agent/capture/local_addresses.py: the registry apply read the node's addresses through
pyroute2 (agent.capture.steering), and the bench's RSS with 1,000 held connections went 93.7 → 114.6 MiB for two
agents (docs/benchmarks.md, 2026-12-06 23:39). The marker is sqlite3's extension module in the process's
memory map: only the pyroute2 package brings it into an agent (tests/footprint.py). The lab agents of
tests/e2e/test_telemetry_lab.py are checked the same way in ebpf-connect, after a run of flows, denials,
kernel TCP stats and a registry change."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

from agent.identity.ca import init_ca
from agent.identity.node_ca import issue_node_files
from tests.footprint import PYROUTE2_LOADED, pyroute2_mapped
from tests.integration.conftest import free_ports

TD = "footprint.test"
REPO = Path(__file__).resolve().parents[2]


def test_a_ready_agent_has_not_loaded_pyroute2(tmp_path):
    init_ca(TD, tmp_path / "root")
    issue_node_files(tmp_path / "root", "node1", tmp_path / "node-ca")
    (tmp_path / "policies").mkdir()
    registry = tmp_path / "registry.yaml"
    registry.write_text(yaml.safe_dump({
        "trust_domain": TD, "nodes": [{"name": "node1", "address": "127.0.0.1"}],
        "workloads": [{"name": "a-1", "namespace": "shop", "service_account": "a", "ip": "10.1.0.1", "node": "node1"}],
        "services": [{"name": "db", "namespace": "shop", "addresses": ["10.96.0.10"],
                      "ports": [{"port": 5432, "target_port": 5432, "node_port": 30432}],
                      "endpoints": [{"workload": "shop/a-1", "ready": True}]}]}))
    registry.chmod(0o600)
    outbound, inbound, admin = free_ports(3)
    config = {
        "trust_domain": TD, "state_dir": str(tmp_path / "state"), "node": {"name": "node1", "address": "127.0.0.1"},
        "identity": {"mode": "node_ca", "node_ca_dir": str(tmp_path / "node-ca")},
        "registry": {"file": str(registry)}, "policy": {"dir": str(tmp_path / "policies")},
        "capture": {"mode": "none", "cgroup_root": str(tmp_path / "cgroup")},
        "proxy": {"bind_address": "127.0.0.1", "outbound_port": outbound, "inbound_port": inbound},
        "admin": {"address": "127.0.0.1", "port": admin, "socket": str(tmp_path / "agent.sock")},
        "access_log": {"path": "off"}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "config.yaml").chmod(0o600)
    env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
    log_path = tmp_path / "agent.log"
    with open(log_path, "wb") as log:
        agent = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", str(tmp_path / "config.yaml")],
                                 cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert agent.poll() is None, log_path.read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the agent did not turn ready:\n" + log_path.read_text()[-3000:]
            time.sleep(0.2)
        assert not pyroute2_mapped(agent.pid), f"the running agent {PYROUTE2_LOADED}"
        assert "could not read this node's addresses" not in log_path.read_text(), log_path.read_text()[-3000:]
    finally:
        agent.terminate()
        try:
            agent.wait(timeout=15)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait()
