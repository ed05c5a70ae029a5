"""The operator's side of an agent's admin socket: one JSON request, one checked JSON reply.

Every command that talks to a running agent (`tcpmesh status`, `flows`, `workload`, `cert inspect`,
`policy explain`, `lab status`) goes through ``ask``: it names the socket it reached, and tells a
reply that is not from a tcpmesh agent (not JSON, no ``ok``) from an agent's refusal. The serving
side is agent.control.admin_socket. A leaf: imports agent.errors only, so the lab and the control
package can both use it.
"""

from __future__ import annotations

import json
import socket
from typing import Any

from agent.errors import TcpmeshError

TIMEOUT_SECONDS = 10.0
MAX_REPLY = 64 * 1024 * 1024


class NotAnAgent(TcpmeshError):
    """Something answered at the address, but not as a tcpmesh agent does."""


def request(path: str, payload: dict[str, Any], timeout: float = TIMEOUT_SECONDS) -> dict[str, Any]:
    """Send one request to the admin socket at ``path``; the agent's reply (a dict with ``ok``)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except OSError as exc:
        sock.close()
        raise TcpmeshError(f"cannot reach the agent at {path}: {exc.strerror or exc} (is `tcpmesh run` running? "
                           "point at its admin socket with --socket, --config, --lab/--node or TCPMESH_SOCKET)") from exc
    data = b""
    with sock:
        try:
            sock.sendall(json.dumps(payload).encode() + b"\n")
            while not data.endswith(b"\n") and len(data) < MAX_REPLY:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except OSError as exc:
            raise TcpmeshError(f"the agent at {path} did not answer: {exc.strerror or exc}") from exc
    return check_reply(path, data)


def check_reply(path: str, data: bytes) -> dict[str, Any]:
    """The reply as a dict, or NotAnAgent naming ``path`` and what came back instead."""
    try:
        reply = json.loads(data)
    except ValueError:
        reply = None
    if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
        shown = data[:80].decode(errors="replace").strip() or "nothing"
        raise NotAnAgent(f"{path} answered {shown!r}, which is not a tcpmesh agent's reply: is this the admin "
                         "socket of `tcpmesh run` (admin.socket in its config)?")
    return reply


def ask(path: str, payload: dict[str, Any], timeout: float = TIMEOUT_SECONDS) -> dict[str, Any]:
    """``request``, raising the agent's own error (what was wrong and the fix) when it refuses."""
    reply = request(path, payload, timeout)
    if not reply["ok"]:
        raise TcpmeshError(f"the agent at {path} refused {payload.get('op')}: "
                           f"{reply.get('error', 'no reason given')}")
    return reply
