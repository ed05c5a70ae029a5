"""The admin socket (/run/tcpmesh/agent.sock by default, mode 0600): one JSON request per line, one
JSON answer per line. Operations: ``workload.add``, ``workload.del``, ``workload.list``, ``flows.list``,
and those the composition root adds (``status``, ``certs``, ``policy.explain``: see ``ops``).

    {"op": "workload.add", "workload": {"name": .., "namespace": .., "service_account": .., "ip": ..,
                                        "node": .., "cgroup": ..}}
    → {"ok": true, "workload": .., "spiffe_id": .., "svid": "issued" | "pending"}  (waits up to 2 s for its SVID)
    {"op": "workload.del", "key": "namespace/name"}
    {"op": "flows.list", "workload": "ns/name"?, "port": 5432?, "after": <cursor>?}  (agent.telemetry.flows)
    {"op": "status"}                       → the node's facts (agent.control.status, `tcpmesh status`)
    {"op": "certs"}                        → the /debug/certs report (`tcpmesh cert inspect`)
    {"op": "policy.explain", "from": .., "to": "ns/name", "port": n}  (`tcpmesh policy explain`)
    {"op": "identity.reload"}              → re-read identity.mode from the config file and switch the
                                             SVID source at runtime (`tcpmesh identity reload`; async: ``async_ops``)
    → {"ok": true, ...} | {"ok": false, "error": "what was wrong and how to fix it"}

Requests are bounded (64 KiB) and answered one at a time per connection. The client side is
agent.admin_client.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from typing import Any, Awaitable, Callable, Mapping

from agent.control.workloads import WorkloadController
from agent.errors import TcpmeshError

log = logging.getLogger("tcpmesh.admin")
MAX_REQUEST = 64 * 1024
FIRST_SVID_WAIT_SECONDS = 2.0   # workload.add waits this long for a new identity's first SVID


class AdminSocket:
    def __init__(self, path: str, workloads: WorkloadController,
                 flows: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
                 ops: Mapping[str, Callable[[dict[str, Any]], dict[str, Any]]] | None = None,
                 async_ops: Mapping[str, Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]] | None = None) -> None:
        self.path = path
        self._workloads = workloads
        self._flows = flows  # flows.list: open and recently closed flows (FlowTable.query)
        self._ops = dict(ops or {})  # op name → handler(request) → answer fields (a TcpmeshError refuses)
        self._async_ops = dict(async_ops or {})  # the same, awaited: slow operations that must not stall the loop
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", mode=0o700, exist_ok=True)
        if os.path.exists(self.path):
            _remove_stale(self.path)
        old_umask = os.umask(0o177)  # the socket is created 0600: root only
        try:
            self._server = await asyncio.start_unix_server(self._serve, self.path, limit=MAX_REQUEST)
        finally:
            os.umask(old_umask)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                writer.write(json.dumps(await self._answer(line)).encode() + b"\n")
                await writer.drain()
        except (ValueError, ConnectionError) as exc:  # over-long line, peer gone
            log.warning("admin socket client dropped: %s", exc)
        finally:
            writer.close()

    async def _answer(self, line: bytes) -> dict[str, Any]:
        """``handle_line``, or an awaited ``async_ops`` handler (other connections are served meanwhile)."""
        try:
            request = json.loads(line)
        except ValueError:
            request = None
        op = request.get("op") if isinstance(request, dict) else None
        if op == "workload.add":
            answer = self.handle_line(line)
            if answer.get("ok"):
                answer["svid"] = await self._first_svid(answer["spiffe_id"])
            return answer
        if not isinstance(op, str) or op not in self._async_ops:
            return self.handle_line(line)
        try:
            return {"ok": True, **await self._async_ops[op](request)}
        except TcpmeshError as exc:
            return {"ok": False, "error": str(exc)}

    async def _first_svid(self, uri: str) -> str:
        """After ``workload.add``: wait (without blocking the loop) up to ``FIRST_SVID_WAIT_SECONDS`` while the
        identity is pending — minted on the rotator's thread (node_ca) or asked of the issuer — so that the CLI
        returns once the workload's connects work; "issued", or "pending" (its connects are refused until then)."""
        pending = getattr(getattr(self._workloads, "identities", None), "pending", None)
        if pending is None:
            return "issued"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + FIRST_SVID_WAIT_SECONDS
        while any(i.uri == uri for i in pending()):
            if loop.time() >= deadline:
                return "pending"
            await asyncio.sleep(0.02)
        return "issued"

    def handle_line(self, line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line)
        except ValueError as exc:
            return {"ok": False, "error": f"request is not JSON: {exc}"}
        if not isinstance(request, dict):
            return {"ok": False, "error": "request must be a JSON object with an 'op'"}
        op = request.get("op")
        try:
            if op == "workload.add":
                if not isinstance(request.get("workload"), dict):
                    return {"ok": False, "error": "workload.add needs a 'workload' object"}
                workload = self._workloads.add(request["workload"])
                log.info("workload %s added through the admin socket", workload.key)
                return {"ok": True, "workload": workload.key, "spiffe_id": workload.spiffe_id.uri}
            if op == "workload.del":
                workload = self._workloads.remove(str(request.get("key", "")))
                log.info("workload %s removed through the admin socket", workload.key)
                return {"ok": True, "workload": workload.key}
            if op == "workload.list":
                return {"ok": True, "workloads": self._workloads.describe()}
            if op == "flows.list" and self._flows is not None:
                return {"ok": True, **self._flows(request)}
            if isinstance(op, str) and op in self._ops:
                return {"ok": True, **self._ops[op](request)}
        except TcpmeshError as exc:
            return {"ok": False, "error": str(exc)}
        known = ["workload.add", "workload.del", "workload.list", "flows.list", *self._ops, *self._async_ops]
        return {"ok": False, "error": f"unknown op {op!r}: use {', '.join(known)}"}


def _remove_stale(path: str) -> None:
    """Remove a socket file left by a dead agent; refuse if an agent still answers on it."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)
        return
    finally:
        probe.close()
    raise TcpmeshError(f"another agent is listening on {path}: stop it first, or set admin.socket to another path")
