"""agent.proxy.limits and the pure parts of agent.proxy.deadlines; the config settings they read."""

from __future__ import annotations

import asyncio
import logging
import resource
import socket

import pytest

from agent.config import Config, IdentityConfig, IdentityIssuerConfig, ProxyConfig, validate
from agent.errors import ConfigError
from agent.proxy import deadlines as D
from agent.proxy import limits as L
from agent.proxy import mux as M
from agent.connection.facts import ConnectionFacts
from agent.proxy.header import encode_connect_body
from agent.proxy.session import MAX_STREAMS_PER_SESSION, MuxSession

A, B = "spiffe://td/ns/a/sa/a", "spiffe://td/ns/b/sa/b"


def test_per_identity_cap_refuses_only_that_identity():
    hits = []
    limits = L.ConnectionLimits("destination", total=0, per_identity=2, on_hit=lambda *h: hits.append(h))
    assert limits.try_acquire(A) is None and limits.try_acquire(A) is None
    assert limits.try_acquire(A) == L.LIMIT_PER_IDENTITY
    assert limits.try_acquire(B) is None
    assert hits == [("destination", "per_identity")] and limits.active == 3 and limits.open_for(A) == 2
    limits.release(A)
    assert limits.try_acquire(A) is None


def test_total_cap_counts_every_identity_and_releases_forget_empty_identities():
    limits = L.ConnectionLimits("source", total=2, per_identity=0)
    assert limits.try_acquire(A) is None and limits.try_acquire(B) is None
    assert limits.try_acquire("spiffe://td/ns/c/sa/c") == L.LIMIT_TOTAL
    for identity in (A, B, A, "never-acquired"):
        limits.release(identity)  # an extra release never goes negative
    assert limits.active == 0 and limits.identities == 0
    assert limits.refused == {"total": 1, "per_identity": 0}


def test_zero_means_unlimited():
    limits = L.ConnectionLimits("source")
    assert all(limits.try_acquire(A) is None for _ in range(10_000))


def test_refusals_are_logged_at_most_once_per_interval(caplog):
    now = [0.0]
    limits = L.ConnectionLimits("source", total=1, clock=lambda: now[0])
    limits.try_acquire(A)
    with caplog.at_level(logging.WARNING, "tcpmesh.limits"):
        for _ in range(1000):
            limits.try_acquire(B)
        now[0] += L.LOG_INTERVAL
        limits.try_acquire(B)
    assert len(caplog.records) == 2
    assert "proxy.max_connections=1" in caplog.records[0].getMessage()
    assert "refused 1000 connection(s)" in caplog.records[1].getMessage()  # 999 unlogged + this one


def test_open_files_limit_is_raised_to_the_hard_limit_and_never_lowered():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 256), hard))
        new_soft, new_hard = L.raise_open_files_limit()
        assert new_hard == hard and new_soft == (hard if hard != resource.RLIM_INFINITY else new_soft)
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == new_soft >= 256
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_the_cap_is_lowered_to_what_the_open_files_limit_holds(caplog):
    assert L.fitting_cap(1000, 1_048_576) == 1000
    with caplog.at_level(logging.WARNING, "tcpmesh.limits"):
        assert L.fitting_cap(32768, 20000) == (20000 - L.FDS_RESERVED) // 2
        assert L.fitting_cap(0, 4096) == (4096 - L.FDS_RESERVED) // 2  # "no cap" still cannot exceed the fds
    assert "LimitNOFILE" in caplog.records[0].getMessage()


@pytest.mark.parametrize("timeout", [2, 3, 5, 30, 600])
def test_keepalive_settings_end_a_silent_tunnel_in_about_the_timeout(timeout):
    idle, interval, count, user_ms = D.keepalive_settings(timeout)
    assert user_ms == timeout * 1000
    assert idle >= 1 and interval >= 1
    assert timeout * 0.5 <= idle + count * interval <= timeout + 2  # keepalive alone agrees with the user timeout


def test_tunnel_socket_options_are_set_and_zero_leaves_them():
    with socket.socket() as sock:
        assert not D.tune_tunnel_socket(sock, 0)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0
        assert D.tune_tunnel_socket(sock, 10)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 5
        assert sock.getsockopt(socket.IPPROTO_TCP, D.TCP_USER_TIMEOUT) == 10_000
    assert not D.tune_tunnel_socket(None, 10)


class FakeRelay:
    def __init__(self) -> None:
        self.a_to_b = self.b_to_a = 0


def test_idle_relays_expire_only_after_no_byte_moved_for_the_timeout():
    busy, quiet = FakeRelay(), FakeRelay()
    expired, last = D.idle_relays([busy, quiet], {}, now=0.0, idle_timeout=10)
    assert expired == []
    busy.a_to_b = 5
    expired, last = D.idle_relays([busy, quiet], last, now=9.0, idle_timeout=10)
    assert expired == []
    busy.b_to_a = 1
    expired, last = D.idle_relays([busy, quiet], last, now=10.0, idle_timeout=10)
    assert expired == [quiet] and set(last) == {busy}
    expired, last = D.idle_relays([busy], last, now=19.9, idle_timeout=10)
    assert expired == []
    expired, _ = D.idle_relays([busy], last, now=20.0, idle_timeout=10)
    assert expired == [busy]


class FakeTls:
    def __init__(self) -> None:
        self.sent = bytearray()
        self.closed = False

    def set_receiver(self, receiver) -> None:
        self.receiver = receiver

    def resume_reading(self) -> None:
        pass

    def write(self, data: bytes) -> None:
        self.sent += data

    def write_parts(self, *parts: bytes) -> None:
        for part in parts:
            self.sent += part

    def write_data_frame(self, stream: int, data: bytes) -> None:
        self.write(M.encode(M.FrameType.DATA, stream, bytes(data)))

    def write_eof(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def peername(self):
        return ("192.0.2.1", 1)


def test_a_tunnel_opening_more_streams_than_a_client_ever_does_is_closed():
    async def body():
        opened = []
        session = MuxSession(FakeTls(), client=False, on_open=lambda stream, request: opened.append(stream))
        session.start()
        body_ = encode_connect_body(ConnectionFacts("10.0.0.1", 80))
        data = b"".join(M.encode(M.FrameType.OPEN, 2 * i + 1, body_) for i in range(MAX_STREAMS_PER_SESSION + 1))
        session.leg_data(session.tls, data)
        assert len(opened) == MAX_STREAMS_PER_SESSION
        assert session.closed.done() and "beyond" in session.closed.result()
        assert M.FrameDecoder().feed(bytes(session.tls.sent))[-1].type is M.FrameType.GOAWAY

    asyncio.run(body())


def test_deadline_watch_closes_a_tunnel_without_open_and_an_idle_one():
    class Session:
        def __init__(self) -> None:
            self.closed = asyncio.get_running_loop().create_future()
            self.opened_streams = 0
            self.streams = {}

    async def body():
        now = [0.0]
        session = Session()
        watch = asyncio.ensure_future(D.enforce_tunnel_deadlines(session, 0.05, 0.2, started=0.0,
                                                                 clock=lambda: now[0]))
        await asyncio.sleep(0.02)
        now[0] = 0.06
        assert await asyncio.wait_for(watch, 2) == "open"

        session = Session()
        watch = asyncio.ensure_future(D.enforce_tunnel_deadlines(session, 0.05, 0.2, started=0.0,
                                                                 clock=lambda: now[0]))
        session.opened_streams, session.streams = 1, {1: object()}
        await asyncio.sleep(0.1)
        now[0] = 10.0
        await asyncio.sleep(0.1)
        assert not watch.done()  # a stream is open: not idle however long
        session.streams = {}
        await asyncio.sleep(0.1)
        now[0] = 10.3
        assert await asyncio.wait_for(watch, 2) == "idle"

        session = Session()
        watch = asyncio.ensure_future(D.enforce_tunnel_deadlines(session, 5, 5, started=0.0, clock=lambda: 0.0))
        session.closed.set_result("peer closed the tunnel")
        assert await asyncio.wait_for(watch, 2) is None

    asyncio.run(body())


def test_config_defaults_are_named_and_validated():
    proxy = ProxyConfig()
    assert proxy.handshake_timeout_seconds == 5.0 and proxy.tunnel_timeout_seconds == 30.0
    assert proxy.inbound_tunnel_idle_seconds == 120.0 and proxy.stream_idle_timeout_seconds == 3600.0
    assert proxy.max_connections == 32768 and proxy.max_connections_per_identity == 16384


def _config(proxy: ProxyConfig) -> Config:
    return Config(node=Config().node.__class__("n1", "10.0.0.1"), capture=Config().capture.__class__(mode="none"),
                  identity=IdentityConfig(issuer=IdentityIssuerConfig(addresses=["10.0.0.5:15012"])), proxy=proxy)


@pytest.mark.parametrize("settings, field", [
    ({"handshake_timeout_seconds": 0}, "proxy.handshake_timeout_seconds"),
    ({"tunnel_timeout_seconds": 1}, "proxy.tunnel_timeout_seconds"),
    ({"inbound_tunnel_idle_seconds": 60}, "proxy.inbound_tunnel_idle_seconds"),
    ({"stream_idle_timeout_seconds": -1}, "proxy.stream_idle_timeout_seconds"),
    ({"max_connections": -1}, "proxy.max_connections"),
    ({"max_connections": 10, "max_connections_per_identity": 11}, "proxy.max_connections_per_identity"),
])
def test_bad_deadlines_and_caps_name_the_field(settings, field):
    config = _config(ProxyConfig(**settings))
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        validate(config)


def test_zero_turns_the_deadlines_and_caps_off():
    config = _config(ProxyConfig(tunnel_timeout_seconds=0, stream_idle_timeout_seconds=0, max_connections=0,
                                 max_connections_per_identity=0))
    assert validate(config) is config


def test_handshake_caps_count_per_source_address_and_name_their_settings():
    hits = []
    gate = L.handshake_limits(3, 2, lambda reporter, limit: hits.append((reporter, limit)))
    assert gate.try_acquire("10.0.0.9") is None and gate.try_acquire("10.0.0.9") is None
    assert gate.try_acquire("10.0.0.9") == "per_source"
    assert gate.try_acquire("10.0.0.1") is None
    assert gate.try_acquire("10.0.0.2") == "total"
    assert hits == [("handshake", "per_source"), ("handshake", "total")]
    assert "proxy.max_handshakes_per_source=2" in gate.describe("per_source", "10.0.0.9")
    assert "unauthenticated handshakes" in gate.describe("total", "10.0.0.9")
    for source in ("10.0.0.9", "10.0.0.9", "10.0.0.1"):
        gate.release(source)
    assert gate.active == 0 and gate.identities == 0
