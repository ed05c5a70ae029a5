"""The facts of one application connection: one frozen value from the capture to the tunnel to the other node.

Built once where they become known — the outbound proxy, from the capture's origin record and the
accepted socket's peer — then carried unchanged: the OPEN frame's CONNECT body is their wire form
(``agent.proxy.header``), the destination node decodes the same value and records it, and each
node's ``Flow`` refers to it instead of copying its fields. What changes while the connection lives
(identities resolved, bytes, times, the outcome) is the ``Flow``'s, never this value's.

Pure: imports nothing of the agent.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ClientProcess:
    """The process that called connect(), as the source node's capture saw it (attribution only)."""

    pid: int
    uid: int
    comm: str


@dataclass(frozen=True, slots=True)
class ConnectionFacts:
    destination_ip: str = ""  # where the client asked to go (the original destination)
    destination_port: int = 0
    flow_id: bytes = b""  # 8 random bytes: both nodes record the connection under it
    source_ip: str = ""  # the client's address as the source node saw it (or the tunnel's peer)
    source_port: int = 0
    process: ClientProcess | None = None
    cgroup_id: int | None = None  # the client's cgroup; known on the source node only (not sent)
    service: str = ""  # namespace/name of the Service the client dialled ("": a workload address)


NO_FACTS = ConnectionFacts()  # a flow before anything is known (a tunnel that failed its handshake early)
