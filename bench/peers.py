"""The peers tcpmesh is compared with: two-hop mTLS tunnels through stunnel and through HAProxy.

Each peer runs as one process per node, in the node's network namespace, in the same topology as
tcpmesh: client pod → local tunnel on node1 (plaintext, to the pod gateway) → TLS 1.3 with mutual
certificate authentication across the wire → tunnel on node2 → server pod. Certificates are ECDSA
P-256 SVIDs issued by the lab's CA, like the agents' own.

Both are configured for speed within their defaults: TCP_NODELAY on every leg, no per-connection
logging, TLS 1.3 only, peer certificate chains verified against the lab CA on both sides. Both
keep their default TLS session resumption (the agents, today, do not resume).

Pure: ``*_config`` render text from a ``PeerLayout``; ``world`` writes and starts them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping


@dataclass(frozen=True)
class Service:
    name: str
    client_port: int     # node1, where the client pod connects (via the pod gateway)
    tls_port: int        # node2, where node1's tunnel connects across the wire
    target: tuple[str, int]  # the server pod's address


@dataclass(frozen=True)
class PeerLayout:
    node2_address: str           # node2's wire address
    services: tuple[Service, ...]
    ca_file: str
    cert_file: dict[str, str]    # node name → PEM chain
    key_file: dict[str, str]     # node name → PEM key
    combined_file: dict[str, str]  # node name → chain + key in one PEM (HAProxy's crt)
    log_file: dict[str, str]


PORT_BASE = {"stunnel": 21000, "haproxy": 22000}


def layout_services(peer: str, server_ip: str, echo_port: int, bulk_port: int,
                    extra: Mapping[str, int] | None = None) -> tuple[Service, ...]:
    """echo and bulk, then one service per ``extra`` name → server port (the database scenario's):
    the i-th listens on base + i on node1 and base + 10 + i (TLS) on node2."""
    base = PORT_BASE[peer]
    ports = {"echo": echo_port, "bulk": bulk_port, **(extra or {})}
    if len(ports) > 9:
        raise ValueError(f"at most 9 services per peer, not {len(ports)}")
    return tuple(Service(name, base + i, base + 10 + i, (server_ip, port))
                 for i, (name, port) in enumerate(ports.items(), start=1))


def stunnel_config(layout: PeerLayout, node: str) -> str:
    lines = [
        "; tcpmesh bench: stunnel as a two-hop mTLS tunnel",
        "foreground = yes",
        "pid =",
        "syslog = no",
        f"output = {layout.log_file[node]}",
        "debug = warning",
        "socket = l:TCP_NODELAY=1",
        "socket = r:TCP_NODELAY=1",
        f"cert = {layout.cert_file[node]}",
        f"key = {layout.key_file[node]}",
        f"CAfile = {layout.ca_file}",
        "verifyChain = yes",
        "requireCert = yes",
        "sslVersionMin = TLSv1.3",
        "sslVersionMax = TLSv1.3",
        "",
    ]
    for service in layout.services:
        lines.append(f"[{service.name}]")
        if node == "node1":
            lines += ["client = yes", f"accept = 0.0.0.0:{service.client_port}",
                      f"connect = {layout.node2_address}:{service.tls_port}"]
        else:
            lines += [f"accept = {layout.node2_address}:{service.tls_port}",
                      f"connect = {service.target[0]}:{service.target[1]}"]
        lines.append("")
    return "\n".join(lines)


def haproxy_config(layout: PeerLayout, node: str, maxconn: int = 4096) -> str:
    tls = f"ca-file {layout.ca_file} verify required ssl-min-ver TLSv1.3 ssl-max-ver TLSv1.3"
    lines = [
        "# tcpmesh bench: HAProxy as a two-hop mTLS tunnel",
        "global",
        f"    maxconn {maxconn}",
        "defaults",
        "    mode tcp",
        "    timeout connect 5s",
        "    timeout client 10m",
        "    timeout server 10m",
        "",
    ]
    for service in layout.services:
        if node == "node1":
            lines += [f"listen {service.name}",
                      f"    bind 0.0.0.0:{service.client_port}",
                      f"    server node2 {layout.node2_address}:{service.tls_port} ssl crt "
                      f"{layout.combined_file[node]} {tls}", ""]
        else:
            lines += [f"listen {service.name}",
                      f"    bind {layout.node2_address}:{service.tls_port} ssl crt {layout.combined_file[node]} {tls}",
                      f"    server app {service.target[0]}:{service.target[1]}", ""]
    return "\n".join(lines)


def argv(peer: str, config_path: str) -> list[str]:
    if peer == "stunnel":
        return ["stunnel", config_path]
    return ["haproxy", "-db", "-f", config_path]


def listen_ports(layout: PeerLayout, node: str) -> list[int]:
    return [s.client_port if node == "node1" else s.tls_port for s in layout.services]
