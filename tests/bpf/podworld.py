"""A node with routed pods, as the lab builds them, for the ebpf-tc and iptables capture tests.

    node netns   tm<pod> per pod: 169.254.1.1/32 + route <pod ip>/32 (Calico-style), lo up
    pod netns    eth0 <pod ip>/32, 169.254.1.1 scope link, default via it

No other route exists in the node netns, so a destination that is *not* captured fails fast with
"unreachable" (it is never sent anywhere), while a captured one lands on the node's proxy
listener. Every name carries a per-world tag; ``remove()`` deletes the namespaces (veths go
with them). Nothing touches the root netns.
"""

from __future__ import annotations

import select
import socket
import subprocess
import uuid
from dataclasses import dataclass, field

from tests.bpf.bpfworld import NETNS_DIR, socket_in

GATEWAY = "169.254.1.1"
PROXY_PORT = 15001
IP_TRANSPARENT = 19


@dataclass
class Pod:
    name: str
    ip: str
    netns: str
    veth: str   # node side

    @property
    def ns_file(self) -> str:
        return f"{NETNS_DIR}/{self.netns}"


@dataclass
class PodWorld:
    node: str
    pods: dict[str, Pod] = field(default_factory=dict)

    @property
    def node_file(self) -> str:
        return f"{NETNS_DIR}/{self.node}"

    def workload(self, pod: str):
        from agent.registry.model import Workload

        p = self.pods[pod]
        return Workload(name=p.name, namespace="test", service_account=p.name, ip=p.ip, node="node1")

    def listener(self, port: int = PROXY_PORT, transparent: bool = True, address: str = "0.0.0.0") -> socket.socket:
        """A listening socket in the node netns (the proxy: IP_TRANSPARENT, like the agent opens it)."""
        sock = socket_in(self.node_file, None)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if transparent:
            sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        sock.bind((address, port))
        sock.listen(16)
        sock.setblocking(False)
        return sock

    def tc(self, *args: str) -> str:
        return subprocess.run(["tc", "-n", self.node, *args], capture_output=True, text=True, check=True).stdout

    def tc_filters(self, pod: str) -> list[str]:
        """The bpf filters (one line each) on ingress of ``pod``'s node-side veth."""
        shown = self.tc("filter", "show", "dev", self.pods[pod].veth, "ingress")
        return [line for line in shown.splitlines() if " handle " in line]

    def remove(self) -> None:
        from pyroute2 import netns

        for name in [p.netns for p in self.pods.values()] + [self.node]:
            try:
                netns.remove(name)
            except OSError:
                pass


def build_world(pods: int = 2) -> PodWorld:
    from pyroute2 import IPRoute, netns

    from agent.lab.netns_plumbing import set_sysctl

    tag = uuid.uuid4().hex[:6]
    world = PodWorld(node=f"tmpw-n-{tag}")
    netns.create(world.node)
    try:
        set_sysctl(world.node, "net.ipv4.ip_forward", "1")  # a router, like a lab node
        with IPRoute(netns=world.node) as node:
            node.link("set", index=node.link_lookup(ifname="lo")[0], state="up")
            for i in range(1, pods + 1):
                pod = Pod(name=f"p{i}", ip=f"10.77.1.{10 + i}", netns=f"tmpw-p{i}-{tag}", veth=f"tmp{i}{tag}")
                world.pods[pod.name] = pod
                netns.create(pod.netns)
                node.link("add", ifname=pod.veth, kind="veth", peer={"ifname": "eth0", "net_ns_fd": pod.netns})
                h = node.link_lookup(ifname=pod.veth)[0]
                node.addr("add", index=h, address=GATEWAY, prefixlen=32)
                node.link("set", index=h, state="up")
                node.route("add", dst=f"{pod.ip}/32", oif=h)
                with IPRoute(netns=pod.netns) as ipr:
                    e = ipr.link_lookup(ifname="eth0")[0]
                    ipr.addr("add", index=e, address=pod.ip, prefixlen=32)
                    ipr.link("set", index=e, state="up")
                    ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
                    ipr.route("add", dst=f"{GATEWAY}/32", oif=e, scope=253)
                    ipr.route("add", dst="0.0.0.0/0", gateway=GATEWAY, oif=e)
    except BaseException:
        world.remove()
        raise
    return world


def nothing_pending(listener: socket.socket) -> bool:
    return not select.select([listener], [], [], 0.05)[0]


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
