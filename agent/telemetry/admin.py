"""The admin HTTP endpoint: /metrics, /healthz, /readyz, /debug/flows, /debug/certs, /debug/status.

Runs on its own threads so that scrapes never run on the data-path loop: one acceptor thread and a
bounded pool of workers (``WORKERS``); a connection beyond ``BACKLOG`` waiting or being served is
closed at once and counted (``busy``), and a client gets ``REQUEST_TIMEOUT`` seconds to send its
request — idle connections cost a descriptor for a bounded time, never a thread each.

Who may connect: the node itself (loopback, or a peer address that is the address it connected to —
what kubelet probes and a node-local scraper look like) and the networks of ``allowed`` (the
operator's Prometheus). Anyone else — a pod of this node or of another, any other host — is refused
at accept, before a byte is read (reset, counted as ``source``). /debug/flows (pids, commands,
addresses of every flow) answers the node itself only; /debug/certs (public material: certificates,
fingerprints, dates) also answers allowed sources, since `tcpmesh ca rotate --wait-admin` reads it
from the operator's machine. /debug/status (`tcpmesh status`'s document, agent.control.status:
workloads, policy files and their errors) answers the node itself only. /healthz and /readyz keep
their codes while a policy change is refused (the agent still enforces the previous set: restarting
it or taking it out of service would not help) but say so after "ok"/"ready". Pure policy is
``client_kind``; the rest is http.server plumbing.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Callable, Sequence

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

WORKERS = 4
BACKLOG = 64  # connections waiting for or held by a worker; more are closed at once
REQUEST_TIMEOUT = 5.0  # seconds a client has for each read and write
NODE, ALLOWED, FOREIGN = "node", "allowed", "foreign"
LOCAL_ONLY_PATHS = ("/debug/flows", "/debug/status")
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def client_kind(peer: str, local: str, allowed: Sequence[Network]) -> str:
    """``node`` (the node itself), ``allowed`` (in ``allowed``) or ``foreign`` (anyone else)."""
    try:
        address = ipaddress.ip_address(peer.split("%", 1)[0])
    except ValueError:
        return FOREIGN
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address.is_loopback or peer == local:
        return NODE
    if any(address in network for network in allowed):
        return ALLOWED
    return FOREIGN


class _Server(HTTPServer):
    """HTTPServer whose requests go to a bounded pool; the source check runs at accept."""

    request_queue_size = 128  # listen backlog: refusals must be ours (counted), not SYNs the kernel drops

    def __init__(self, address: tuple[str, int], handler: type, allowed: Sequence[Network],
                 refused: Callable[[str], None]) -> None:
        super().__init__(address, handler)
        self.allowed = tuple(allowed)
        self._refused = refused
        self._pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="tcpmesh-admin")
        self._lock = threading.Lock()
        self._held = 0

    def verify_request(self, request, client_address) -> bool:  # noqa: ANN001 (socketserver API)
        local = request.getsockname()[0]
        if client_kind(client_address[0], local, self.allowed) == FOREIGN:
            self._reject(request, "source")
            return False
        return True

    def process_request(self, request, client_address) -> None:  # noqa: ANN001
        with self._lock:
            if self._held >= BACKLOG:
                full = True
            else:
                full = False
                self._held += 1
        if full:
            self._reject(request, "busy")
            self.close_request(request)  # close, not shutdown_request: a FIN before the reset reads as EPIPE
            return
        self._pool.submit(self._work, request, client_address)

    def _work(self, request, client_address) -> None:  # noqa: ANN001
        try:
            self.finish_request(request, client_address)
        except Exception:  # noqa: BLE001 — a worker's root: one client must not end the pool
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            with self._lock:
                self._held -= 1

    def _reject(self, request: socket.socket, reason: str) -> None:
        try:  # a reset, not an orderly close: nothing was read and nothing will be answered
            request.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        self._refused(reason)

    def handle_error(self, request, client_address) -> None:  # noqa: ANN001 — no traceback per bad client
        return

    def server_close(self) -> None:
        super().server_close()
        self._pool.shutdown(wait=False, cancel_futures=True)


class AdminServer:
    def __init__(self, address: str, port: int, registry: CollectorRegistry,
                 is_ready: Callable[[], bool], flows: Callable[[], list[dict]],
                 certs: Callable[[], dict] | None = None, not_ready_reason: Callable[[], str] | None = None, *,
                 allowed: Sequence[Network] = (), refused: Callable[[str], None] = lambda reason: None,
                 ready_detail: Callable[[], str] = lambda: "",
                 status: Callable[[], dict] | None = None, warning: Callable[[], str] = lambda: "") -> None:
        self._ready_detail = ready_detail  # /readyz 200 adds what a ready agent runs degraded on (API unreachable)
        self._status = status  # /debug/status: agent.control.status's document
        self._warning = warning  # appended to /healthz and /readyz bodies (e.g. a refused policy change)
        self._not_ready_reason = not_ready_reason  # /readyz 503 says why (e.g. the policy file and line)
        self._certs = certs  # /debug/certs: agent.identity's report (public material only, never keys)
        self._registry = registry
        self._is_ready = is_ready
        self._flows = flows
        self._server = _Server((address, port), self._handler_class(), allowed, refused)
        self._thread = threading.Thread(target=self._server.serve_forever, name="tcpmesh-admin", daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        return self._server.server_address[:2]  # type: ignore[return-value]

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def _with_warning(self, word: str) -> bytes:
        warning = self._warning()
        return f"{word}{'; warning: ' + warning if warning else ''}\n".encode()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        admin = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "tcpmesh-admin"
            timeout = REQUEST_TIMEOUT

            def do_GET(self) -> None:  # noqa: N802 (http.server API)
                path = self.path.split("?", 1)[0]
                kind = client_kind(self.client_address[0], self.connection.getsockname()[0], self.server.allowed)
                if path in LOCAL_ONLY_PATHS and kind != NODE:
                    self._send(403, f"{path} answers the node itself only (it names processes and addresses): "
                                    f"on the node, curl http://127.0.0.1:<admin port>{path}, or run "
                                    "`tcpmesh flows`\n".encode(), "text/plain")
                elif path == "/metrics":
                    self._send(200, generate_latest(admin._registry), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    self._send(200, admin._with_warning("ok"), "text/plain")
                elif path == "/readyz":
                    if admin._is_ready():
                        detail = admin._ready_detail()
                        body = admin._with_warning("ready")
                        self._send(200, body + (detail + "\n").encode() if detail else body, "text/plain")
                    else:
                        reason = admin._not_ready_reason() if admin._not_ready_reason else ""
                        self._send(503, f"not ready{': ' + reason if reason else ''}\n".encode(), "text/plain")
                elif path == "/debug/flows":
                    body = json.dumps({"flows": admin._flows()}, indent=1).encode()
                    self._send(200, body, "application/json")
                elif path == "/debug/certs" and admin._certs is not None:
                    body = json.dumps(admin._certs(), indent=1).encode()
                    self._send(200, body, "application/json")
                elif path == "/debug/status" and admin._status is not None:
                    self._send(200, json.dumps(admin._status(), indent=1).encode(), "application/json")
                else:
                    self._send(404, b"not found: try /metrics, /healthz, /readyz, /debug/flows, /debug/certs, "
                                    b"/debug/status\n", "text/plain")

            def _send(self, code: int, body: bytes, content_type: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # silence per-request logs
                return

        return Handler
