"""The benchmark's direct path keeps working after connection churn through tcpmesh (issue #19).

tcpmesh's inbound legs borrow the client pod's address, so node2 holds TIME_WAIT sockets for
(client pod IP, port) -> server. A direct connection from the client pod that picked one of those
ports hung: node2's early demux attached the agent's TIME_WAIT socket to the server's SYN-ACK and
ip_forward dropped it ("rep 2 crr direct: no connection completed through direct" in full runs).
The bench now gives pods and nodes disjoint ephemeral ranges (bench/world.py). No timing asserted.
"""

from __future__ import annotations

import shutil
import subprocess

from bench import scenarios, settings as S
from bench.world import World
from tests.conftest import skip_or_fail


def _port_range(netns: str) -> tuple[int, int]:
    out = subprocess.run(["ip", "netns", "exec", netns, "cat", "/proc/sys/net/ipv4/ip_local_port_range"],
                         capture_output=True, text=True, check=True).stdout.split()
    return int(out[0]), int(out[1])


def _time_wait_ports(netns: str, local_ip: str) -> set[int]:
    """Local ports of TIME_WAIT sockets in ``netns`` whose local address is ``local_ip``."""
    out = subprocess.run(["ip", "netns", "exec", netns, "ss", "-Htan", "state", "time-wait", "src", local_ip],
                         capture_output=True, text=True, check=True).stdout
    return {int(line.split()[2].rsplit(":", 1)[1]) for line in out.splitlines() if line.strip()}


def test_direct_connections_never_pick_a_port_node2s_agent_holds_for_the_client_address(bpf_capable):
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        skip_or_fail("the benchmark's load generator needs a C compiler: `make setup` installs gcc")
    settings = S.with_overrides(S.QUICK, crr_seconds=1.0, crr_warmup=0.2)
    with World(peers_wanted=(), log=lambda *_: None) as world:
        routes = world.paths(("direct", "tcpmesh"))
        churn = scenarios.crr(world, routes["tcpmesh"], settings)
        assert churn["completed"] > 0, churn
        held = _time_wait_ports(world.node2.netns, world.client_pod.ip)
        assert held, "node2's agent left no TIME_WAIT leg with the client pod's address (source_address not pod?)"
        low, high = _port_range(world.client_pod.netns)
        clashing = sorted(p for p in held if low <= p <= high)
        assert not clashing, (f"{len(clashing)} of node2's {len(held)} TIME_WAIT legs use ports the client pod's "
                              f"direct connections can pick ({low}-{high}), e.g. {clashing[:5]}")
        for _ in range(3):  # back to back, as in a repetition: each run must still complete connections
            direct = scenarios.crr(world, routes["direct"], settings)
            assert direct["completed"] > 0 and direct["failed"] == 0, direct
