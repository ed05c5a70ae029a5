"""The lab: a local multi-node tcpmesh cluster built from network namespaces and cgroups (docs/lab.md).

One "wire" netns holds a bridge joining N node namespaces; each node routes to its pods over
Calico-style /32 veths; each pod is a netns + a cgroup + an IP + a SPIFFE identity. Used by the demo,
the e2e tests and users (``tcpmesh lab up|status|exec|down``).

Public API (this file decides it; importing it has no side effects and does not import pyroute2):
``plan_lab`` / ``LabPlan`` (pure), ``lab_up``, ``lab_down``, ``lab_status``, ``lab_exec``, ``load_lab``,
and the namespace helpers of ``agent.lab.nsenter`` and ``agent.lab.sniff``.
"""

from agent.lab.errors import LabError, LabNotFound
from agent.lab.topology import LabPlan, NodePlan, PodPlan, plan_lab

__all__ = ["LabError", "LabNotFound", "LabPlan", "NodePlan", "PodPlan", "plan_lab",
           "lab_up", "lab_down", "lab_status", "lab_exec", "load_lab"]


def __getattr__(name: str):
    # The operations import pyroute2; load them on first use so the pure plan stays cheap to import.
    if name in ("lab_up", "lab_down", "lab_status", "lab_exec", "load_lab"):
        from agent.lab import lab
        return getattr(lab, name)
    raise AttributeError(f"module 'agent.lab' has no attribute {name!r}")
