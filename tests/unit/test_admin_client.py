"""The CLI tells a reply that is not from a tcpmesh agent from an agent's answer, and names where it
went: a unix socket that speaks something else, an HTTP server that is not the admin endpoint."""

from __future__ import annotations

import socket
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from agent.admin_client import NotAnAgent, ask, check_reply
from agent.errors import TcpmeshError
from agent.identity.cli import fetch_certs


def test_a_reply_that_is_not_an_agent_s_names_the_socket():
    with pytest.raises(NotAnAgent, match=r"/run/x.sock answered 'HTTP/1.1 400 Bad Request', which is not a tcpmesh"):
        check_reply("/run/x.sock", b"HTTP/1.1 400 Bad Request\r\n\r\n")
    with pytest.raises(NotAnAgent, match="answered 'nothing'"):
        check_reply("/run/x.sock", b"")
    assert check_reply("/run/x.sock", b'{"ok": true, "x": 1}\n') == {"ok": True, "x": 1}


def test_a_foreign_unix_socket_is_reported_as_not_an_agent(tmp_path):
    path = str(tmp_path / "other.sock")
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(1)

    def answer():
        conn, _ = server.accept()
        conn.recv(1024)
        conn.sendall(b"220 smtp ready\n")
        conn.close()

    thread = threading.Thread(target=answer)
    thread.start()
    try:
        with pytest.raises(NotAnAgent, match=f"{path} answered '220 smtp ready'"):
            ask(path, {"op": "status"})
    finally:
        thread.join()
        server.close()


class _Foreign(BaseHTTPRequestHandler):
    server_version = "nginx"

    def do_GET(self):  # noqa: N802
        self.send_response(404)
        self.end_headers()

    def log_message(self, *args):
        return


def test_an_http_server_that_is_not_the_admin_endpoint_is_named_with_its_url():
    server = HTTPServer(("127.0.0.1", 0), _Foreign)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with pytest.raises(TcpmeshError) as info:
            fetch_certs(url)
        assert f"{url}/debug/certs is not a tcpmesh agent: it answered HTTP 404 as server 'nginx" in str(info.value)
    finally:
        server.shutdown()
        server.server_close()
