"""Migration of a running cluster from node intermediates to the issuer, with the documented steps
(docs/identity.md "Migrating to the issuer") on a 3-node ``--identity node-ca`` lab:

1. `tcpmesh ca issue-issuer` and `tcpmesh issuer token-key`, then the issuer starts (two replicas);
2. per node: `tcpmesh issuer token <node>` into its join token file, the root into its credential
   directory, `identity.mode: issuer` in its config, a restart of its agent;
3. every `node.key` deleted.

Checked all along: a long-lived connection n2p1 -> n3p1 streams while node1 migrates (no flow that does
not pass through the restarting agent drops); new connections between the nodes not being restarted
never fail; a node on the issuer and a node on its intermediate accept each other both ways (the same
root); at the end no node holds a key that can sign and every SVID comes from the issuer.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import yaml

from agent.lab import files as lab_files
from agent.lab import issuer as issuer_lab
from agent.lab import lab as labops
from tests.e2e.conftest import Lab
from tests.e2e.test_identity_lab import PEERS, certs, exchange
from tests.e2e.test_issuer_lab import assert_no_node_holds_a_signing_key

TD = "mig.tcpmesh"


@pytest.fixture(scope="module")
def mig_lab(bpf_capable):
    name = f"mg{uuid.uuid4().hex[:6]}"
    lab = None
    try:
        lab = Lab(name, labops.lab_up(name, 3, 1, TD, identity="node_ca"))
        yield lab
    finally:
        if lab is not None:
            lab.stop_apps()
        labops.lab_down(name)


def tcpmesh(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"tcpmesh {' '.join(args)}: {out.stdout}{out.stderr}"
    return out.stdout


class Pairs(threading.Thread):
    """New application connections over the given (src, dst, port) pairs, one after another, until stopped."""

    def __init__(self, lab, pairs) -> None:
        super().__init__(daemon=True)
        self.lab, self.pairs = lab, pairs
        self.results: list[tuple[str, dict]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for src, dst, port in self.pairs:
                try:
                    result = exchange(self.lab, src, dst, port)
                except Exception as exc:  # recorded, asserted on by the test
                    result = {"error": repr(exc)}
                self.results.append((f"{src}->{dst}", result))

    def failures(self) -> list:
        return [(pair, r) for pair, r in self.results
                if r.get("error") or not r.get("complete") or r["received_sha256"] != r["sent_sha256"]]


def migrate(lab, index: int) -> None:
    """Step 2 for node<index>, as an operator does it."""
    plan = lab.plan
    node = lab.node(index)
    token = tcpmesh("issuer", "token", node.name, "--key", f"{issuer_lab.directory(plan)}/token.key").strip()
    Path(issuer_lab.token_file(node)).write_text(token + "\n")
    os.chmod(issuer_lab.token_file(node), 0o600)
    os.makedirs(issuer_lab.credential_dir(node), mode=0o700, exist_ok=True)
    shutil.copy(f"{plan.ca_dir}/ca.crt", f"{issuer_lab.credential_dir(node)}/bundle.pem")
    config = yaml.safe_load(Path(node.config_file).read_text())
    config["identity"] = issuer_lab.agent_identity(plan, node, lab_files.LAB_IDENTITY_POLL_SECONDS, None)
    Path(node.config_file).write_text(yaml.safe_dump(config, sort_keys=False))
    labops.lab_restart_agent(lab.name, node.name)   # waits for ready and for the first SVIDs from the issuer


def test_a_node_ca_cluster_moves_to_the_issuer_with_the_documented_steps(mig_lab) -> None:
    lab = mig_lab
    plan = lab.plan
    for pod, port in (("n1p1", 7301), ("n2p1", 7302), ("n3p1", 7303)):
        lab.start_server(pod, port, "echo")
    # 1. the issuer, from the cluster's own root
    tcpmesh("ca", "issue-issuer", "--ca", plan.ca_dir, "--out", f"{issuer_lab.directory(plan)}/ca")
    tcpmesh("issuer", "token-key", "--out", f"{issuer_lab.directory(plan)}/token.key")
    labops.lab_add_issuer(lab.name)

    # 2a. node1 switches while n2p1 -> n3p1 streams and n2 <-> n3 connect all along
    stream = labops.lab_exec(lab.name, "n2p1", [sys.executable, PEERS, "stream", "--connect",
                                                f"{lab.pod('n3p1').ip}:7303"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    lab.apps.append(stream)
    others = Pairs(lab, [("n2p1", "n3p1", 7303), ("n3p1", "n2p1", 7302)])
    others.start()
    try:
        time.sleep(0.5)
        migrate(lab, 1)
        count = len(others.results)
        while len(others.results) < count + 2:
            time.sleep(0.05)
    finally:
        others.stop.set()
        others.join(timeout=60)
        stream.stdin.close()
    result = json.loads(stream.stdout.readline())
    assert others.failures() == [], others.failures()
    assert result["error"] is None and result["received"] == result["sent"] > 0, result
    assert result["received_sha256"] == result["sent_sha256"]
    report = certs(lab, 1)
    assert report["node_ca"]["kind"].startswith("issuer") and report["issuer"]["reachable"] is True
    assert certs(lab, 2)["node_ca"]["kind"] == "node intermediate"

    # mixed: node1 on the issuer, node2 and node3 on their intermediates — they accept each other both ways
    for src, dst, port in (("n1p1", "n2p1", 7302), ("n2p1", "n1p1", 7301), ("n3p1", "n1p1", 7301)):
        got = exchange(lab, src, dst, port)
        assert got.get("complete") and got["received_sha256"] == got["sent_sha256"], (src, dst, got)

    # 2b. the others switch; 3. every node.key goes
    migrate(lab, 2)
    migrate(lab, 3)
    for node in plan.nodes:
        shutil.rmtree(lab_files.node_ca_dir(node))
    for src, dst, port in (("n1p1", "n2p1", 7302), ("n2p1", "n3p1", 7303), ("n3p1", "n1p1", 7301)):
        got = exchange(lab, src, dst, port)
        assert got.get("complete") and got["received_sha256"] == got["sent_sha256"], (src, dst, got)
    for index in (1, 2, 3):
        report = certs(lab, index)
        assert report["node_ca"]["kind"].startswith("issuer") and report["identities"]
        assert "BEGIN" not in json.dumps(report)
    assert_no_node_holds_a_signing_key(lab)   # the hostile scan of test_issuer_lab: no key under any node's directory signs
