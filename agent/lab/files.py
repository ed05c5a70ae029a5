"""The documents a lab writes: one agent config per node, the registry file, and state.json.

Pure: each function turns a ``LabPlan`` into a plain mapping (YAML/JSON-ready) in the formats of
agent/config/ and agent/registry/static_file.py; ``lab`` writes them. ``plan_from_state`` is the
inverse used by ``lab down``/``status``/``exec``: the plan is recomputed from the recorded inputs.
"""

from __future__ import annotations

from typing import Any, Mapping

from agent.lab.errors import LabError
from agent.lab.topology import ADMIN_PORT, LabPlan, NodePlan, plan_lab

STATE_VERSION = 1
DEFAULT_CAPTURE_MODE = "ebpf-connect"
# Lab agents look at their node CA directory every second, so `tcpmesh ca rotate` steps apply quickly.
LAB_IDENTITY_POLL_SECONDS = 1.0


def node_ca_dir(node: NodePlan) -> str:
    """The node's CA directory (its node intermediate and trust bundle, from `tcpmesh ca issue-node`)."""
    return f"{node.state_dir}/node-ca"


def agent_config(plan: LabPlan, node: NodePlan, capture_mode: str = DEFAULT_CAPTURE_MODE,
                 log_level: str = "info", identity: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The agent config of ``node`` (loadable by agent.config.load_config). ``identity`` replaces the
    node-intermediate identity section (``lab up --identity issuer``: agent/lab/issuer.py)."""
    return {
        "trust_domain": plan.trust_domain,
        "state_dir": node.state_dir,
        "log_level": log_level,
        "node": {"name": node.name, "address": node.wire_address},
        "identity": dict(identity) if identity is not None else {"mode": "node_ca", "node_ca_dir": node_ca_dir(node),
                                                                 "poll_seconds": LAB_IDENTITY_POLL_SECONDS},
        "registry": {"file": plan.registry_file},
        "policy": {"dir": f"{plan.state_dir}/policies"},  # one policy store for the whole lab
        "capture": {"mode": capture_mode, "redirect_address": plan.pod_gateway, "cgroup_root": plan.cgroup_root,
                    "pods_cgroup": node.pods_cgroup, "bpffs_dir": node.bpffs_dir, "cgroup_scope": node.cgroup},
        # the lab's node network may scrape (Prometheus in node1's netns) and poll /debug/certs
        "admin": {"address": node.wire_address, "port": ADMIN_PORT, "socket": admin_socket_path(node),
                  "allowed_sources": plan.wire_subnet},
        "access_log": {"path": access_log_path(node), "key": audit_key_path(node)},
    }


def admin_socket_path(node: NodePlan) -> str:
    """The node agent's admin socket: reachable from the host as a file (`tcpmesh status --lab NAME --node
    NODE`, TCPMESH_SOCKET), no `lab exec` needed."""
    return f"{node.state_dir}/agent.sock"


def access_log_path(node: NodePlan) -> str:
    """The node agent's keyed access/audit log (`tcpmesh audit verify --key` checks it), in a directory
    of its own: the key must live outside it."""
    return f"{node.state_dir}/log/access.log"


def audit_key_path(node: NodePlan) -> str:
    """The node agent's audit key file (created 0600 by the agent at its first start)."""
    return f"{node.state_dir}/audit.key"


def registry_document(plan: LabPlan) -> dict[str, Any]:
    """Every node and pod of the lab (loadable by agent.registry.static_file.parse_registry)."""
    return {
        "trust_domain": plan.trust_domain,
        "nodes": [{"name": node.name, "address": node.wire_address, "other_addresses": [node.wire_address6]}
                  for node in plan.nodes],  # a dual-stack node's second InternalIP: its nodePorts answer there too
        "workloads": [
            {"name": pod.name, "namespace": pod.namespace, "service_account": pod.service_account,
             "ip": pod.ip, "ip6": pod.ip6, "node": pod.node, "cgroup": pod.cgroup}
            for pod in plan.pods
        ],
    }


def state_document(plan: LabPlan, *, nodes: int, pods_per_node: int, service_accounts: Mapping[str, str],
                   state_root: str, agents_requested: bool, capture_mode: str, ca_dir: str | None,
                   phase: str, agents: Mapping[str, Mapping[str, Any]], created: str,
                   flat_pods: bool = False, identity: str = "node_ca", svid_ttl_seconds: int | None = None,
                   issuers: Mapping[str, Mapping[str, Any]] | None = None,
                   owner: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """state.json: the inputs of the plan (to recompute it), its owner, plus what lab up started."""
    return {
        "version": STATE_VERSION,
        "name": plan.name,
        "created": created,
        "phase": phase,   # "network", "agents", "up" (the last step lab up finished)
        "owner": dict(owner) if owner else None,  # {pid, starttime, argv} of the process that takes it down (owner.py)
        "inputs": {
            "nodes": nodes, "pods_per_node": pods_per_node, "trust_domain": plan.trust_domain,
            "namespace": plan.namespace, "service_accounts": dict(service_accounts),
            "cgroup_root": plan.cgroup_root, "state_root": state_root, "flat_pods": flat_pods,
        },
        "agents_requested": agents_requested,
        "capture_mode": capture_mode,
        "ca_dir": ca_dir,
        "agents": {name: dict(record) for name, record in agents.items()},  # node → {pid, argv, starttime}
        "identity": identity,            # "node_ca", or "issuer" (agent/lab/issuer.py)
        "svid_ttl_seconds": svid_ttl_seconds,
        "issuers": {name: dict(record) for name, record in (issuers or {}).items()},  # replica → {pid, ...}
    }


def plan_from_state(state: Mapping[str, Any], source: str) -> LabPlan:
    if state.get("version") != STATE_VERSION:
        raise LabError(f"{source}: state version {state.get('version')!r} is not {STATE_VERSION}: "
                       "it was written by another tcpmesh version; run `tcpmesh lab down` with that version")
    try:
        inputs = state["inputs"]
        return plan_lab(state["name"], inputs["nodes"], inputs["pods_per_node"], inputs["trust_domain"],
                        namespace=inputs["namespace"], service_accounts=inputs["service_accounts"],
                        cgroup_root=inputs["cgroup_root"], state_root=inputs["state_root"],
                        flat_pods=bool(inputs.get("flat_pods", False)))
    except (KeyError, TypeError) as exc:
        raise LabError(f"{source} is incomplete (missing {exc}): run `tcpmesh lab down` to clean up") from exc
