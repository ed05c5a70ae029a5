"""The minting worker (``python -m agent.identity.minting_worker``) and the agent's side of it: the running
agent never imports cryptography, yet loads and checks its node CA, mints and renews SVIDs and
follows a re-issued intermediate; the worker's errors come back as the typed errors the agent had
before, and a worker that does not answer is a MinterError."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from datetime import datetime, timezone
from pathlib import Path

import pytest

from agent.identity import minting_client, minting_worker
from agent.identity.ca import init_ca
from agent.identity.errors import CaError, MinterError, SvidError
from agent.identity.minting_client import load_signing
from agent.identity.node_ca import NODE_KEY_FILE, issue_node_files, load_node_ca
from agent.identity.spiffe import SpiffeId
from agent.identity.bundle import fingerprint

TD = "td.test"
WEB = SpiffeId.parse("spiffe://td.test/ns/shop/sa/web")
REPO = Path(__file__).resolve().parents[2]


def now() -> datetime:
    return datetime.now(timezone.utc)


@pytest.fixture
def node_dir(tmp_path):
    init_ca(TD, tmp_path / "root")
    issue_node_files(tmp_path / "root", "node1", tmp_path / "node1")
    return tmp_path / "node1"


# The agent as `tcpmesh run` builds it (agent.cli → agent.app.Agent → rotator_from_config), driven
# through start, renewal and a node CA change; prints the cryptography modules it imported.
AGENT_SCRIPT = textwrap.dedent("""
    import json, subprocess, sys
    import agent.cli, agent.app
    from agent.app import Agent
    from agent.config import config_from_mapping, validate
    from agent.identity.spiffe import SpiffeId

    node_dir, root_dir, state_dir = sys.argv[1:4]
    config = validate(config_from_mapping({
        "node": {"name": "node1", "address": "10.76.0.1"}, "capture": {"redirect_address": "169.254.1.1"},
        "identity": {"mode": "node_ca", "node_ca_dir": node_dir}, "trust_domain": "td.test", "state_dir": state_dir,
        "access_log": {"path": "off"}}))
    agent_ = Agent(config)
    store = agent_._build_identities()
    web = SpiffeId.parse("spiffe://td.test/ns/shop/sa/web")
    store.ensure([web])
    first = store.svid(web).serial
    renewed = store.renew([web])[web].serial
    subprocess.run([sys.executable, "-m", "agent", "ca", "issue-node", "node1", "--ca", root_dir, "--out", node_dir],
                   check=True, capture_output=True)
    changed = agent_.rotator.check_ca()
    report = agent_.rotator.report({web: ["web-1"]})
    store.client_context_for(web), store.server_context
    print(json.dumps({"modules": sorted(m for m in sys.modules if m.split(".")[0] == "cryptography"),
                      "serials": [first, renewed, store.svid(web).serial], "ca_changed": changed,
                      "report_identity": report["identities"][0]["spiffe_id"]}))
""")


def test_the_agent_never_imports_cryptography_through_start_renewal_and_a_ca_change(node_dir, tmp_path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", AGENT_SCRIPT, str(node_dir), str(node_dir.parent / "root"),
                           str(tmp_path / "state")], capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["modules"] == [], f"the agent imported {result['modules'][:5]}: keep cryptography in agent.identity.minting_worker"
    assert len(set(result["serials"])) == 3 and result["ca_changed"]  # issued, renewed, re-issued under the new CA
    assert result["report_identity"] == WEB.uri


def test_the_worker_loads_what_load_node_ca_loads(node_dir) -> None:
    info = load_signing(str(node_dir), node="node1", now=now())
    signing = load_node_ca(node_dir, node="node1")
    assert info.trust_domain == TD and info.kind == "node intermediate" and info.node == "node1"
    assert info.certificate.fingerprint == fingerprint(signing.ca.certificate)
    assert info.certificate.serial == signing.ca.certificate.serial_number
    assert info.root is not None and info.root.fingerprint == fingerprint(signing.root)
    assert info.bundle_fingerprints == signing.bundle.fingerprints and info.bundle_pem == signing.bundle.pem
    assert info.chain == ((signing.ca.certificate.subject.rfc4514_string(), signing.ca.certificate.serial_number),)
    in_process = load_signing(str(node_dir), node="node1", now=now(), transport=minting_worker.handle)
    assert in_process == info  # the same answer without the pipe (the signer is not compared)


def test_minted_svids_chain_to_the_node_intermediate_and_keys_never_show(node_dir) -> None:
    info = load_signing(str(node_dir), node="node1", now=now())
    other = SpiffeId.parse("spiffe://other.test/ns/a/sa/b")
    results = info.signer.issue_svids([WEB, other], 600, now=now())
    svid = results[WEB]
    assert svid.chain_pem == ((node_dir / "node.crt").read_text(),) and svid.key_pem.startswith("-----BEGIN PRIVATE KEY")
    assert 599 < (svid.not_after - svid.issued_at).total_seconds() <= 600  # X.509 times have whole seconds
    assert isinstance(results[other], SvidError) and "trust domain 'td.test'" in str(results[other])
    node_key = (node_dir / NODE_KEY_FILE).read_text()
    for text in (repr(info), str(info), repr(info.signer), repr(svid)):
        assert "PRIVATE" not in text and node_key.splitlines()[1][:24] not in text


@pytest.mark.parametrize("breakage, message", [
    ("missing", "does not exist; issue this node's CA with `tcpmesh ca issue-node"),
    ("readable key", "group or others may read the CA key; run `chmod 600"),
    ("garbled key", "is not a PEM private key"),
])
def test_the_workers_errors_come_back_typed_and_named(node_dir, breakage, message) -> None:
    if breakage == "missing":
        (node_dir / "node.crt").unlink()
    elif breakage == "readable key":
        (node_dir / NODE_KEY_FILE).chmod(0o644)
    else:
        (node_dir / NODE_KEY_FILE).write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    with pytest.raises(CaError, match="node") as info:
        load_signing(str(node_dir), node="node1", now=now())
    assert message in str(info.value)
    with pytest.raises(CaError) as other:
        load_signing(str(node_dir), node="node1", now=now(), transport=minting_worker.handle)
    assert str(other.value) == str(info.value)


def test_a_worker_that_does_not_answer_is_a_minter_error(node_dir, monkeypatch) -> None:
    info = load_signing(str(node_dir), node="node1", now=now())
    monkeypatch.setattr(minting_client, "MINTER_MODULE", "agent.identity.no_such_minter")
    with pytest.raises(MinterError, match=r"exited with code 1 .*without an answer: .*No module named"):
        info.signer.issue_svids([WEB], 600, now=now())


def test_a_worker_failure_that_is_not_ours_is_named_without_its_input(node_dir) -> None:
    answer = minting_worker.handle({"op": "issue", "material": {"cert_pem": "x", "key_pem": "secret"}, "spiffe_ids": [],
                            "ttl_seconds": 60, "min_ttl_seconds": 60, "now": now().isoformat()})
    assert answer == {"ok": False, "error": {"type": "CaError", "message": answer["error"]["message"]}}
    assert "secret" not in json.dumps(answer)
    with pytest.raises(MinterError, match="knows no operation 'sign'"):
        minting_client.call(minting_worker.handle, {"op": "sign", "now": now().isoformat()})
