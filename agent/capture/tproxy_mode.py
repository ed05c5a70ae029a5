"""The iptables capture mode: netfilter TPROXY in the node netns for TCP entering from pod interfaces.

``TproxyCapture`` implements the ``Capture`` interface (agent.capture.interface):
  - ``start()``: installs the rules (agent.capture.netfilter) with the first backend that works —
    native nft, then iptables-nft, then iptables-legacy — remembering why the others failed
    (``backend_errors``); removes whatever the other backends hold of ours (a previous run's);
    installs the fwmark rule and local table (agent.capture.steering);
  - ``attach(w)``: the interface the node routes ``w.ip`` through joins the captured set;
  - ``origin(sock)``: getsockname() of the accepted socket (agent.capture.transparent);
  - ``stop()``: removes the rules of every backend and the steering objects.
The outbound listener must be IP_TRANSPARENT (``listener``).

``find_leftovers`` / ``cleanup_leftovers`` find and remove, by name, what a crashed run left in a
namespace (every backend). Must not import bcc, the proxy or telemetry packages.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
from typing import Iterable, Sequence

from agent.capture import abi, node_rules, steering
from agent.capture.node_rules import NodeRules, node_destinations
from agent.capture.cidrs import DEFAULT_CAPTURE_CIDRS
from agent.capture.interface import ListenerRequirements
from agent.capture.meshdsts import ipv4_mesh_cidrs
from agent.capture.netfilter import BACKEND_ORDER, Backend, NetfilterError, backend, cidr_rules, spec_for
from agent.capture.netns import describe
from agent.capture.origin import Origin
from agent.capture.transparent import TransparentOrigins
from agent.errors import EnvironmentProblem
from agent.registry.model import Workload

log = logging.getLogger("tcpmesh.capture")


class TproxyCapture:
    name = "iptables"
    listener = ListenerRequirements(transparent=True)
    inbound = None  # no kernel enforcement of STRICT in this mode
    egress = None  # no kernel events of connects outside the mesh

    @property
    def refusals(self) -> NodeRules:
        """The node table (agent.capture.node_rules): it counts the SYNs it resets, per source."""
        return self._node_rules

    def __init__(self, listen_address: str, listen_port: int, *, netns: str | None = None,
                 backends: Sequence[str] = BACKEND_ORDER, capture_cidrs: Sequence[str] = DEFAULT_CAPTURE_CIDRS,
                 bypass_cidrs: Sequence[str] = (), passthrough_deny: bool = False) -> None:
        self.netns = netns
        self.spec = spec_for(listen_address, listen_port, abi.STEER_MARK, capture_cidrs, bypass_cidrs)
        self._scope = (tuple(capture_cidrs), tuple(bypass_cidrs))  # what set_mesh_destinations narrows
        self._passthrough_deny = passthrough_deny  # then the whole scope stays steered (see TcCapture)
        self.backend_order = tuple(backends)
        for name in self.backend_order:
            backend(name)  # unknown names fail here, not at start()
        self.backend: Backend | None = None
        self.backend_errors: dict[str, str] = {}
        self._origins = TransparentOrigins()
        self._attached: dict[str, str] = {}  # workload key -> interface
        self._vips4: tuple[str, ...] = ()  # Service IPv4 addresses: captured even when the node holds them
        self._node_rules = NodeRules(self.name, netns, refuse_all6=passthrough_deny)  # agent.capture.node_rules

    # ---- Capture interface ---------------------------------------------------------------------

    def start(self) -> None:
        if self.backend is not None:
            return
        self.backend_errors = {}
        for name in self.backend_order:
            candidate = backend(name, self.netns)
            try:
                candidate.install(self.spec)
            except NetfilterError as exc:
                self.backend_errors[name] = str(exc)
                _quietly_remove(candidate)
                continue
            self.backend = candidate
            break
        if self.backend is None:
            raise EnvironmentProblem("capture mode iptables: no netfilter backend could install the TPROXY rules "
                                     f"in {describe(self.netns)}:\n" +
                                     "\n".join(f"  {n}: {e}" for n, e in self.backend_errors.items()))
        for name in BACKEND_ORDER:  # a previous run's rules in another backend
            if name != self.backend.name:
                for item in backend(name, self.netns).remove():
                    log.info("removed leftover %s", item)
        steering.ensure(self.netns)
        self._origins.local = steering.local_addresses(self.netns) - frozenset(self._vips4)
        log.info("iptables mode: TPROXY rules installed with %s%s", self.backend.name,
                 "".join(f"; {n} failed: {e}" for n, e in self.backend_errors.items()))

    def set_mesh_destinations(self, workloads: Iterable[Workload], services: Iterable[tuple[str, int]] = (),
                              node_ports: Iterable[tuple[str, int]] = ()) -> None:
        """Only the mesh is captured: one rule per IPv4 workload address inside the capture CIDRs
        (the capture chain is rebuilt in one transaction; the interface set is kept). Every other
        destination is left alone: it leaves from the pod, the proxy never dials it — unless
        passthrough is DENY: then the whole scope stays steered and the proxy refuses it.
        IPv6 to the mesh is refused and Service IPv4 addresses skip conntrack (agent.capture.node_rules).
        ``node_ports`` are not steered (that would take the node address's other ports too): a pod's SYN to one
        is reset on its node (agent.capture.node_rules), never left to kube-proxy's plaintext DNAT."""
        workloads, services = tuple(workloads), tuple(services)
        self._node_rules.set_mesh((w.ip6 for w in workloads if w.ip6), services, node_ports)
        # a Service address that is also the node's own (kube-proxy IPVS: every ClusterIP on kube-ipvs0)
        self._vips4 = node_destinations((), services)[2]
        self.spec = dataclasses.replace(self.spec, local_mesh=self._vips4)
        if not self._passthrough_deny:
            mesh = ipv4_mesh_cidrs([w.ip for w in workloads] + [address for address, _ in services], *self._scope)
            self.spec = dataclasses.replace(self.spec, cidr_rules=cidr_rules(mesh))
        if self.backend is not None:
            self.backend.install(self.spec)
            self._origins.local = steering.local_addresses(self.netns) - frozenset(self._vips4)

    def attach(self, workload: Workload) -> None:
        backend_ = self._require_started()
        _, ifname = steering.route_interface(workload.ip, self.netns)
        if self._attached.get(workload.key) == ifname:
            return
        self._origins.local = steering.local_addresses(self.netns) - frozenset(self._vips4)
        backend_.add_interface(ifname)
        previous = self._attached.get(workload.key)
        self._attached[workload.key] = ifname
        if previous is not None:
            self._release(previous)
        self._node_rules.set_interfaces(self._attached)

    def detach(self, workload: Workload) -> None:
        ifname = self._attached.pop(workload.key, None)
        if ifname is not None:
            self._release(ifname)
            self._node_rules.set_interfaces(self._attached)

    def origin(self, sock: socket.socket) -> Origin | None:
        return self._origins.origin(sock)

    def stop(self) -> None:
        """Remove our rules (the chosen backend's; start() already cleared the others) and steering."""
        self._attached.clear()
        if self.backend is not None:
            self.backend.remove()
            self.backend = None
        steering.remove(self.netns)
        self._node_rules.remove()

    def counters(self) -> dict[str, int]:
        return {}

    # ---- more ----------------------------------------------------------------------------------

    def attachments(self) -> dict[str, str]:
        return dict(sorted(self._attached.items()))

    def _release(self, ifname: str) -> None:
        if ifname not in self._attached.values() and self.backend is not None:
            self.backend.remove_interface(ifname)

    def _require_started(self) -> Backend:
        if self.backend is None:
            raise EnvironmentProblem("TproxyCapture.start() has not run (or stop() already did)")
        return self.backend


def _quietly_remove(candidate: Backend) -> None:
    try:
        candidate.remove()
    except NetfilterError:
        pass  # it failed to install; what it could not remove, find_leftovers still reports


def find_leftovers(netns: str | None = None) -> list[str]:
    """Every nft table / iptables chain and jump of tcpmesh, and the steering objects, in ``netns``."""
    found: list[str] = []
    for name in BACKEND_ORDER:
        found += backend(name, netns).present()
    return found + [f"{item} in {describe(netns)}" for item in steering.present(netns)] + node_rules.present(netns)


def cleanup_leftovers(netns: str | None = None, dry_run: bool = False) -> list[str]:
    """Remove every nft table, iptables chain and jump tcpmesh made (all backends), the fwmark rule
    and the local table in ``netns`` (None: this one). Returns what was removed (``dry_run``: what
    would be, removing nothing); safe to run twice."""
    if dry_run:
        return find_leftovers(netns)
    removed: list[str] = []
    for name in BACKEND_ORDER:
        removed += backend(name, netns).remove()
    return removed + steering.remove(netns) + node_rules.remove(netns)
