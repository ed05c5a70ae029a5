"""Connections the packet-level capture modes (ebpf-tc, iptables) reset in the node's nftables table, made
visible: a pod's SYN to a nodePort or hostPort at a node's address (these modes cannot mesh one port of an
address), or to the mesh over IPv6 (they carry IPv4 only), or outside the mesh over IPv6 under
``policy.outbound_passthrough: DENY``. The pod sees ECONNREFUSED; until this module nothing else did.

The kernel counts each reset per (source address, destination address, port) (agent.capture.node_rules,
sets ``refused4``/``refused6``). Every ``READ_SECONDS`` the agent reads those counts on a worker thread
(two ``nft`` runs, ≈ 4 ms of CPU each — never on the data path, and only in those modes), and on its loop
``RefusalReport`` turns the increase into ``tcpmesh_node_refused_connections_total{source_workload,
source_workload_namespace, source_principal, reason}`` (no addresses, no ports: bounded by the workloads)
and one warning per source pod per read that names the pod, what it dialled, why it was refused and the
fix. ``classify`` and ``increases`` are pure. Must not import the capture or proxy packages.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from dataclasses import dataclass
from typing import Callable, Mapping

from agent.registry.model import Registry, Workload

log = logging.getLogger("tcpmesh.telemetry")

READ_SECONDS = 10.0  # how often the kernel's counts are read; the warning is at most one per pod per read
WARNINGS_PER_READ = 20  # sources named per read at most (spoofed source addresses must not flood the log)
RECENT_SECONDS = 600.0  # a source's last refusal is kept this long for `tcpmesh status`
NODE_PORT, HOST_PORT, IPV6, IPV6_OUTSIDE_MESH = "node_port", "host_port", "ipv6", "ipv6_outside_mesh"
REASONS = (NODE_PORT, HOST_PORT, IPV6, IPV6_OUTSIDE_MESH)

Key = tuple[str, str, int]  # (source address, destination address, port)


@dataclass(frozen=True)
class Refusal:
    source: Workload | None  # the registry's workload at the source address; None: no workload has it
    source_address: str
    reason: str              # one of REASONS
    what: str                # what the pod dialled, for the log: "nodePort 30761 at 10.76.0.2 (Service lab/vault)"
    why: str
    fix: str


def classify(registry: Registry | None, mode: str, key: Key) -> Refusal:
    """Why the node's table reset a SYN from ``key[0]`` to ``key[1]:key[2]`` (pure: the registry in force now)."""
    source, destination, port = key
    workload = registry.by_ip(source) if registry is not None else None
    ipv6 = isinstance(ipaddress.ip_address(destination), ipaddress.IPv6Address)
    node_address = registry is not None and any(destination in n.addresses for n in registry.nodes.values())
    host_port = registry.host_port_at(destination, port) if registry is not None else None
    service = registry.service_at(destination, port) if registry is not None else None
    cannot = (f"capture mode {mode} cannot mesh one port of a node's address, so the SYN is reset rather than left to "
              "the node's plaintext DNAT past policy")
    if host_port is not None:
        pod, target = host_port
        return Refusal(workload, source, HOST_PORT, f"hostPort {port} at {destination} (pod {pod.key})", cannot,
                       f"dial the pod at {pod.ip}:{target} or a Service in front of it (meshed), or set capture.mode "
                       "ebpf-connect (it meshes hostPorts and nodePorts)")
    if service is not None and (node_address or not ipv6):
        svc, target = service[0], service[1]
        vips = [a for a in svc.addresses if ":" not in a] or list(svc.addresses)
        ports = [p.port for p in svc.ports if p.target_port == target] or [p.port for p in svc.ports]
        at = f" at {vips[0]}:{ports[0]}" if vips and ports else ""  # the ClusterIP port to the same target port
        return Refusal(workload, source, NODE_PORT, f"nodePort {port} at {destination} (Service {svc.key})", cannot,
                       f"dial the Service{at} (meshed), or set capture.mode ebpf-connect (it meshes nodePorts and "
                       "hostPorts)")
    if not ipv6:
        return Refusal(workload, source, NODE_PORT, f"port {port} at node address {destination}", cannot,
                       "dial the Service's ClusterIP (meshed), or set capture.mode ebpf-connect (it meshes nodePorts "
                       "and hostPorts)")
    target = registry.by_ip(destination) if registry is not None else None
    if target is not None or service is not None:
        name = f"pod {target.key}" if target is not None else f"Service {service[0].key}"
        return Refusal(workload, source, IPV6, f"[{destination}]:{port} ({name}) over IPv6",
                       f"capture mode {mode} carries IPv4 only, so IPv6 to the mesh is reset rather than sent in "
                       "plaintext past policy",
                       "dial its IPv4 address (meshed), or set capture.mode ebpf-connect (it meshes IPv6)")
    return Refusal(workload, source, IPV6_OUTSIDE_MESH, f"[{destination}]:{port} outside the mesh over IPv6",
                   "policy.outbound_passthrough is DENY: connections outside the mesh are refused, IPv6 ones in the "
                   "node's table", "set policy.outbound_passthrough ALLOW if pods may reach outside the mesh")


def increases(last: Mapping[Key, int], now: Mapping[Key, int]) -> dict[Key, int]:
    """The count each key gained since ``last`` (pure). A count below its last value started again (its element
    timed out, or the table was replaced): all of it is new."""
    found = {}
    for key, value in now.items():
        before = last.get(key, 0)
        gained = value - before if value >= before else value
        if gained > 0:
            found[key] = gained
    return found


class RefusalReport:
    """The increase of each read → the counter, and one warning per source pod."""

    def __init__(self, mode: str, registry: Callable[[], Registry | None],
                 count: Callable[[Refusal, int], None]) -> None:
        self._mode = mode
        self._registry = registry
        self._count = count          # Metrics.node_refused
        self._last: dict[Key, int] = {}
        self.recent: dict[str, dict] = {}  # source pod (or address) → its last refusal, for `tcpmesh status`

    def on_counts(self, counts: Mapping[Key, int], window: float, now: float | None = None) -> None:
        """``counts``: the kernel's now; ``window``: seconds since the last read (said in the warning)."""
        gained = increases(self._last, counts)
        self._last = dict(counts)
        registry = self._registry()
        by_source: dict[str, list[tuple[Refusal, int]]] = {}
        for key, n in sorted(gained.items()):
            refusal = classify(registry, self._mode, key)
            self._count(refusal, n)
            name = refusal.source.key if refusal.source is not None else refusal.source_address
            by_source.setdefault(name, []).append((refusal, n))
        now = time.time() if now is None else now
        self.recent = {k: v for k, v in self.recent.items() if now - v["at"] <= RECENT_SECONDS}
        if len(by_source) > WARNINGS_PER_READ:
            rest = sorted(by_source)[WARNINGS_PER_READ:]
            log.warning("capture mode %s reset connections from %d more source(s) in the last %.0fs (%s, ...): "
                        "tcpmesh_node_refused_connections_total counts them all", self._mode, len(rest), window,
                        ", ".join(rest[:5]))
            by_source = {k: by_source[k] for k in sorted(by_source)[:WARNINGS_PER_READ]}
        for name, refusals in by_source.items():
            total = sum(n for _, n in refusals)
            first = refusals[0][0]
            who = f"pod {name} ({first.source_address})" if first.source is not None else \
                f"{first.source_address} (no workload of the registry)"
            whats = "; ".join(f"{r.what}" + (f" x{n}" if n > 1 else "") for r, n in refusals)
            reasons = list(dict.fromkeys((r.why, r.fix) for r, _ in refusals))
            log.warning("capture mode %s reset %d connection(s) from %s in the last %.0fs: %s — %s", self._mode,
                        total, who, window, whats,
                        "; ".join(f"{why}. Fix: {fix}" for why, fix in reasons))
            self.recent[name] = {"source": name, "count": total, "at": now, "what": whats,
                                 "reasons": sorted({r.reason for r, _ in refusals}),
                                 "fix": "; ".join(fix for _, fix in reasons)}

    def retain(self, names: set[str]) -> None:
        """Forget the recent refusals of pods that left the registry (addresses with no workload go with age)."""
        self.recent = {k: v for k, v in self.recent.items() if k in names or "/" not in k}


async def read_forever(read: Callable[[], Mapping[Key, int]], report: RefusalReport,
                       interval: float = READ_SECONDS) -> None:
    """Every ``interval``: ``read`` on a worker thread (it runs nft), then ``report`` on the loop. A failed read is
    logged once until one succeeds again (the counts stay in the kernel: the next read has them)."""
    loop = asyncio.get_running_loop()
    failing = False
    while True:
        await asyncio.sleep(interval)
        try:
            counts = await loop.run_in_executor(None, read)
        except Exception as exc:  # noqa: BLE001 — a task root: keep reading
            if not failing:
                log.error("reading the node table's refusal counters failed: %s; retried every %.0fs", exc, interval)
            failing = True
            continue
        failing = False
        try:
            report.on_counts(counts, interval)
        except Exception:  # noqa: BLE001 — a task root
            log.exception("reporting the node table's refusals failed")
