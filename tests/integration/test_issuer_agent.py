"""The agent in ``identity.mode: issuer`` against real issuer replicas over TLS on loopback.

The agent's rotator is built as ``tcpmesh run`` builds it (``Agent._build_identities``); keys and CSRs
come from real minting workers. Proves: join with a one-time token writes a node credential that
cannot sign; the node gets the identities it hosts and a workload it does not host stays pending
(its connects refused); with the issuer stopped longer than a renewal period the SVID stays in
service, the failure is logged with the time left and counted, and renewals resume when it returns;
with two replicas, one killed, renewals go on through the other; a restart reuses the credential; the
node credential renews itself; the agent process never imports cryptography.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import stat
import subprocess
import sys
import textwrap
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent.app import Agent
from agent.config import config_from_mapping, validate
from agent.identity.ca import init_ca
from agent.identity.errors import UnknownIdentityError
from agent.identity.issuer_ca import issue_issuer_files
from agent.identity.spiffe import SpiffeId
from agent.issuer.config import issuer_config_from_mapping
from agent.issuer.tokens import create_token_key, load_token_key, make_token

from tests.integration.issuer_world import Replica

TD = "issuer.test"
REPO = Path(__file__).resolve().parents[2]
REGISTRY = f"""
trust_domain: {TD}
nodes:
  - {{name: node1, address: 10.0.0.1}}
  - {{name: node2, address: 10.0.0.2}}
workloads:
  - {{name: a-1, namespace: shop, service_account: a, ip: 10.1.0.1, node: node1}}
  - {{name: b-1, namespace: shop, service_account: b, ip: 10.2.0.1, node: node2}}
  - {{name: c-1, namespace: shop, service_account: c, ip: 10.1.0.3, node: node1}}
"""
A = SpiffeId.parse(f"spiffe://{TD}/ns/shop/sa/a")
B = SpiffeId.parse(f"spiffe://{TD}/ns/shop/sa/b")
C = SpiffeId.parse(f"spiffe://{TD}/ns/shop/sa/c")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def world(tmp_path: Path):
    init_ca(TD, tmp_path / "root")
    issue_issuer_files(tmp_path / "root", tmp_path / "issuer")
    (tmp_path / "workloads.yaml").write_text(REGISTRY)
    create_token_key(tmp_path / "token.key")
    config = issuer_config_from_mapping({
        "trust_domain": TD, "ca_dir": str(tmp_path / "issuer"), "dev_short_ttl": True,
        "max_svid_ttl_seconds": 8, "node_svid_ttl_seconds": 20,
        "registry": {"file": str(tmp_path / "workloads.yaml")},
        "tokens": {"key_file": str(tmp_path / "token.key"), "spent_dir": str(tmp_path / "spent")},
        "metrics": {"port": 0}})
    ports = [free_port(), free_port()]
    replicas: dict[int, Replica] = {}

    def start(i: int) -> Replica:
        replicas[i] = Replica(config, f"issuer-{i}", ports[i])
        return replicas[i]

    def stop(i: int) -> None:
        replicas.pop(i).stop()

    cred = tmp_path / "cred"
    cred.mkdir(mode=0o700)
    (cred / "bundle.pem").write_text((tmp_path / "root" / "ca.crt").read_text())
    (tmp_path / "token").write_text(make_token(load_token_key(tmp_path / "token.key"), "node1", time.time(), 300))
    agent_config = {
        "node": {"name": "node1", "address": "10.76.0.1"}, "capture": {"redirect_address": "169.254.1.1"},
        "trust_domain": TD, "state_dir": str(tmp_path / "state"), "access_log": {"path": "off"},
        "identity": {"mode": "issuer", "svid_ttl_seconds": 8, "dev_short_ttl": True, "poll_seconds": 0.2,
                     "issuer": {"addresses": [f"127.0.0.1:{p}" for p in ports], "credential_dir": str(cred),
                                "bootstrap_token_file": str(tmp_path / "token"), "timeout_seconds": 2}}}
    try:
        yield tmp_path, start, stop, agent_config
    finally:
        for i in list(replicas):
            stop(i)


def build_agent(agent_config: dict) -> Agent:
    agent = Agent(validate(config_from_mapping(agent_config)))
    agent._build_identities()
    return agent


def drive_until(agent: Agent, predicate, timeout: float = 30.0) -> None:
    """Run the rotator's steps (as its task does) until ``predicate()``; polls, no fixed sleeps."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        agent.rotator.check_ca()
        agent.rotator.renew_due()
        time.sleep(0.1)


def test_join_gets_hosted_identities_only_and_the_node_holds_no_signing_key(world):
    tmp_path, start, stop, agent_config = world
    start(0)
    agent = build_agent(agent_config)
    store = agent.rotator.store
    store.ensure([A, B])
    assert store.pending() == {A, B}
    with pytest.raises(UnknownIdentityError):
        store.client_context_for(A)           # a new workload waits: its connects are refused
    drive_until(agent, lambda: A in store)
    store.client_context_for(A)
    assert store.pending() == {B}             # node2's identity is never issued to node1
    with pytest.raises(UnknownIdentityError):
        store.client_context_for(B)
    report = agent.rotator.report()
    assert report["issuer"]["reachable"] is True and report["issuer"]["pending"] == [B.uri]
    assert report["issuer"]["node_credential"]["spiffe_id"] == f"spiffe://{TD}/node/node1"
    # the credential directory: its one key is 0600 and belongs to a CA:false, clientAuth-only leaf — it
    # signs nothing (the issuer's intermediate travels in the chain, its key does not)
    cred = tmp_path / "cred"
    key_file = cred / "credential.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert [p.name for p in cred.iterdir() if "PRIVATE KEY" in p.read_text()] == ["credential.key"]
    key = serialization.load_pem_private_key(key_file.read_bytes(), None)
    leaf = x509.load_pem_x509_certificate((cred / "credential.crt").read_bytes())   # the first block
    assert leaf.public_key().public_numbers() == key.public_key().public_numbers()
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert not leaf.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    assert list(leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]


def test_issuer_down_longer_than_a_renewal_period_keeps_the_svid_then_renewals_resume(world, caplog):
    tmp_path, start, stop, agent_config = world
    start(0)
    start(1)
    agent = build_agent(agent_config)
    store = agent.rotator.store
    store.ensure([A])
    drive_until(agent, lambda: A in store)
    first = store.svid(A)
    stop(0)                                    # one replica killed: renewals go on through the other
    drive_until(agent, lambda: store.svid(A).serial != first.serial)
    second = store.svid(A)
    stop(1)                                    # no issuer at all, for longer than the renewal period (~4 s)
    caplog.set_level(logging.WARNING, "tcpmesh.identity")
    failed = lambda: any("failed" in r.getMessage() and "left" in r.getMessage() for r in caplog.records)  # noqa: E731
    deadline = time.monotonic() + 20
    while not (failed() and (datetime.now(timezone.utc) - second.issued_at).total_seconds() > 4.5):
        assert time.monotonic() < deadline, "no renewal failure was logged"
        agent.rotator.check_ca()
        agent.rotator.renew_due()
        assert store.svid(A).serial == second.serial   # still served (valid 8 s from issuance)
        time.sleep(0.1)
    assert agent.rotator.report()["issuer"]["reachable"] is False
    assert agent.metrics.issuer_up._value.get() == 0
    start(1)
    drive_until(agent, lambda: store.svid(A).serial != second.serial)
    assert agent.rotator.report()["issuer"]["reachable"] is True


def test_a_restart_reuses_the_credential_and_the_node_credential_renews_itself(world):
    tmp_path, start, stop, agent_config = world
    start(0)
    agent = build_agent(agent_config)
    cred_file = tmp_path / "cred" / "credential.crt"
    first = cred_file.read_text()
    (tmp_path / "token").unlink()             # spent anyway; a restart must not need it
    again = build_agent(agent_config)
    again.rotator.store.ensure([A])
    drive_until(again, lambda: A in again.rotator.store)
    drive_until(again, lambda: cred_file.read_text() != first)   # node SVID (20 s) renewed at half life
    assert agent.rotator.report()["issuer"]["node_credential"]["seconds_to_expiry"] is not None


AGENT_SCRIPT = textwrap.dedent("""
    import json, sys, time
    import agent.cli, agent.app
    from agent.app import Agent
    from agent.config import config_from_mapping, validate
    from agent.identity.spiffe import SpiffeId

    agent_ = Agent(validate(config_from_mapping(json.loads(sys.argv[1]))))
    store = agent_._build_identities()
    a = SpiffeId.parse(sys.argv[2])
    store.ensure([a])
    deadline = time.monotonic() + 60
    while a not in store and time.monotonic() < deadline:
        agent_.rotator.renew_due()
        time.sleep(0.1)
    serial = store.svid(a).serial
    store.renew([a])
    print(json.dumps({"modules": sorted(m for m in sys.modules if m.split(".")[0] == "cryptography"),
                      "renewed": store.svid(a).serial != serial}))
""")


def test_the_agent_in_issuer_mode_never_imports_cryptography(world):
    tmp_path, start, stop, agent_config = world
    start(0)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", AGENT_SCRIPT, json.dumps(agent_config), A.uri],
                          capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"modules": [], "renewed": True}


def _accept_queue(port: int) -> int:
    """Connections the kernel completed on ``port``'s listener that nobody accepted yet (``ss`` Recv-Q)."""
    out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=True).stdout
    return sum(int(line.split()[1]) for line in out.splitlines() if line.strip())


def test_a_registry_change_is_not_held_up_by_a_renewal_waiting_for_a_stopped_issuer(world):
    """Issue #18 "issuer down -> agents keep serving": ``ensure`` (the registry reconcile, on the data-path
    event loop) must not wait for the issuer call of a renewal in flight on the rotator's thread."""
    tmp_path, start, stop, agent_config = world
    agent_config["identity"]["issuer"]["timeout_seconds"] = 120   # the renewal waits as long as the issuer is stopped
    replica = start(0)
    port = int(agent_config["identity"]["issuer"]["addresses"][0].rsplit(":", 1)[1])
    agent = build_agent(agent_config)
    store = agent.rotator.store
    store.ensure([A])
    drive_until(agent, lambda: A in store)
    first = store.svid(A)

    gate = threading.Event()                     # the issuer stopped: its loop answers nothing until resumed
    replica.loop.call_soon_threadsafe(gate.wait)
    renewal: dict = {}
    renewer = threading.Thread(target=lambda: renewal.update(store.renew([A])), daemon=True)
    loop = asyncio.new_event_loop()
    loop_thread = threading.Thread(target=loop.run_forever, daemon=True)
    try:
        renewer.start()
        deadline = time.monotonic() + 30
        while _accept_queue(port) == 0:              # the renewal's CSR is now waiting at the issuer
            assert time.monotonic() < deadline, "the renewal never reached the issuer"
            time.sleep(0.05)
        loop_thread.start()

        async def reconcile() -> None:           # as WorkloadRegistry._apply runs it: on the event loop
            store.ensure([A, C])                 # a pod of a new identity scheduled on this node

        done = asyncio.run_coroutine_threadsafe(reconcile(), loop)
        try:
            done.result(timeout=30)              # well before the renewal's 120 s issuer timeout
        except TimeoutError:
            pytest.fail("ensure() on the event loop waited for the renewal's call to the stopped issuer")
        assert not gate.is_set() and renewer.is_alive()   # returned while the issuer was still stopped
        assert store.pending() == {C} and store.svid(A) is first   # served meanwhile
    finally:
        gate.set()                               # resume the issuer
        renewer.join(60)
        if loop_thread.is_alive():
            loop.call_soon_threadsafe(loop.stop)
            loop_thread.join(10)
        loop.close()
    assert isinstance(renewal[A], type(first)) and store.svid(A).serial != first.serial   # the renewal landed
    drive_until(agent, lambda: C in store)       # and the identity added meanwhile was not lost
    assert store.identities == {A, C} and not store.pending()


def _rotate_issuer(tmp_path: Path, replicas, node_dirs_per_step: dict[str, list[Path]]) -> None:
    """`tcpmesh ca rotate` add-root, reissue, remove-old; each step on the issuer's directory and the node directories
    given for it, then one poll of every replica (as it does every registry.poll_seconds)."""
    from agent.identity import root_rotation

    for step, run in (("add-root", root_rotation.add_root), ("reissue", root_rotation.reissue),
                      ("remove-old", root_rotation.remove_old)):
        run(tmp_path / "root-new", [tmp_path / "issuer", *node_dirs_per_step.get(step, [])])
        for replica in replicas:
            replica.poll()


def test_a_node_that_missed_remove_old_is_told_why_and_joins_again_with_a_new_token(world, caplog):
    """The node's credential directory got the new root (add-root) but its agent did not renew under it before
    `reissue` and `remove-old` ran on the issuer: its credential is under the removed root. The agent must say why
    the issuer refuses it and what to do — not a generic failure — show it in `tcpmesh status`, and join again by
    itself once the operator put a new one-time token in its token file, its SVIDs then under the new root
    (`/debug/certs` ``issuer.credential_refused`` is what `tcpmesh status` shows: tests/unit/test_control_status.py).
    Seen failing before: renewals failed with "the issuer refused (removed_root)" as one identity's renewal
    failure, retried for ever with the dead credential; nothing said the node must join again, status said nothing."""
    tmp_path, start, stop, agent_config = world
    replica = start(0)
    agent = build_agent(agent_config)
    store = agent.rotator.store
    store.ensure([A])
    drive_until(agent, lambda: A in store)
    old_serial = store.svid(A).serial
    _rotate_issuer(tmp_path, [replica], {"add-root": [tmp_path / "cred"]})
    caplog.set_level(logging.INFO, "tcpmesh.identity")
    store.renew([A])   # due or not: the next request the node makes with its credential
    drive_until(agent, lambda: (agent.rotator.report()["issuer"].get("credential_refused") or {}).get("reason")
                == "removed_root")
    # the spent token in the file cannot re-join: said, with the command that makes a new one
    drive_until(agent, lambda: "replayed_token" in caplog.text)
    refused = agent.rotator.report()["issuer"]["credential_refused"]
    assert "remove-old" in refused["message"] and "tcpmesh issuer token node1" in refused["message"], refused
    assert "NODE CREDENTIAL REFUSED" in caplog.text and "tcpmesh issuer token node1" in caplog.text
    # the operator makes a new token; the agent joins with it at its next attempt, no restart
    (tmp_path / "token").write_text(make_token(load_token_key(tmp_path / "token.key"), "node1", time.time(), 300))
    drive_until(agent, lambda: agent.rotator.report()["issuer"]["credential_refused"] is None, timeout=90)
    new_root = x509.load_pem_x509_certificate((tmp_path / "root-new" / "ca.crt").read_bytes())
    drive_until(agent, lambda: store.svid(A).serial != old_serial and _root_of(store.svid(A)) == new_root.subject)
    assert "joined the issuer again as node node1" in caplog.text


def _root_of(svid) -> x509.Name:
    return x509.load_pem_x509_certificates("".join(svid.chain_pem).encode())[-1].issuer


def test_an_agent_restarted_after_remove_old_reached_its_directory_joins_again_or_says_why(world):
    """The agent was stopped during `reissue` (so it never renewed under the new root) and `remove-old` then left
    only the new root in its credential directory's bundle: at the next start its credential chains to no root it
    trusts. With the spent token still in its file the start fails naming the cause and the fix; with a new token
    it joins again. Seen failing before: the start adopted the dead credential (present, not expired) and every
    request to the issuer was refused afterwards."""
    from agent.identity.errors import CaError

    tmp_path, start, stop, agent_config = world
    replica = start(0)
    build_agent(agent_config)                    # joined: credential under the old root
    cred = tmp_path / "cred"
    _rotate_issuer(tmp_path, [replica], {step: [cred] for step in ("add-root", "reissue", "remove-old")})
    with pytest.raises(CaError, match=r"no longer in .*bundle\.pem.*remove-old.*missed the rotation.*replayed_token"):
        build_agent(agent_config)
    (tmp_path / "token").write_text(make_token(load_token_key(tmp_path / "token.key"), "node1", time.time(), 300))
    again = build_agent(agent_config)
    again.rotator.store.ensure([A])
    drive_until(again, lambda: A in again.rotator.store)
    new_root = x509.load_pem_x509_certificate((tmp_path / "root-new" / "ca.crt").read_bytes())
    assert _root_of(again.rotator.store.svid(A)) == new_root.subject
