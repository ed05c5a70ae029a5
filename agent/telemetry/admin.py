"""The admin HTTP endpoint: /metrics, /healthz, /readyz, /debug/flows.

Runs a ThreadingHTTPServer on its own thread so that scrapes never run on the data-path loop.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest


class AdminServer:
    def __init__(self, address: str, port: int, registry: CollectorRegistry,
                 is_ready: Callable[[], bool], flows: Callable[[], list[dict]],
                 certs: Callable[[], dict] | None = None, not_ready_reason: Callable[[], str] | None = None) -> None:
        self._not_ready_reason = not_ready_reason  # /readyz 503 says why (e.g. the policy file and line)
        self._certs = certs  # /debug/certs: agent.identity's report (public material only, never keys)
        self._registry = registry
        self._is_ready = is_ready
        self._flows = flows
        handler = self._handler_class()
        self._server = ThreadingHTTPServer((address, port), handler)
        self._server.daemon_threads = True
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

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        admin = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "tcpmesh-admin"

            def do_GET(self) -> None:  # noqa: N802 (http.server API)
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, generate_latest(admin._registry), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    self._send(200, b"ok\n", "text/plain")
                elif path == "/readyz":
                    if admin._is_ready():
                        self._send(200, b"ready\n", "text/plain")
                    else:
                        reason = admin._not_ready_reason() if admin._not_ready_reason else ""
                        self._send(503, f"not ready{': ' + reason if reason else ''}\n".encode(), "text/plain")
                elif path == "/debug/flows":
                    body = json.dumps({"flows": admin._flows()}, indent=1).encode()
                    self._send(200, body, "application/json")
                elif path == "/debug/certs" and admin._certs is not None:
                    body = json.dumps(admin._certs(), indent=1).encode()
                    self._send(200, body, "application/json")
                else:
                    self._send(404, b"not found: try /metrics, /healthz, /readyz, /debug/flows, /debug/certs\n",
                               "text/plain")

            def _send(self, code: int, body: bytes, content_type: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # silence per-request logs
                return

        return Handler
