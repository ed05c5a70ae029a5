"""Real TLS 1.3 mTLS handshakes between the contexts tcpmesh builds, over in-memory BIO pairs."""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from agent.identity import tls
from agent.identity.ca import generate_ca
from agent.identity.errors import PeerIdentityError, PeerProtocolError, TlsSetupError
from agent.identity.spiffe import SpiffeId
from agent.identity.store import IdentityStore
from agent.identity.issue import issue_svid
from agent.identity.tls import ALPN, SniServerContexts, check_alpn, check_peer, client_context, peer_spiffe_id, \
    server_context
from tests.conftest import skip_or_fail

CLIENT = SpiffeId.parse("spiffe://td/ns/a/sa/b")
DB = SpiffeId.parse("spiffe://td/ns/db/sa/postgres")
CACHE = SpiffeId.parse("spiffe://td/ns/cache/sa/redis")


@dataclass
class Handshake:
    client: ssl.SSLObject
    server: ssl.SSLObject
    errors: dict[str, ssl.SSLError] = field(default_factory=dict)

    @property
    def established(self) -> bool:
        return not self.errors


def handshake(client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext, server_hostname: str | None) -> Handshake:
    """Drive both ends to completion, moving bytes between two BIO pairs; then exchange one byte each
    way, because a TLS 1.3 client learns that the server rejected its certificate only on its next read."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    result = Handshake(client_ctx.wrap_bio(c_in, c_out, server_hostname=server_hostname),
                       server_ctx.wrap_bio(s_in, s_out, server_side=True))
    ends = {"client": result.client, "server": result.server}
    pending = {name: end.do_handshake for name, end in ends.items()}

    def pump() -> bool:
        moved = False
        for source, sink in ((c_out, s_in), (s_out, c_in)):
            data = source.read()
            if data:
                sink.write(data)
                moved = True
        return moved

    def run() -> None:
        while True:
            for name in list(pending):
                try:
                    pending[name]()
                    del pending[name]
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    pass
                except ssl.SSLError as exc:
                    result.errors.setdefault(name, exc)
                    del pending[name]
            if not pump():
                return

    run()
    pending.clear()
    for name, end in ends.items():
        if name not in result.errors:
            end.write(name[0].encode())
            pending[name] = lambda end=end: end.read(1)
    run()
    return result


@pytest.fixture(scope="module")
def ca():
    return generate_ca("td")


@pytest.fixture(scope="module")
def bundle(ca) -> str:
    return ca.cert_pem


@pytest.fixture(scope="module")
def front(ca, bundle) -> SniServerContexts:
    """A node holding two local identities, DB and CACHE."""
    return SniServerContexts(bundle, {i: server_context(issue_svid(ca, i, 3600), bundle) for i in (DB, CACHE)})


@pytest.fixture(scope="module")
def client_ctx(ca, bundle) -> ssl.SSLContext:
    return client_context(issue_svid(ca, CLIENT, 3600), bundle)


def _error_text(result: Handshake) -> str:
    return " | ".join(f"{side}: {exc}" for side, exc in result.errors.items())


def test_sni_picks_the_identity_and_both_sides_learn_each_other(front, client_ctx) -> None:
    for wanted in (DB, CACHE):
        result = handshake(client_ctx, front.context, wanted.sni)
        assert result.established, _error_text(result)
        assert result.client.version() == result.server.version() == "TLSv1.3"
        assert result.client.selected_alpn_protocol() == result.server.selected_alpn_protocol() == ALPN
        assert check_alpn(result.client) == check_alpn(result.server) == ALPN
        assert peer_spiffe_id(result.client) == wanted  # the server presented the SVID the SNI named
        assert check_peer(result.client, wanted) == wanted
        assert peer_spiffe_id(result.server) == CLIENT
        assert front.served_identity(result.server) == wanted


def test_check_peer_rejects_a_mismatched_identity(front, client_ctx) -> None:
    result = handshake(client_ctx, front.context, DB.sni)
    assert result.established, _error_text(result)
    with pytest.raises(PeerIdentityError) as err:
        check_peer(result.server, DB)
    assert str(err.value) == "peer presented spiffe://td/ns/a/sa/b, expected spiffe://td/ns/db/sa/postgres"


def test_client_certificate_from_another_ca_is_rejected(front, bundle) -> None:
    other = generate_ca("td")
    stranger = client_context(issue_svid(other, CLIENT, 3600), other.cert_pem + bundle)  # trusts us; we don't trust it
    result = handshake(stranger, front.context, DB.sni)
    assert "server" in result.errors and "certificate verify failed" in str(result.errors["server"])
    assert "client" in result.errors  # the alert reaches the client on its first read


def test_server_certificate_from_another_ca_is_rejected(client_ctx) -> None:
    other = generate_ca("td")
    impostor = SniServerContexts(other.cert_pem, {DB: server_context(issue_svid(other, DB, 3600), other.cert_pem)})
    result = handshake(client_ctx, impostor.context, DB.sni)
    assert "certificate verify failed" in str(result.errors.get("client"))


def test_client_without_certificate_is_rejected(front, bundle) -> None:
    anonymous = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    anonymous.check_hostname = False
    anonymous.load_verify_locations(cadata=bundle)
    result = handshake(anonymous, front.context, DB.sni)
    assert "PEER_DID_NOT_RETURN_A_CERTIFICATE" in str(result.errors.get("server"))


def test_expired_client_svid_is_rejected(ca, bundle, front) -> None:
    old = issue_svid(ca, CLIENT, 60, now=datetime.now(timezone.utc) - timedelta(hours=2))
    result = handshake(client_context(old, bundle), front.context, DB.sni)
    assert "certificate has expired" in str(result.errors.get("server"))


def test_expired_server_svid_is_rejected(ca, bundle, client_ctx) -> None:
    old = issue_svid(ca, DB, 60, now=datetime.now(timezone.utc) - timedelta(hours=2))
    result = handshake(client_ctx, SniServerContexts(bundle, {DB: server_context(old, bundle)}).context, DB.sni)
    assert "certificate has expired" in str(result.errors.get("client"))


def test_tls12_client_is_refused(ca, bundle, front) -> None:
    legacy = client_context(issue_svid(ca, CLIENT, 3600), bundle)
    legacy.minimum_version = ssl.TLSVersion.TLSv1_2
    legacy.maximum_version = ssl.TLSVersion.TLSv1_2
    result = handshake(legacy, front.context, DB.sni)
    assert "server" in result.errors and "client" in result.errors
    assert "UNSUPPORTED_PROTOCOL" in str(result.errors["server"])


def test_tls12_server_is_refused(ca, bundle, client_ctx) -> None:
    legacy = server_context(issue_svid(ca, DB, 3600), bundle)
    legacy.minimum_version = ssl.TLSVersion.TLSv1_2
    legacy.maximum_version = ssl.TLSVersion.TLSv1_2
    result = handshake(client_ctx, legacy, DB.sni)
    assert "client" in result.errors


@pytest.mark.parametrize("name", ["unknown.ns.id.td", None])
def test_unknown_or_missing_sni_is_refused(front, client_ctx, name) -> None:
    result = handshake(client_ctx, front.context, name)
    assert "UNRECOGNIZED_NAME" in str(result.errors.get("client")), _error_text(result)


def test_mapping_swaps_without_rebuilding_the_front(ca, bundle, client_ctx) -> None:
    sni = SniServerContexts(bundle)
    front_ctx = sni.context
    assert "UNRECOGNIZED_NAME" in str(handshake(client_ctx, front_ctx, DB.sni).errors.get("client"))
    sni.replace({DB: server_context(issue_svid(ca, DB, 3600), bundle)})
    assert sni.context is front_ctx and sni.server_names == {DB.sni}
    assert handshake(client_ctx, front_ctx, DB.sni).established
    sni.replace({})
    assert "UNRECOGNIZED_NAME" in str(handshake(client_ctx, front_ctx, DB.sni).errors.get("client"))


def test_front_refuses_several_trust_domains(bundle) -> None:
    other = SpiffeId.parse("spiffe://other/ns/db/sa/postgres")
    with pytest.raises(TlsSetupError, match="several trust domains"):
        SniServerContexts(bundle, {DB: ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER),
                                   other: ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)})


def test_alpn_mismatch_is_detected(ca, bundle, front) -> None:
    other_protocol = client_context(issue_svid(ca, CLIENT, 3600), bundle)
    other_protocol.set_alpn_protocols(["h2"])
    result = handshake(other_protocol, front.context, DB.sni)
    assert result.established  # OpenSSL servers complete the handshake without ALPN ("no ack")...
    for end in (result.server, result.client):  # ...so each side must check before speaking
        with pytest.raises(PeerProtocolError, match="negotiated ALPN None, expected 'tcpmesh/2'"):
            check_alpn(end)


def memfd_problem() -> str | None:
    """Whether this kernel offers what the in-memory key path needs, probed without the code under test."""
    if not hasattr(os, "memfd_create"):
        return "os.memfd_create is missing (Python built without it, or not Linux)"
    try:
        fd = os.memfd_create("tcpmesh-test-probe", os.MFD_CLOEXEC)
    except OSError as exc:
        return f"memfd_create failed: {exc}"
    try:
        os.write(fd, b"probe")
        with open(f"/proc/self/fd/{fd}", "rb") as f:
            return None if f.read() == b"probe" else "/proc/self/fd does not read back a memfd"
    except OSError as exc:
        return f"/proc/self/fd is unusable: {exc}"
    finally:
        os.close(fd)


def test_key_material_never_touches_the_disk_when_memfd_works(ca, bundle, tmp_path: Path, monkeypatch) -> None:
    problem = memfd_problem()
    if problem:
        skip_or_fail(f"the in-memory key path cannot work here: {problem}")
    loaded_from: list[str] = []
    real_load = ssl.SSLContext.load_cert_chain

    def spying_load(self, certfile, keyfile=None, password=None):
        loaded_from.extend((str(certfile), str(keyfile)))
        return real_load(self, certfile, keyfile, password)

    monkeypatch.setattr(ssl.SSLContext, "load_cert_chain", spying_load)
    # A key_dir that does not exist: falling back to a file there would raise TlsSetupError.
    ctx = client_context(issue_svid(ca, CLIENT, 3600), bundle, key_dir=tmp_path / "absent")
    assert loaded_from and all(p.startswith("/proc/self/fd/") for p in loaded_from), loaded_from
    assert list(tmp_path.iterdir()) == []
    assert ctx.cert_store_stats()["x509_ca"] >= 1


def test_key_dir_fallback_uses_a_private_file_and_removes_it(ca, bundle, front, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(tls, "_memfd", lambda: None)
    modes: list[int] = []
    real_load = ssl.SSLContext.load_cert_chain

    def spying_load(self, certfile, keyfile=None, password=None):
        modes.extend(os.stat(p).st_mode & 0o777 for p in (certfile, keyfile))
        assert all(Path(p).parent == tmp_path for p in (certfile, keyfile))
        return real_load(self, certfile, keyfile, password)

    monkeypatch.setattr(ssl.SSLContext, "load_cert_chain", spying_load)
    ctx = client_context(issue_svid(ca, CLIENT, 3600), bundle, key_dir=tmp_path)
    assert modes == [0o600, 0o600]
    assert list(tmp_path.iterdir()) == []
    assert handshake(ctx, front.context, DB.sni).established


def test_no_memfd_and_no_key_dir_is_a_clear_error(ca, bundle, monkeypatch) -> None:
    monkeypatch.setattr(tls, "_memfd", lambda: None)
    with pytest.raises(TlsSetupError, match="pass key_dir"):
        client_context(issue_svid(ca, CLIENT, 3600), bundle)


def test_mismatched_key_is_a_clear_error_without_key_material(ca, bundle) -> None:
    svid = issue_svid(ca, CLIENT, 3600)
    other_key = issue_svid(ca, CLIENT, 3600).key_pem
    with pytest.raises(TlsSetupError, match="cannot load the SVID of spiffe://td/ns/a/sa/b") as err:
        client_context(replace(svid, key_pem=other_key), bundle)
    assert "PRIVATE KEY" not in str(err.value)


def test_garbled_bundle_is_a_clear_error(ca) -> None:
    with pytest.raises(TlsSetupError, match="trust bundle is not usable PEM"):
        client_context(issue_svid(ca, CLIENT, 3600), "not a certificate")


def test_store_contexts_handshake_end_to_end(ca, bundle) -> None:
    """Two nodes' stores: node 1 holds CLIENT, node 2 holds DB and CACHE."""
    node1, node2 = IdentityStore(ca, bundle, 3600), IdentityStore(ca, bundle, 3600)
    node1.ensure([CLIENT])
    node2.ensure([DB, CACHE])
    result = handshake(node1.client_context_for(CLIENT), node2.server_context, CACHE.sni)
    assert result.established, _error_text(result)
    assert check_peer(result.client, CACHE) == CACHE and peer_spiffe_id(result.server) == CLIENT
    front_ctx = node2.server_context
    node2.ensure([DB])  # CACHE's workload left the node
    assert node2.server_context is front_ctx
    assert node2.served_identity(result.server) == CACHE  # still known after CACHE was removed
    assert "UNRECOGNIZED_NAME" in str(handshake(node1.client_context_for(CLIENT), front_ctx, CACHE.sni)
                                      .errors.get("client"))
    assert handshake(node1.client_context_for(CLIENT), front_ctx, DB.sni).established
