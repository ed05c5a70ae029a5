"""Root rotation with overlap on the default lab (identity mode issuer: no node holds an intermediate).

`tcpmesh ca rotate add-root | reissue | remove-old` walks every node's credential directory and the
issuer's directory, with --wait-admin for every agent and --wait-issuer for both replicas. A long-lived
connection streams through all three steps and new connections go both ways all along: none may fail.
At the end every bundle holds the new root only, every agent's node credential and SVIDs chain to it,
and both issuer replicas sign under it. Seen failing before issuer-mode rotation existed (`ca rotate`
refused the credential directories: "node.crt does not exist").
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from agent.identity.bundle import fingerprint
from agent.identity.ca import load_ca
from agent.lab import issuer as issuer_lab
from agent.lab import lab as labops
from tests.e2e.conftest import module_lab
from tests.e2e.test_identity_lab import ADMIN, PEERS, Prober, certs, run_in


rot_lab = module_lab("rot_lab", "ir", 2, 1, "ir.tcpmesh")  # the default: the issuer


def test_root_rotation_under_the_issuer_keeps_every_flow(rot_lab) -> None:
    lab = rot_lab
    lab.start_server("n2p1", 7101, "echo")
    lab.start_server("n1p1", 7102, "echo")
    old_root = fingerprint(load_ca(lab.plan.ca_dir).certificate)
    before = {i: certs(lab, i)["identities"][0]["serial"] for i in (1, 2)}
    long_lived = labops.lab_exec(lab.name, "n1p1", [sys.executable, PEERS, "stream", "--connect",
                                                    f"{lab.pod('n2p1').ip}:7101"],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    lab.apps.append(long_lived)
    prober = Prober(lab)
    prober.start()
    new_ca = f"{lab.plan.state_dir}/ca-new"
    dirs = [issuer_lab.credential_dir(n) for n in lab.plan.nodes] + [f"{issuer_lab.directory(lab.plan)}/ca"]
    dir_args = [arg for d in dirs for arg in ("--node-dir", d)]
    admins = [arg for n in lab.plan.nodes for arg in ("--wait-admin", ADMIN.format(n.wire_address))]
    issuers = [arg for a in issuer_lab.addresses(lab.plan) for arg in ("--wait-issuer", a)]
    seen_by_step = {}
    try:
        time.sleep(0.5)
        for step in ("add-root", "reissue", "remove-old"):
            count = len(prober.results)
            out = run_in(lab, "node1", [sys.executable, "-m", "agent", "ca", "rotate", step, "--new-ca", new_ca,
                                        *dir_args, *admins, *(issuers if step == "reissue" else []),
                                        "--timeout", "60"], timeout=120)
            assert out.returncode == 0, f"{step}: {out.stdout}"
            assert f"every agent has applied {step}" in out.stdout, out.stdout
            if step == "reissue":
                assert out.stdout.count("signs under the new root") == 2, out.stdout
            while len(prober.results) < count + 2:  # traffic after each step, both directions
                time.sleep(0.05)
            seen_by_step[step] = len(prober.results) - count
    finally:
        prober.stop.set()
        prober.join(timeout=60)
        long_lived.stdin.close()
    result = json.loads(long_lived.stdout.readline())
    assert prober.failures() == [], prober.failures()
    assert result["error"] is None and result["received"] == result["sent"] > 0, result
    assert result["received_sha256"] == result["sent_sha256"]
    assert all(count >= 2 for count in seen_by_step.values()), seen_by_step
    new_root = fingerprint(load_ca(new_ca).certificate)
    assert new_root != old_root
    for i in (1, 2):
        report = certs(lab, i)
        assert [r["fingerprint"] for r in report["trust_bundle"]] == [new_root]
        assert report["node_ca"]["root"]["fingerprint"] == new_root          # the node credential
        (identity,) = report["identities"]
        assert identity["root"]["fingerprint"] == new_root and identity["serial"] != before[i]
        assert report["issuer"]["reachable"] is True and not report["issuer"]["pending"]
    # the node files and the issuer's directory: the new root only
    for directory in dirs:
        assert Path(directory, "bundle.pem").read_text().count("BEGIN CERTIFICATE") == 1
    # the long-lived connection was one flow on each side, clean, spanning the whole rotation
    src = lab.wait_flow(1, lambda f: f["destination_port"] == 7101 and f["bytes_received"] == result["sent"])
    dst = lab.wait_flow(2, lambda f: f["flow_id"] == src["flow_id"])
    assert src["response_flags"] == dst["response_flags"] == "-"
    assert src["duration_seconds"] >= result["seconds"] - 1
