"""Identity on the lab (3 nodes x 1 pod, real agents, real capture): each agent holds only its own node
intermediate; keys stay private and out of logs, metrics and debug endpoints; `tcpmesh cert inspect`
reads a running agent; a root rotation with overlap, driven by `tcpmesh ca rotate --wait-admin`,
keeps traffic flowing at every step (a long-lived connection across all of them, new connections
all along); and peers with bad certificates are refused with the right response flag and a log
line naming the reason — an impostor in place of node3's inbound proxy, and an impostor client.

The tests of this module share one lab and run in file order: the rejection cases replace node3's
agent with impostors, so they come last.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.identity.bundle import fingerprint
from agent.identity.ca import generate_ca, load_ca
from agent.identity.node_ca import NODE_KEY_FILE, issue_node_ca, load_node_ca
from agent.identity.spiffe import SpiffeId
from agent.identity.issue import issue_svid
from agent.identity.svid import Svid
from agent.lab import agents as lab_agents
from agent.lab import files as lab_files
from agent.lab import lab as labops
from tests.e2e.conftest import module_lab

TD = "idlab.tcpmesh"
PEERS = str(Path(__file__).with_name("identity_peers.py"))
ADMIN = "http://{}:15020"


id_lab = module_lab("id_lab", "id", 3, 1, TD, identity="node_ca")


def node_ca_dirs(lab) -> list[str]:
    return [lab_files.node_ca_dir(node) for node in lab.plan.nodes]


def certs(lab, index: int) -> dict:
    return json.loads(lab.admin_get(index, "/debug/certs"))


def agent_log(lab, index: int) -> str:
    return Path(lab.node(index).log_file).read_text(errors="replace")


def run_in(lab, target: str, argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    proc = labops.lab_exec(lab.name, target, argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, _ = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(argv, proc.returncode, out, "")


def exchange(lab, src: str, dst: str, port: int) -> dict:
    return lab.run_client(src, f"{lab.pod(dst).ip}:{port}", 32 * 1024, "echo", name="id-probe")


# ------------------------------------------------------------------------------------------ holding

def test_each_agent_holds_only_its_own_node_intermediate(id_lab) -> None:
    root = load_ca(id_lab.plan.ca_dir).certificate
    for index, node in enumerate(id_lab.plan.nodes, 1):
        signing = load_node_ca(lab_files.node_ca_dir(node), node=node.name)
        report = certs(id_lab, index)
        assert report["node_ca"]["kind"] == "node intermediate" and report["node_ca"]["node"] == node.name
        assert report["node_ca"]["fingerprint"] == fingerprint(signing.ca.certificate)
        assert [r["fingerprint"] for r in report["trust_bundle"]] == [fingerprint(root)]
        (identity,) = report["identities"]  # only the workload registered on this node
        assert identity["spiffe_id"] == id_lab.pod(f"n{index}p1").spiffe_id
        assert identity["workloads"] == [f"n{index}p1"] and identity["state"] == "valid"
        assert identity["chain"][0]["subject"].startswith(f"CN=tcpmesh node CA {node.name} ")
        assert identity["root"]["fingerprint"] == fingerprint(root)
        assert 1400 < identity["seconds_to_renewal"] <= 2160  # half of the default hour, ± 10 % of it
        config = Path(node.config_file).read_text()
        assert id_lab.plan.ca_dir not in config  # the root's directory is nowhere in the agent's config


def test_cert_inspect_reads_the_running_agent(id_lab) -> None:
    node = id_lab.node(1)
    out = run_in(id_lab, "node1", [sys.executable, "-m", "agent", "cert", "inspect", "--admin",
                                   ADMIN.format(node.wire_address), "--workload", "n1p1"])
    assert out.returncode == 0, out.stdout
    assert id_lab.pod("n1p1").spiffe_id + " (n1p1)" in out.stdout
    assert "node intermediate" in out.stdout and "valid" in out.stdout and "BEGIN" not in out.stdout


# ------------------------------------------------------------------------------------------ rotation

class Prober(threading.Thread):
    """New application connections n1p1 → n2p1 and n2p1 → n1p1, one after another, until stopped."""

    def __init__(self, lab) -> None:
        super().__init__(daemon=True)
        self.lab = lab
        self.results: list[tuple[str, dict]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for src, dst, port in (("n1p1", "n2p1", 7101), ("n2p1", "n1p1", 7102)):
                try:
                    result = exchange(self.lab, src, dst, port)
                except Exception as exc:  # recorded, asserted on by the test
                    result = {"error": repr(exc)}
                self.results.append((f"{src}->{dst}", result))

    def failures(self) -> list:
        return [(pair, r) for pair, r in self.results
                if r.get("error") or not r.get("complete") or r["received_sha256"] != r["sent_sha256"]]


def test_root_rotation_with_overlap_keeps_traffic_flowing_at_every_step(id_lab, tmp_path) -> None:
    lab = id_lab
    lab.start_server("n2p1", 7101, "echo")
    lab.start_server("n1p1", 7102, "echo")
    old_root = fingerprint(load_ca(lab.plan.ca_dir).certificate)
    before = {i: certs(lab, i)["identities"][0]["serial"] for i in (1, 2, 3)}
    long_lived = labops.lab_exec(lab.name, "n1p1", [sys.executable, PEERS, "stream", "--connect",
                                                    f"{lab.pod('n2p1').ip}:7101"],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    lab.apps.append(long_lived)
    prober = Prober(lab)
    prober.start()
    new_ca = f"{lab.plan.state_dir}/ca-new"
    node_dirs = [arg for d in node_ca_dirs(lab) for arg in ("--node-dir", d)]
    admins = [arg for n in lab.plan.nodes for arg in ("--wait-admin", ADMIN.format(n.wire_address))]
    seen_by_step = {}
    try:
        time.sleep(0.5)
        for step in ("add-root", "reissue", "remove-old"):
            count = len(prober.results)
            out = run_in(lab, "node1", [sys.executable, "-m", "agent", "ca", "rotate", step, "--new-ca", new_ca,
                                        *node_dirs, *admins, "--timeout", "30"])
            assert out.returncode == 0, f"{step}: {out.stdout}"
            assert f"every agent has applied {step}" in out.stdout
            while len(prober.results) < count + 2:  # traffic after each step, both directions
                time.sleep(0.05)
            seen_by_step[step] = len(prober.results) - count
    finally:
        prober.stop.set()
        prober.join(timeout=30)
        long_lived.stdin.close()
    result = json.loads(long_lived.stdout.readline())
    assert prober.failures() == [], prober.failures()
    assert result["error"] is None and result["received"] == result["sent"] > 0, result
    assert result["received_sha256"] == result["sent_sha256"]
    new_root = fingerprint(load_ca(new_ca).certificate)
    assert new_root != old_root
    for i in (1, 2, 3):
        report = certs(lab, i)
        assert [r["fingerprint"] for r in report["trust_bundle"]] == [new_root]
        assert report["node_ca"]["root"]["fingerprint"] == new_root
        (identity,) = report["identities"]
        assert identity["root"]["fingerprint"] == new_root and identity["serial"] != before[i]
        assert identity["renewals"] >= 1
    # the long-lived connection was one flow on each side, clean, spanning the whole rotation
    src = lab.wait_flow(1, lambda f: f["destination_port"] == 7101 and f["bytes_received"] == result["sent"])
    dst = lab.wait_flow(2, lambda f: f["flow_id"] == src["flow_id"])
    assert src["response_flags"] == dst["response_flags"] == "-"
    assert src["duration_seconds"] >= result["seconds"] - 1
    assert all(count >= 2 for count in seen_by_step.values()), seen_by_step
    log = agent_log(lab, 2)
    assert "reloaded node intermediate" in log and "issued SVID for" in log


def test_running_agents_never_map_cryptography(id_lab) -> None:
    """After start, SVID issuance, renewals and the three rotation steps (CA reloads), no agent has
    cryptography's native module mapped: CA loading and minting ran in short-lived workers."""
    agents = json.loads(Path(id_lab.plan.state_file).read_text())["agents"]
    for index in (1, 2, 3):
        pid = agents[f"node{index}"]["pid"]
        maps = Path(f"/proc/{pid}/maps").read_text()
        assert "/cryptography/" not in maps, f"node{index}'s agent (pid {pid}) mapped cryptography"
        assert "/_ssl." in maps  # the check reads the right process: the agent's TLS is loaded
        assert "minting worker" not in agent_log(id_lab, index)  # no worker failure was logged


# ------------------------------------------------------------------------------------------ rejections

def _forged(ca, uri: str) -> Svid:
    """A leaf naming ``uri`` signed by ``ca`` directly, bypassing issue_svid's trust-domain check."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(timezone.utc)
    cert = ca.sign(x509.CertificateBuilder().subject_name(x509.Name([])).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - timedelta(minutes=1)).not_valid_after(now + timedelta(hours=1))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False),
                                  critical=True)
                   .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=True))
    return Svid(SpiffeId.parse(uri), cert.public_bytes(serialization.Encoding.PEM).decode(),
                key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()).decode(),
                ca.leaf_chain_pem, cert.serial_number, now, now + timedelta(hours=1), now)


@pytest.fixture(scope="module")
def impostors(id_lab, tmp_path_factory):
    """node3's agent stopped; certificates for every bad case, signed with node3's real intermediate
    (a compromised or misbehaving node) or a CA outside the bundle."""
    plan, state = labops.load_lab(id_lab.name)
    record = lab_agents.AgentRecord.from_json(state["agents"]["node3"])
    assert lab_agents.stop_agents({"node3": record}) == [record.pid]
    node3_ca = load_node_ca(lab_files.node_ca_dir(id_lab.node(3))).ca
    n3p1 = SpiffeId.parse(id_lab.pod("n3p1").spiffe_id)
    now = datetime.now(timezone.utc)
    cases = {
        "expired": issue_svid(node3_ca, n3p1, 60, now=now - timedelta(hours=2)),
        "not-yet-valid": issue_svid(node3_ca, n3p1, 3600, now=now + timedelta(hours=1)),
        "other-trust-domain": _forged(node3_ca, "spiffe://evil.example/ns/lab/sa/n3p1"),
        "unknown-ca": issue_svid(issue_node_ca(generate_ca(TD), "node3"), n3p1, 3600),
        "wrong-spiffe-id": issue_svid(node3_ca, SpiffeId.parse(f"spiffe://{TD}/ns/lab/sa/impostor"), 3600),
    }
    directory = tmp_path_factory.mktemp("impostors")
    paths = {}
    for case, svid in cases.items():
        chain, key = directory / f"{case}.crt", directory / f"{case}.key"
        chain.write_text(svid.full_chain_pem)
        key.touch(mode=0o600)
        key.write_text(svid.key_pem)
        paths[case] = (str(chain), str(key))
    return paths


SERVER_CASES = {
    "expired": ("TLS_FAILURE", "peer certificate has expired"),
    "not-yet-valid": ("TLS_FAILURE", "peer certificate is not yet valid"),
    "other-trust-domain": ("TLS_FAILURE", "peer certificate names an identity outside this trust domain"),
    "unknown-ca": ("TLS_FAILURE", "peer certificate was issued by an unknown CA"),
    "wrong-spiffe-id": ("IDENTITY_ERROR", f"peer presented spiffe://{TD}/ns/lab/sa/impostor, "
                                          f"expected spiffe://{TD}/ns/lab/sa/n3p1"),
}


@pytest.mark.parametrize("case", list(SERVER_CASES))
def test_an_impostor_inbound_proxy_is_refused_with_the_reason(id_lab, impostors, case) -> None:
    flag, words = SERVER_CASES[case]
    node3 = id_lab.node(3)
    cert, key = impostors[case]
    rogue = labops.lab_exec(id_lab.name, "node3", [sys.executable, PEERS, "rogue-server", "--bind",
                                                    f"{node3.wire_address}:15008", "--cert", cert, "--key", key],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert "listening" in rogue.stdout.readline()
        port = 7200 + list(SERVER_CASES).index(case)
        result = id_lab.run_client("n1p1", f"{id_lab.pod('n3p1').ip}:{port}", 1024, "echo", name="id-victim")
        assert result.get("error") or not result.get("complete"), result  # nothing reached the impostor
    finally:
        rogue.terminate()
        rogue.wait(timeout=5)
    flow = id_lab.wait_flow(1, lambda f: f["destination_port"] == port)
    assert flow["response_flags"] == flag and words in flow["detail"], (json.dumps(flow), result)
    assert flow["destination_principal"] == id_lab.pod("n3p1").spiffe_id
    assert words in agent_log(id_lab, 1)


CLIENT_CASES = {case: SERVER_CASES[case] for case in ("expired", "not-yet-valid", "other-trust-domain", "unknown-ca")}


@pytest.mark.parametrize("case", list(CLIENT_CASES))
def test_an_impostor_client_is_refused_by_the_inbound_proxy_with_the_reason(id_lab, impostors, case) -> None:
    flag, words = CLIENT_CASES[case]
    node2 = id_lab.node(2)
    cert, key = impostors[case]

    def rejected() -> list[dict]:
        return [f for f in id_lab.flows(2) if f["response_flags"] == flag and words in f["detail"]
                and f["source_ip"] == id_lab.node(3).wire_address]

    before = len(rejected())
    out = run_in(id_lab, "node3", [sys.executable, PEERS, "rogue-client", "--connect", f"{node2.wire_address}:15008",
                                   "--sni", SpiffeId.parse(id_lab.pod("n2p1").spiffe_id).sni, "--cert", cert,
                                   "--key", key])
    assert json.loads(out.stdout.strip().splitlines()[-1])["handshake"] == "failed", out.stdout
    deadline = time.monotonic() + 10
    while len(rejected()) <= before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(rejected()) > before, [{k: f[k] for k in ("response_flags", "detail", "source_ip")}
                                      for f in id_lab.flows(2)]
    assert f"inbound tunnel from {id_lab.node(3).wire_address} rejected: TLS handshake failed: {words}" \
        in agent_log(id_lab, 2)


# ------------------------------------------------------------------------------------------ hygiene

def test_no_key_is_readable_by_others_and_no_pem_leaks(id_lab) -> None:
    """Runs last: everything above has been logged and counted by now."""
    key_files = []
    for top in (id_lab.plan.state_dir, "/run/tcpmesh"):
        for dirpath, _, filenames in os.walk(top):
            for filename in filenames:
                path = Path(dirpath, filename)
                if path.is_symlink() or not path.is_file():
                    continue
                if b"PRIVATE KEY" in path.read_bytes()[:65536]:
                    key_files.append(path)
                    assert path.stat().st_mode & 0o077 == 0, f"{path} is readable by group or others"
    node_keys = {Path(lab_files.node_ca_dir(node), NODE_KEY_FILE) for node in id_lab.plan.nodes}
    # the node intermediates and the lab's (offline) roots; SVID keys never touch a disk (memfd)
    assert node_keys <= set(key_files)
    assert all(p in node_keys or p.name == "ca.key" for p in key_files), key_files
    for index in (1, 2):  # node3's agent was replaced by impostors
        pid = json.loads(Path(id_lab.plan.state_file).read_text())["agents"][f"node{index}"]["pid"]
        fds = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        assert not [fd for fd in fds if "tcpmesh-svid" in fd], "a key memfd was left open"
        outputs = (agent_log(id_lab, index), id_lab.admin_get(index, "/metrics").decode(),
                   id_lab.admin_get(index, "/debug/certs").decode(), id_lab.admin_get(index, "/debug/flows").decode())
        for text in outputs:
            assert "-----BEGIN" not in text and "PRIVATE KEY" not in text
        key_body = "".join(Path(lab_files.node_ca_dir(id_lab.node(index)), NODE_KEY_FILE)
                           .read_text().splitlines()[1:-1])
        assert all(key_body[:32] not in text for text in outputs)
        assert 'tcpmesh_certificate_expiry_timestamp_seconds{workload="' in outputs[1]
        assert "tcpmesh_certificate_renewals_total" in outputs[1]
