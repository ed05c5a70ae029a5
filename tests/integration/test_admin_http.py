"""The admin HTTP server in-process: who may read what (client_kind), and a bounded pool — idle
connections beyond the backlog are closed at once and counted, and never cost a thread each."""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
import urllib.error
import urllib.request

from prometheus_client import CollectorRegistry

from agent.telemetry import admin as admin_module
from agent.telemetry.admin import ALLOWED, FOREIGN, NODE, AdminServer, client_kind

LAB = (ipaddress.ip_network("10.76.0.0/24"),)


def test_client_kind_names_the_node_itself_allowed_networks_and_everyone_else():
    assert client_kind("127.0.0.1", "127.0.0.1", ()) == NODE
    assert client_kind("127.0.0.5", "10.76.0.1", ()) == NODE
    assert client_kind("::1", "::1", ()) == NODE
    assert client_kind("10.76.0.1", "10.76.0.1", ()) == NODE  # kubelet on the node, dialling the host IP
    assert client_kind("10.76.0.2", "10.76.0.1", LAB) == ALLOWED
    assert client_kind("::ffff:10.76.0.2", "::ffff:10.76.0.1", LAB) == ALLOWED
    assert client_kind("10.77.1.11", "10.76.0.1", LAB) == FOREIGN  # a pod
    assert client_kind("10.76.0.2", "10.76.0.1", ()) == FOREIGN
    assert client_kind("not an address", "10.76.0.1", LAB) == FOREIGN


def serve(**kwargs) -> tuple[AdminServer, dict[str, int]]:
    counts: dict[str, int] = {}
    server = AdminServer("127.0.0.1", 0, CollectorRegistry(), is_ready=lambda: True, flows=lambda: [{"pid": 1}],
                         refused=lambda reason: counts.__setitem__(reason, counts.get(reason, 0) + 1), **kwargs)
    server.start()
    return server, counts


def get(server: AdminServer, path: str) -> int:
    host, port = server.address
    try:
        with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=5) as answer:
            return answer.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_the_node_itself_reads_everything():
    server, _ = serve()
    try:
        assert [get(server, p) for p in ("/metrics", "/healthz", "/readyz", "/debug/flows")] == [200] * 4
    finally:
        server.stop()


def test_idle_connections_beyond_the_backlog_are_closed_and_counted_without_a_thread_each(monkeypatch):
    monkeypatch.setattr(admin_module, "BACKLOG", 8)
    server, counts = serve()
    held = []
    try:
        threads = threading.active_count()
        for index in range(40):
            try:
                held.append(socket.create_connection(server.address, timeout=5))
            except (ConnectionResetError, BrokenPipeError):
                # on a loaded machine the reset can arrive before connect() returns: still a refusal
                assert index >= admin_module.BACKLOG, f"connection {index} within the backlog was reset"
        deadline = time.monotonic() + 10
        while counts.get("busy", 0) < 32:
            assert time.monotonic() < deadline, counts
            time.sleep(0.05)
        assert counts == {"busy": 32}
        assert threading.active_count() - threads <= admin_module.WORKERS
        for refused in held[admin_module.BACKLOG:]:  # those whose connect() returned before the reset
            refused.settimeout(5)
            try:
                assert refused.recv(1) == b""  # closed (reset) at once, nothing answered
            except ConnectionResetError:
                pass
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 15
    while True:  # the workers' idle clients time out (REQUEST_TIMEOUT) or went away: served again
        try:
            if get(server, "/healthz") == 200:
                break
        except OSError:
            pass
        assert time.monotonic() < deadline
        time.sleep(0.2)
    server.stop()
