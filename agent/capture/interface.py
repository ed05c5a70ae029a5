"""The interface every capture mode offers the agent (``Capture``), with its optional features declared.

A capture mode steers the TCP connections of this node's pods to the outbound proxy and tells the
proxy where each captured connection was going (``origin``). The agent drives it:
``start()`` once, ``attach(w)``/``detach(w)`` as workloads come and go (idempotent), ``origin(sock)``
per accepted connection (the data path: must be cheap), ``stop()`` at the end.

Optional features are attributes that are ``None`` when a mode lacks them, never methods probed
with hasattr: ``inbound`` (ebpf-connect only) enforces each pod's inbound mTLS mode in the kernel;
``egress`` (ebpf-connect only) reports pods' connects outside the mesh; ``refusals`` (ebpf-tc, iptables) counts
the connections their node table resets. Every mode captures only
the mesh: ``set_mesh_destinations`` names it from each registry snapshot (docs/security.md).
Imports only the registry model and capture.origin; the modes import this module, never modes.py.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Protocol

from agent.capture.origin import Origin
from agent.registry.model import Workload


@dataclass(frozen=True)
class ListenerRequirements:
    """How the outbound listener must be opened for this mode."""

    transparent: bool = False  # IP_TRANSPARENT: tc sk_assign and TPROXY deliver foreign destinations


class InboundEnforcement(Protocol):
    """PeerAuthentication in the kernel: STRICT drops plaintext SYNs into a pod (docs/policy.md)."""

    def set_inbound_mode(self, workload: Workload, strict: bool) -> None:
        """STRICT or PERMISSIVE for ``workload`` (an attached pod)."""

    def plaintext(self) -> dict[str, tuple[int, int]]:
        """{pod cgroup path: (plaintext SYNs rejected, accepted)} of the attached pods."""


class EgressEvents(Protocol):
    """The kernel's report of every pod TCP connect outside the mesh (never proxied)."""

    def egress_reader(self, on_event: Callable[[Any], None]) -> Any:
        """An agent.capture.egress.EgressReader handing each event to ``on_event`` (the caller closes it)."""


class NodeRefusals(Protocol):
    """The node table's counts of the SYNs it reset (agent.capture.node_rules): nodePorts and hostPorts, IPv6."""

    def read_refusals(self) -> dict[tuple[str, str, int], int]:
        """{(source address, destination address, port): SYNs reset}; runs nft (call it off the loop)."""


class Capture(Protocol):
    name: str
    listener: ListenerRequirements
    inbound: InboundEnforcement | None  # None: this mode cannot enforce STRICT in the kernel
    egress: EgressEvents | None  # None: no kernel events for connects outside the mesh
    refusals: NodeRefusals | None  # None: this mode resets nothing in the node's table (ebpf-connect refuses at connect)

    def set_mesh_destinations(self, workloads: Iterable[Workload], services: Iterable[tuple[str, int]] = (),
                              node_ports: Iterable[tuple[str, int]] = ()) -> None:
        """Only these workloads' addresses, these Service (virtual address, port) pairs and these
        (node address, nodePort) pairs are captured; every other destination is left alone (it leaves
        from the pod itself). Called before a snapshot's pods are attached. A mode that can only steer
        whole addresses ignores ``node_ports`` (a node's other ports are not the mesh)."""

    def start(self) -> None:
        """Load programs / install node-level rules. Raises a TcpmeshError naming what failed."""

    def attach(self, workload: Workload) -> None:
        """Capture ``workload``'s outbound TCP. Idempotent."""

    def detach(self, workload: Workload) -> None:
        """Stop capturing ``workload``. Idempotent; a workload whose cgroup/netns is gone counts as detached."""

    def origin(self, sock: socket.socket) -> Origin | None:
        """The original destination (and client process, where the mode knows it) of an accepted socket."""

    def stop(self) -> None:
        """Orderly stop: release the agent's handles. A mode that can fail closed (ebpf-connect) leaves
        its kernel state in place, so pods stay captured while no agent runs; `tcpmesh cleanup`
        removes it. Others undo what ``start`` and ``attach`` did."""

    def counters(self) -> dict[str, int]:
        """Per-reason counters of the kernel side (empty when unknown)."""
