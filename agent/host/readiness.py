"""`tcpmesh doctor --config`: will this node's agent turn ready, and what does a running one say?

Two questions beyond the kernel probes: does ``policy.dir`` load as the agent would load it at start
(a set that cannot be loaded keeps the agent not ready and the pods' connections refused —
docs/policy.md "At start"), and what does the running agent's ``/readyz`` answer (its body names
the reason when it is 503). Reads files and makes one loopback-or-admin-address HTTP GET; imports
only the pure policy modules of the agent.
"""

from __future__ import annotations

import http.client
from typing import Mapping

from agent.policy.loader import PolicyError
from agent.policy.source import PolicySource

READYZ_TIMEOUT_SECONDS = 1.0


def policy_status(directory: str) -> dict:
    """{"dir", "loads", "detail"}: the set's size, or the `file:line: field: problem` that stops it."""
    try:
        policies = PolicySource(directory).load()
    except PolicyError as exc:
        return {"dir": directory, "loads": False, "detail": str(exc)}
    return {"dir": directory, "loads": True,
            "detail": f"{len(policies.authorization)} AuthorizationPolicy, "
                      f"{len(policies.peer_authentication)} PeerAuthentication"}


def running_agent(address: str, port: int) -> dict:
    """{"url", "reachable", "ready", "detail"} from GET /readyz of the admin endpoint."""
    url = f"http://{address}:{port}/readyz"
    conn = http.client.HTTPConnection(address, port, timeout=READYZ_TIMEOUT_SECONDS)
    try:
        conn.request("GET", "/readyz")
        response = conn.getresponse()
        body = response.read().decode(errors="replace").strip()
    except OSError as exc:
        return {"url": url, "reachable": False, "ready": False, "detail": f"no agent answers: {exc}"}
    finally:
        conn.close()
    return {"url": url, "reachable": True, "ready": response.status == 200, "detail": body}


def render(policy: Mapping, agent: Mapping) -> list[str]:
    """The lines `tcpmesh doctor` prints after the kernel table."""
    if policy["loads"]:
        lines = [f"policy.dir {policy['dir']}: loads ({policy['detail']})"]
    else:
        lines = [f"policy.dir DOES NOT LOAD: {policy['detail']}",
                 "  an agent starting now stays NOT READY and the pods' connections are refused until it loads "
                 "(docs/policy.md \"At start\")"]
    state = ("ready" if agent["ready"] else "NOT READY") if agent["reachable"] else "not running"
    lines.append(f"running agent ({agent['url']}): {state}: {agent['detail']}")
    return lines
