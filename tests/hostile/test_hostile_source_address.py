"""Attack: make the inbound proxy connect to a pod from another workload's address (issue 16, part 2).

The inbound proxy connects to the destination pod from the client pod's own address, so servers can
rule on it (pg_hba.conf, Redis ACLs by address, per-client limits). That address comes from the OPEN
the client node sends. The attacker is a node that holds a genuine certificate for identity A
(``shop``, pod n1p1's — node1's intermediate signs it, as a compromised node1 could) and names, as
the source of its stream, the address of a workload that is *not* A: n1p2 (``other``, same node),
n2p2 (a pod of the destination node itself), an address no workload has, or none at all.

Wanted (docs/security.md, "The client's own address at the server"): the stream is refused with
STATUS DENIED before anything is connected — the server never sees a connection from the borrowed
address, nor from the node's address (which a server may trust more than any pod's) — and the
destination node records why (IDENTITY_ERROR, naming both identities). The honest claim (n1p1's own
address) is served and the server sees exactly that address: the control that proves the attack
reaches the code that decides. The same over IPv6 (the lab is dual stack): the honest claim is served
from n1p1's IPv6 address (seen failing before: the server saw node2's fd00:76::2), another identity's
IPv6 address or an unknown one is DENIED.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from agent.identity.issue import issue_svid
from agent.identity.node_ca import load_node_ca
from agent.identity.spiffe import SpiffeId
from agent.lab import files as lab_files
from agent.lab import lab as labops
from tests.e2e.conftest import Lab

PEERS = str(Path(__file__).with_name("source_peers.py"))
REPO = str(Path(__file__).resolve().parents[2])
PORT = 7420
ACCOUNTS = {"n1p1": "shop", "n1p2": "other", "n2p1": "db", "n2p2": "cache"}


@pytest.fixture(scope="module")
def lab(bpf_capable):
    name = f"hs{uuid.uuid4().hex[:6]}"
    lab = None
    try:
        lab = Lab(name, labops.lab_up(name, 2, 2, "hs.tcpmesh", service_accounts=ACCOUNTS,
                                      identity="node_ca"))  # the attacker signs with node1's intermediate
        whoami = labops.lab_exec(name, "n2p1", [sys.executable, PEERS, "whoami", "--port", str(PORT)],
                                 stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        lab.apps.append(whoami)
        assert "listening" in whoami.stdout.readline()
        yield lab
    finally:
        if lab is not None:
            lab.stop_apps()
        labops.lab_down(name)


@pytest.fixture(scope="module")
def shop_certificate(lab, tmp_path_factory):
    """A genuine SVID for identity A (n1p1's), signed by node1's real intermediate."""
    ca = load_node_ca(lab_files.node_ca_dir(lab.node(1))).ca
    svid = issue_svid(ca, SpiffeId.parse(lab.pod("n1p1").spiffe_id), 3600)
    directory = tmp_path_factory.mktemp("shop")
    chain, key = directory / "shop.crt", directory / "shop.key"
    chain.write_text(svid.full_chain_pem)
    key.touch(mode=0o600)
    key.write_text(svid.key_pem)
    return str(chain), str(key)


def open_stream(lab, certificate, source: str, family: int = 4) -> dict:
    """From node1's netns (the attacker node): one tunnel to node2 as A, one OPEN naming ``source``, to
    n2p1's IPv4 address, or its IPv6 address with ``family`` 6."""
    cert, key = certificate
    dest = lab.pod("n2p1").ip6 if family == 6 else lab.pod("n2p1").ip
    proc = labops.lab_exec(lab.name, "node1", [
        sys.executable, PEERS, "open", "--connect", f"{lab.node(2).wire_address}:15008", "--cert", cert, "--key", key,
        "--sni", SpiffeId.parse(lab.pod("n2p1").spiffe_id).sni, "--dest", f"{dest}:{PORT}",
        "--source", source], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONPATH": REPO})
    out, _ = proc.communicate(timeout=30)
    return json.loads(out.strip().splitlines()[-1])


def test_the_honest_claim_is_served_from_the_clients_own_address(lab, shop_certificate):
    result = open_stream(lab, shop_certificate, lab.pod("n1p1").ip)
    assert result["status"] == "OK" and result["data"].strip() == lab.pod("n1p1").ip, result


@pytest.mark.parametrize("victim", ["n1p2", "n2p2", "nobody", "none"])
def test_a_node_proving_identity_a_cannot_borrow_another_address(lab, shop_certificate, victim):
    source = {"nobody": "10.77.9.99", "none": ""}[victim] if victim in ("nobody", "none") else lab.pod(victim).ip
    since = time.time()
    result = open_stream(lab, shop_certificate, source)
    assert result["status"] == "DENIED", result
    assert result["data"] == "", f"the server was reached (it saw {result['data'].strip()!r}): {result}"
    assert "not to the tunnel's proven identity " + lab.pod("n1p1").spiffe_id in result["reason"], result
    flow = lab.wait_flow(2, lambda f: f["destination_port"] == PORT and f["start_time"] >= since
                         and f["response_flags"] == "IDENTITY_ERROR")
    assert lab.pod("n1p1").spiffe_id in flow["detail"], flow
    if victim in ("n1p2", "n2p2"):
        assert lab.pod(victim).spiffe_id in flow["detail"], flow


# ---- IPv6 (the dual-stack lab) -------------------------------------------------------------------------

@pytest.mark.parametrize("claim", ["ip6", "ip"])
def test_the_honest_claim_is_served_over_ipv6_from_the_clients_own_ipv6_address(lab, shop_certificate, claim):
    """An IPv6 client socket reaches its node's outbound proxy over IPv4, so a claim may name either of
    the workload's addresses: to an IPv6 server the leg borrows its IPv6 address (before: the node's)."""
    result = open_stream(lab, shop_certificate, getattr(lab.pod("n1p1"), claim), family=6)
    assert result["status"] == "OK" and result["data"].strip() == lab.pod("n1p1").ip6, result


@pytest.mark.parametrize("victim", ["n1p2", "n2p2", "nobody"])
def test_a_node_proving_identity_a_cannot_borrow_another_ipv6_address(lab, shop_certificate, victim):
    source = "fd00:77:9::99" if victim == "nobody" else lab.pod(victim).ip6
    result = open_stream(lab, shop_certificate, source, family=6)
    assert result["status"] == "DENIED", result
    assert result["data"] == "", f"the server was reached (it saw {result['data'].strip()!r}): {result}"
    assert "not to the tunnel's proven identity " + lab.pod("n1p1").spiffe_id in result["reason"], result
