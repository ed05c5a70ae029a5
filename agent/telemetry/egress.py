"""Connects outside the mesh, as the kernel reported them, turned into telemetry.

The connect hooks never redirect a connect to a destination outside the mesh; they report it (one
agent.capture.egress.EgressEvent: cgroup, pid, comm, destination, allowed or denied). ``EgressReport``
names the source workload — the local workload whose cgroup is the event's cgroup or one of its
ancestors (containers of a pod) — and records the event as a flow that was never proxied: one
``egress`` access record, a line in /debug/flows and tcpmesh_egress_outside_mesh_total. Runs on the
agent's loop, off the data path (events arrive through the ring buffer's epoll fd). Must not import
the capture or proxy packages (the flow model is agent.connection.flow).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Protocol

from agent.connection import flow as F
from agent.connection.facts import ClientProcess, ConnectionFacts
from agent.registry.model import Registry, Workload

ALLOWED_DETAIL = "outside the mesh: left from the pod itself, not proxied"
DENIED_DETAIL = "outside the mesh: refused at connect() (policy.outbound_passthrough DENY)"


class CgroupNamer(Protocol):
    def name(self, cgroup_id: int) -> str | None: ...


def owner_of(registry: Registry | None, node_name: str, cgroup_path: str | None) -> Workload | None:
    """The local workload whose cgroup is ``cgroup_path`` or an ancestor of it (pure)."""
    if not cgroup_path or registry is None:
        return None
    best: Workload | None = None
    for workload in registry.local(node_name):
        root = (workload.cgroup or "").rstrip("/")
        if root and (cgroup_path == root or cgroup_path.startswith(root + os.sep)) and \
                (best is None or len(root) > len(best.cgroup or "")):
            best = workload
    return best


class EgressReport:
    def __init__(self, node_name: str, registry: Callable[[], Registry | None], cgroups: CgroupNamer,
                 flows: Any, metrics: Any) -> None:
        self._node = node_name
        self._registry = registry
        self._cgroups = cgroups
        self._flows = flows      # agent.telemetry.flows.FlowTable
        self._metrics = metrics  # agent.telemetry.metrics.Metrics

    def on_event(self, event: Any) -> None:
        """One agent.capture.egress.EgressEvent."""
        flow = F.Flow(F.REPORTER_SOURCE, ConnectionFacts(event.destination_ip, event.destination_port, F.new_flow_id(),
                                                         process=ClientProcess(event.pid, event.uid, event.comm),
                                                         cgroup_id=event.cgroup_id))
        flow.set_source(owner_of(self._registry(), self._node, self._cgroups.name(event.cgroup_id)))
        flow.security = F.SECURITY_NONE
        if event.denied:
            flow.fail(F.FLAG_DENY, DENIED_DETAIL)
        else:
            flow.detail = ALLOWED_DETAIL
        flow.close(flow.start_time)
        self._flows.egress(flow)
        self._metrics.egress(flow)
