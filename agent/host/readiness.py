"""`tcpmesh doctor --config`: will this node's agent turn ready, and what does a running one say?

Three questions beyond the kernel probes: does ``registry.file`` load and name this node (else the
agent refuses to start), does ``policy.dir`` load as the agent would load it at start
(a set that cannot be loaded keeps the agent not ready and the pods' connections refused —
docs/policy.md "At start"), and what does the running agent's ``/readyz`` answer (its body names
the reason when it is not ready). Reads files and asks the agent's admin socket (``admin.socket``) for
its status, as every other command that talks to an agent does; imports only the pure policy and
registry-file modules of the agent and the admin socket's client.
"""

from __future__ import annotations

from typing import Mapping

from agent import admin_client
from agent.errors import TcpmeshError
from agent.policy.loader import PolicyError
from agent.policy.source import PolicySource
from agent.registry.static_file import load_registry_for_node

STATUS_TIMEOUT_SECONDS = 2.0


def policy_status(directory: str) -> dict:
    """{"dir", "loads", "detail"}: the set's size, or the `file:line: field: problem` that stops it."""
    try:
        policies = PolicySource(directory).load()
    except PolicyError as exc:
        return {"dir": directory, "loads": False, "detail": str(exc)}
    return {"dir": directory, "loads": True,
            "detail": f"{len(policies.authorization)} AuthorizationPolicy, "
                      f"{len(policies.peer_authentication)} PeerAuthentication"}


def registry_status(path: str, trust_domain: str, node_name: str) -> dict:
    """{"file", "loads", "detail"}: the registry's size, or the `file: entry.field: problem` the agent would
    refuse to start with (registry.source file)."""
    try:
        registry = load_registry_for_node(path, trust_domain, node_name)
    except TcpmeshError as exc:
        return {"file": path, "loads": False, "detail": str(exc)}
    local = len(registry.local(node_name))
    return {"file": path, "loads": True,
            "detail": f"{_count(len(registry.nodes), 'node')}, {_count(len(registry.workloads), 'workload')}, "
                      f"{local} on {node_name}"}


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def render_registry(registry: Mapping) -> list[str]:
    """The registry line(s) `tcpmesh doctor --config` prints before the policy line."""
    if registry["loads"]:
        return [f"registry.file {registry['file']}: loads ({registry['detail']})"]
    return [f"registry.file DOES NOT LOAD: {registry['detail']}",
            "  an agent starting now refuses to start (exit 2) until it loads (docs/registry.md)"]


def running_agent(socket_path: str) -> dict:
    """{"socket", "reachable", "ready", "detail"} from the ``status`` of the agent at ``socket_path``."""
    try:
        doc = admin_client.ask(socket_path, {"op": "status"}, timeout=STATUS_TIMEOUT_SECONDS)["status"]
    except TcpmeshError as exc:
        return {"socket": socket_path, "reachable": False, "ready": False, "detail": f"no agent answers: {exc}"}
    detail = "ready" if doc.get("ready") else f"not ready: {doc.get('not_ready_reason') or 'no reason given'}"
    return {"socket": socket_path, "reachable": True, "ready": bool(doc.get("ready")), "detail": detail}


def render(policy: Mapping, agent: Mapping) -> list[str]:
    """The lines `tcpmesh doctor` prints after the kernel table."""
    if policy["loads"]:
        lines = [f"policy.dir {policy['dir']}: loads ({policy['detail']})"]
    else:
        lines = [f"policy.dir DOES NOT LOAD: {policy['detail']}",
                 "  an agent starting now stays NOT READY and the pods' connections are refused until it loads "
                 "(docs/policy.md \"At start\")"]
    state = ("ready" if agent["ready"] else "NOT READY") if agent["reachable"] else "not running"
    lines.append(f"running agent ({agent['socket']}): {state}: {agent['detail']}")
    return lines
