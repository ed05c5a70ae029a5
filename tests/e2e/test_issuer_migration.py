"""Migration of a running cluster from node intermediates to the issuer, with the documented steps
(docs/identity.md "Migrating to the issuer") on a 3-node ``--identity node-ca`` lab:

1. `tcpmesh ca issue-issuer` and `tcpmesh issuer token-key`, then the issuer starts (two replicas);
2. per node: `tcpmesh issuer token <node>` into its join token file, the root into its credential
   directory, `identity.mode: issuer` in its config, then `tcpmesh identity reload` — no restart;
3. every `node.key` deleted.

Checked all along: long-lived connections THROUGH node1 (n1p1 -> n2p1 and n2p1 -> n1p1) and n2p1 ->
n3p1 stream while node1 and then node2 switch, never drop, and node1 counts their bytes on across the
switch; new connections through node1 and between the others never fail meanwhile; after the switch
node1's SVIDs come from the issuer (/debug/certs, and the certificate a peer sees); a node on the
issuer and one on its intermediate accept each other both ways (the same root). A switch without a
usable join token is refused with the field and the fix, and the agent serves on its intermediate.
At the end no node holds a key that can sign, and a restart comes up on the issuer from the edited
config file.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

from agent.admin_client import ask
from agent.control.target import lab_node_socket
from agent.lab import files as lab_files
from agent.lab import issuer as issuer_lab
from agent.lab import lab as labops
from tests.e2e.conftest import module_lab
from agent.identity.spiffe import SpiffeId
from tests.e2e.test_identity_lab import PEERS, certs, exchange, run_in
from tests.e2e.test_issuer_lab import assert_no_node_holds_a_signing_key

TD = "mig.tcpmesh"


mig_lab = module_lab("mig_lab", "mg", 3, 1, TD, identity="node_ca")


def run_tcpmesh(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True, text=True, timeout=timeout)


def tcpmesh(*args: str) -> str:
    out = run_tcpmesh(*args)
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


def prepare(lab, index: int, token: bool = True) -> None:
    """Step 2 for node<index> up to the switch, as an operator does it: the join token (or none), the
    root as the credential directory's bundle, ``identity.mode: issuer`` in the agent's config file."""
    plan = lab.plan
    node = lab.node(index)
    if token:
        value = tcpmesh("issuer", "token", node.name, "--key", f"{issuer_lab.directory(plan)}/token.key").strip()
        Path(issuer_lab.token_file(node)).write_text(value + "\n")
        os.chmod(issuer_lab.token_file(node), 0o600)
    os.makedirs(issuer_lab.credential_dir(node), mode=0o700, exist_ok=True)
    shutil.copy(f"{plan.ca_dir}/ca.crt", f"{issuer_lab.credential_dir(node)}/bundle.pem")
    config = yaml.safe_load(Path(node.config_file).read_text())
    config["identity"] = issuer_lab.agent_identity(plan, node, lab_files.LAB_IDENTITY_POLL_SECONDS, None)
    Path(node.config_file).write_text(yaml.safe_dump(config, sort_keys=False))


def switch(lab, index: int) -> subprocess.CompletedProcess:
    """`tcpmesh identity reload` for node<index>: the running agent switches to its config file's mode."""
    return run_tcpmesh("identity", "reload", "--json", "--lab", lab.name, "--node", lab.node(index).name)


def migrate(lab, index: int) -> dict:
    prepare(lab, index)
    out = switch(lab, index)
    assert out.returncode == 0, f"identity reload of node{index}: {out.stdout}{out.stderr}"
    return json.loads(out.stdout)


def flow_bytes(lab, index: int, ports) -> int:
    """Bytes node<index> counted on its open flows to ``ports`` (its admin socket's flows.list)."""
    socket_path = lab_node_socket(lab.name, lab.node(index).name)
    flows = ask(socket_path, {"op": "flows.list"})["flows"]
    return sum(f["bytes_sent"] + f["bytes_received"] for f in flows
               if f["state"] == "open" and f.get("destination_port") in ports)


def stream_from(lab, src: str, dst: str, port: int):
    proc = labops.lab_exec(lab.name, src, [sys.executable, PEERS, "stream", "--connect", f"{lab.pod(dst).ip}:{port}"],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    lab.apps.append(proc)
    return proc


def stream_result(proc) -> dict:
    proc.stdin.close()
    return json.loads(proc.stdout.readline())


def presented_issuer(lab, from_index: int, to_index: int, spiffe_id: str) -> str:
    """The issuer (subject, RFC 4514) of the SVID node<to_index> presents for ``spiffe_id`` to a new
    tunnel from node<from_index>, as that peer sees it on the wire."""
    from cryptography import x509

    sni = SpiffeId.parse(spiffe_id).sni
    got = run_in(lab, lab.node(from_index).name, [sys.executable, PEERS, "peer-cert", "--connect",
                                                  f"{lab.node(to_index).wire_address}:15008", "--sni", sni])
    doc = json.loads(got.stdout.strip().splitlines()[-1])
    assert doc["pem"], doc
    return x509.load_pem_x509_certificate(doc["pem"].encode()).issuer.rfc4514_string()


def subject_of(path: str) -> str:
    from cryptography import x509

    return x509.load_pem_x509_certificate(Path(path).read_bytes()).subject.rfc4514_string()


def test_a_node_ca_cluster_moves_to_the_issuer_without_a_restart(mig_lab) -> None:
    lab = mig_lab
    plan = lab.plan
    for pod, port in (("n1p1", 7301), ("n2p1", 7302), ("n3p1", 7303), ("n1p1", 7311), ("n2p1", 7312)):
        lab.start_server(pod, port, "echo")
    # 1. the issuer, from the cluster's own root
    tcpmesh("ca", "issue-issuer", "--ca", plan.ca_dir, "--out", f"{issuer_lab.directory(plan)}/ca")
    tcpmesh("issuer", "token-key", "--out", f"{issuer_lab.directory(plan)}/token.key")
    labops.lab_add_issuer(lab.name)

    # hostile first: the config says issuer, but no join token → refused, node1 serves on its intermediate
    node1 = lab.node(1)
    prepare(lab, 1, token=False)
    refused = switch(lab, 1)
    assert refused.returncode == 2, refused
    assert "identity.issuer.bootstrap_token_file" in refused.stderr and "nothing changed" in refused.stderr, refused.stderr
    assert "tcpmesh issuer token" in refused.stderr, refused.stderr
    Path(issuer_lab.token_file(node1)).write_text("not-a-token\n")   # a bad one: the issuer refuses it
    refused = switch(lab, 1)
    assert refused.returncode == 2 and "refused" in refused.stderr and "nothing changed" in refused.stderr, refused
    report = certs(lab, 1)
    assert report["node_ca"]["kind"] == "node intermediate"
    n1p1_id = report["identities"][0]["spiffe_id"]
    node1_intermediate = subject_of(f"{lab_files.node_ca_dir(node1)}/node.crt")
    assert presented_issuer(lab, 2, 1, n1p1_id) == node1_intermediate
    got = exchange(lab, "n1p1", "n2p1", 7302)
    assert got.get("complete") and got["received_sha256"] == got["sent_sha256"], got

    # 2a. node1 switches while connections THROUGH it stream both ways (and n2p1 -> n3p1), and new
    # connections through node1 and between the others are opened all along
    through = [stream_from(lab, "n1p1", "n2p1", 7312), stream_from(lab, "n2p1", "n1p1", 7311)]
    elsewhere = stream_from(lab, "n2p1", "n3p1", 7303)
    others = Pairs(lab, [("n2p1", "n3p1", 7303), ("n3p1", "n2p1", 7302), ("n1p1", "n3p1", 7303),
                         ("n3p1", "n1p1", 7301)])
    others.start()
    try:
        time.sleep(1.0)
        before = flow_bytes(lab, 1, (7311, 7312))
        prepare(lab, 1)
        started = time.monotonic()
        answer = json.loads(switch(lab, 1).stdout)
        switch_seconds = time.monotonic() - started
        at_switch = flow_bytes(lab, 1, (7311, 7312))
        count = len(others.results)
        while len(others.results) < count + 4:
            time.sleep(0.05)
        time.sleep(1.0)
        after = flow_bytes(lab, 1, (7311, 7312))
        # 2b. node2 too, with the same streams still open (n2p1's end of them is on node2)
        node2 = migrate(lab, 2)
        count = len(others.results)
        while len(others.results) < count + 4:
            time.sleep(0.05)
    finally:
        others.stop.set()
        others.join(timeout=60)
        results = [stream_result(p) for p in (*through, elsewhere)]
    print(f"switch of node1: {answer['seconds']:.2f}s in the agent, {switch_seconds:.2f}s for the command; "
          f"node1 counted {before} bytes on the two streams through it before, {at_switch} right after, {after} "
          f"1s later; streams carried {[r['sent'] for r in results]} bytes each way; node2 switched in "
          f"{node2['seconds']:.2f}s")
    assert answer["switched"] and answer["mode"] == "issuer" and answer["identities"] >= 1, answer
    assert node2["switched"] and node2["mode"] == "issuer", node2
    assert others.failures() == [], others.failures()
    for result in results:
        assert result["error"] is None and result["received"] == result["sent"] > 0, result
        assert result["received_sha256"] == result["sent_sha256"]
    assert after > at_switch >= before > 0, (before, at_switch, after)   # the bytes kept counting across it
    report = certs(lab, 1)
    assert report["node_ca"]["kind"].startswith("issuer") and report["issuer"]["reachable"] is True
    assert report["issuer"]["pending"] == [] and report["identities"]
    assert presented_issuer(lab, 2, 1, n1p1_id) == subject_of(f"{issuer_lab.directory(plan)}/ca/issuer.crt")
    assert certs(lab, 3)["node_ca"]["kind"] == "node intermediate"

    # mixed: node1/node2 on the issuer, node3 on its intermediate — they accept each other both ways
    for src, dst, port in (("n1p1", "n3p1", 7303), ("n3p1", "n1p1", 7301), ("n3p1", "n2p1", 7302),
                           ("n1p1", "n2p1", 7302)):
        got = exchange(lab, src, dst, port)
        assert got.get("complete") and got["received_sha256"] == got["sent_sha256"], (src, dst, got)

    # 2c. the last one switches; 3. every node.key goes; a restart stays on the issuer (the config file says so)
    migrate(lab, 3)
    for node in plan.nodes:
        shutil.rmtree(lab_files.node_ca_dir(node))
    labops.lab_restart_agent(lab.name, node1.name)
    for src, dst, port in (("n1p1", "n2p1", 7302), ("n2p1", "n3p1", 7303), ("n3p1", "n1p1", 7301)):
        got = exchange(lab, src, dst, port)
        assert got.get("complete") and got["received_sha256"] == got["sent_sha256"], (src, dst, got)
    for index in (1, 2, 3):
        report = certs(lab, index)
        assert report["node_ca"]["kind"].startswith("issuer") and report["identities"]
        assert "BEGIN" not in json.dumps(report)
    assert_no_node_holds_a_signing_key(lab)   # the hostile scan of test_issuer_lab: no key under any node's directory signs
