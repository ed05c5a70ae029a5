"""agent/service/sdnotify.py: the sd_notify datagram protocol, against a real unix datagram socket."""

from __future__ import annotations

import socket

import pytest

from agent.service import sdnotify


def receiver(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2)
    return sock


def test_message_format():
    assert sdnotify.format_message(READY=1, STATUS="ok, 2 pods") == b"READY=1\nSTATUS=ok, 2 pods"
    with pytest.raises(ValueError):
        sdnotify.format_message(STATUS="two\nlines")
    with pytest.raises(ValueError):
        sdnotify.format_message(ready=1)


def test_addresses():
    assert sdnotify.socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert sdnotify.socket_address("@tcpmesh/notify") == b"\0tcpmesh/notify"
    assert sdnotify.socket_address("vsock:2:1234") is None and sdnotify.socket_address("@") is None


def test_ready_and_stopping_reach_a_path_socket(tmp_path):
    path = str(tmp_path / "notify.sock")
    with receiver(path) as sock:
        assert sdnotify.ready("ready: 2 local workloads", {"NOTIFY_SOCKET": path})
        assert sock.recv(4096) == b"READY=1\nSTATUS=ready: 2 local workloads"
        assert sdnotify.stopping(environ={"NOTIFY_SOCKET": path})
        assert sock.recv(4096) == b"STOPPING=1"


def test_abstract_socket(tmp_path):
    name = f"tcpmesh-test-{tmp_path.name}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(2)
        assert sdnotify.ready(environ={"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(64) == b"READY=1"


def test_without_systemd_nothing_is_sent_and_failures_are_not_fatal(tmp_path, caplog):
    assert not sdnotify.ready(environ={})
    assert not sdnotify.ready(environ={"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    assert "cannot notify systemd" in caplog.text
    assert not sdnotify.ready(environ={"NOTIFY_SOCKET": "relative/path"})
