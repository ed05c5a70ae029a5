"""Attack: be taken for a neighbour pod by the outbound proxy (docs/security.md "Known gaps" 4).

The outbound proxy names a connection's source by the client address it accepts. An attacker pod —
root in its own network namespace, so CAP_NET_ADMIN there, no host privileges — adds its neighbour's
address (a pod of the same node, allowed where the attacker is denied) to its own ``eth0`` and
connects from it to a mesh destination, hoping the proxy takes it for the neighbour: the neighbour's
identity on the tunnel, past the DENY that names the attacker.

- On a network that routes each pod address to that pod's own interface (the lab, Calico, Cilium,
  kindnet) the node sends the proxy's SYN-ACK to the real owner, whose kernel resets it: the
  handshake never completes, in every capture mode (held on today's code).
- On a bridge network (the ``bridge`` CNI plugin, flannel's ``cni0``, kubenet) the attacker also
  answers ARP for the address, and the node's neighbour entry — so every reply — moves to it. The test
  stands in for that spoofed ARP by moving node1's route to the neighbour's address onto the
  attacker's veth (the same effect: the node delivers the neighbour's traffic to the attacker). Then
  the handshake completes, and in ebpf-connect the proxy took the attacker for its neighbour: the
  server answered, the flow named n1p1 (seen failing on main). Now the proxy compares the connect
  hook's record of the client's cgroup with the registry's cgroup of the pod that holds the address
  (agent/proxy/origin_check.py): refused, ``IDENTITY_ERROR``, logged.
  The packet-level modes (ebpf-tc, iptables) keep no record of the client's cgroup; on a bridge
  network all pods sit behind one node interface, so nothing on the node tells them apart but the
  address: there the attack still succeeds (xfail, strict: the day it is closed the test says so).
"""

from __future__ import annotations

import subprocess
import time

import pytest

from tests.e2e.conftest import Lab
from tests.hostile.test_hostile_services_ipv6 import dial, eventually, vault_lab

PORT = 7433
VAULT = ("10.96.0.60", "fd00:96::60")


@pytest.fixture(scope="module", params=["ebpf-connect", "ebpf-tc", "iptables"])
def lab(request, bpf_capable):
    """2 nodes x 2 pods: n1p1 (web, allowed), n1p2 (intruder, denied by name), the server in n2p1."""
    with vault_lab("hs", "hs.tcpmesh", request.param, PORT, VAULT) as lab:
        # the attack's first step, root in its own netns: the neighbour's address on its own interface
        attacker = lab.pod("n1p2")
        subprocess.run(["ip", "-n", attacker.netns, "addr", "add", f"{lab.pod('n1p1').ip}/32", "dev",
                        attacker.ifname], check=True)
        yield lab


def steal(lab: Lab, destination: str) -> dict:
    """n1p2 connects from n1p1's address."""
    return dial(lab, "n1p2", destination, port=PORT, marker="stolen", bind=lab.pod("n1p1").ip)


@pytest.fixture
def replies_to_the_attacker(lab):
    """What a spoofed ARP does on a bridge network: node1 delivers the neighbour's traffic to the attacker."""
    node, victim, attacker = lab.node(1), lab.pod("n1p1"), lab.pod("n1p2")
    subprocess.run(["ip", "-n", node.netns, "route", "replace", f"{victim.ip}/32", "dev", attacker.node_ifname],
                   check=True)
    try:
        yield
    finally:
        subprocess.run(["ip", "-n", node.netns, "route", "replace", f"{victim.ip}/32", "dev", victim.node_ifname],
                       check=True)


@pytest.mark.parametrize("target", ["pod", "service"])
def test_a_pod_that_takes_its_neighbours_address_never_completes_the_handshake(lab, target):
    """Held on today's code in every mode (the guard fails where replies reach the attacker: below)."""
    result = steal(lab, lab.pod("n2p1").ip if target == "pod" else VAULT[0])
    assert "secret" not in result.get("got", ""), \
        f"{lab.capture_mode}: n1p2 was taken for n1p1 and read the server past its DENY: {result}"
    assert result.get("error") in ("TimeoutError", "ConnectionResetError", "ConnectionRefusedError"), result


@pytest.mark.parametrize("target", ["pod", "service"])
def test_with_the_replies_spoofed_to_it_a_pod_is_still_not_taken_for_its_neighbour(
        lab, target, replies_to_the_attacker, request):
    if lab.capture_mode != "ebpf-connect":
        request.applymarker(pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
            "docs/security.md Known gaps 4: the packet-level modes name the source by address only, and on a "
            "bridge network nothing on the node tells the pods apart")))
    since = time.time()
    result = steal(lab, lab.pod("n2p1").ip if target == "pod" else VAULT[0])
    assert "secret" not in result.get("got", ""), \
        f"{lab.capture_mode}: n1p2 was taken for n1p1 and read the server past its DENY: {result}"
    refused = []
    eventually(lambda: refused.extend(f for f in lab.flows(1) if f["start_time"] >= since
                                      and f["response_flags"] == "IDENTITY_ERROR") or refused,
               "no IDENTITY_ERROR flow on node1 for the stolen address", 10)
    flow = refused[0]
    assert flow["source_workload"] != "n1p1" and "n1p2" in flow.get("detail", ""), flow
    log = open(lab.node(1).log_file).read()
    assert "a pod is using another pod's address" in log and "n1p2's cgroup" in log, "the refusal is not in node1's log"
