"""TLS contexts built from SVIDs: the client side, the per-identity server side, and the SNI front.

Every context is TLS 1.3 only, mutual (a peer certificate chaining to the trust bundle is
required), strict X.509 checking, ALPN ``tcpmesh/2``, and no session tickets (every connection
does a full handshake, so a peer's certificate is checked on every connection). Host name checking
is off: SPIFFE IDs are checked explicitly with ``peer_spiffe_id`` / ``check_peer``.

OpenSSL loads keys only from paths, so key material is handed over through an anonymous memory file
(``memfd_create``, read back through ``/proc/self/fd``) that never touches a disk; where that is not
available, through a 0600 file in a caller-given private (tmpfs) directory, unlinked at once.
Owns no sockets. Builds contexts; the proxies use them.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import ssl
import weakref
from pathlib import Path
from typing import Iterator, Mapping

from agent.identity import peer
from agent.identity.errors import PeerIdentityError, PeerProtocolError, TlsSetupError
from agent.identity.spiffe import SpiffeId
from agent.identity.svid import Svid

ALPN = "tcpmesh/2"  # docs/protocol.md; tcpmesh/1 (one tunnel per connection) was retired before release
# The TLS 1.3 key exchange group: ECDHE only, never finite-field DH (docs/security.md). P-256, not
# X25519: Python 3.11.2 (Debian 12's python3, what `make install` uses) knows only EC curves in
# set_ecdh_curve ("unknown group" for X25519, which 3.11.7 accepts), and every agent must pin the same
# group whatever Python it runs on, or two nodes would share no group (found by the VM tier).
KEY_EXCHANGE_GROUPS = ("prime256v1",)
KEY_FILE_MODE = 0o600

__all__ = [
    "ALPN", "PeerIdentityError", "PeerProtocolError", "SniServerContexts", "TlsSetupError", "check_alpn",
    "check_peer", "client_context", "describe_tls_error", "peer_credential", "peer_not_after", "peer_spiffe_id",
    "require_verified_chain", "server_context", "trust_anchors", "verified_chain",
]
_PEM_CERT = re.compile(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)
_DER = 2  # _ssl.ENCODING_DER, for Certificate.public_bytes


def client_context(svid: Svid, trust_bundle_pem: str | bytes, *, key_dir: str | Path | None = None) -> ssl.SSLContext:
    """Dial side: presents ``svid``, requires a server chain to the bundle. Pass ``server_hostname=id.sni``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # SPIFFE IDs are checked by check_peer, not by DNS names
    _harden(ctx, trust_bundle_pem)
    _load_svid(ctx, svid, key_dir)
    return ctx


def server_context(svid: Svid, trust_bundle_pem: str | bytes, *, key_dir: str | Path | None = None) -> ssl.SSLContext:
    """Accept side for one identity: presents ``svid``, requires a client chain to the bundle."""
    ctx = _bare_server_context(trust_bundle_pem)
    _load_svid(ctx, svid, key_dir)
    return ctx


class SniServerContexts:
    """One front server context whose SNI callback switches to the context of the identity named.

    ``context`` is what the inbound listener wraps sockets with. ``replace`` swaps the whole
    identity → context mapping at once (rotation, workloads added or removed) without rebuilding the
    front. An unknown or missing server name ends the handshake with an unrecognized_name alert.
    All identities must share one trust domain (``SpiffeId.sni`` is unambiguous only within one).
    """

    def __init__(self, trust_bundle_pem: str | bytes, contexts: Mapping[SpiffeId, ssl.SSLContext] | None = None) -> None:
        # Verification mode, protocol versions and X.509 flags are taken from the context a
        # connection starts with, not the one the callback switches to: the front has them all.
        self.context = _bare_server_context(trust_bundle_pem)
        self._by_sni: dict[str, ssl.SSLContext] = {}
        # Every context ever installed → its identity; weak, so retired contexts go with their last connection.
        self._served: weakref.WeakKeyDictionary[ssl.SSLContext, SpiffeId] = weakref.WeakKeyDictionary()
        self.replace(contexts or {})
        self.context.sni_callback = self._on_sni

    def replace(self, contexts: Mapping[SpiffeId, ssl.SSLContext]) -> None:
        trust_domains = {spiffe_id.trust_domain for spiffe_id in contexts}
        if len(trust_domains) > 1:
            raise TlsSetupError(f"local identities span several trust domains ({', '.join(sorted(trust_domains))}); "
                                "one agent serves one trust domain")
        for spiffe_id, ctx in contexts.items():
            self._served[ctx] = spiffe_id
        self._by_sni = {spiffe_id.sni: ctx for spiffe_id, ctx in contexts.items()}  # one assignment: atomic

    def served_identity(self, ssl_object: ssl.SSLObject | ssl.SSLSocket) -> SpiffeId | None:
        """The local identity a handshake on the front presented (the one the client's SNI named).

        Still answers after that identity was replaced or removed; None before the SNI callback ran.
        """
        return self._served.get(ssl_object.context)

    def _on_sni(self, ssl_object: ssl.SSLObject, server_name: str | None, _front: ssl.SSLContext) -> int | None:
        chosen = self._by_sni.get(server_name.lower()) if server_name else None  # reads the current mapping
        if chosen is None:
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        ssl_object.context = chosen
        return None

    @property
    def server_names(self) -> frozenset[str]:
        return frozenset(self._by_sni)

    def __repr__(self) -> str:
        return f"SniServerContexts({sorted(self._by_sni)})"


def peer_spiffe_id(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> SpiffeId:
    """The SPIFFE ID in the verified peer certificate's single URI SAN."""
    cert = ssl_object.getpeercert()
    if cert is None:
        raise PeerIdentityError("peer presented no certificate, expected an X.509-SVID")
    if not cert:
        raise PeerIdentityError("peer certificate was not verified; use a context from agent.identity.tls")
    return peer.spiffe_id_from_sans(cert.get("subjectAltName", ()))


def peer_not_after(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> float:
    """When the verified peer certificate of an established connection expires (unix time).

    TLS checks validity once, at the handshake; a long-lived tunnel that carries new streams should
    stop doing so after this moment.
    """
    cert = ssl_object.getpeercert()
    if not cert or "notAfter" not in cert:
        raise PeerIdentityError("peer certificate was not verified; use a context from agent.identity.tls")
    return ssl.cert_time_to_seconds(cert["notAfter"])


def verified_chain(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> list:
    """The chain OpenSSL verified at the handshake, leaf first, trust anchor last; [] if the peer sent no
    certificate. Items are ``_ssl.Certificate`` (``public_bytes(2)``: DER, ``get_info()``: the dates).

    The one place that reads it: Python 3.11 has no public way (``SSLObject.get_verified_chain`` is 3.13's, and
    gives DER bytes without dates), so this calls the private C object's method (``_sslobj``, Python 3.10 and
    later; 3.13's public method is built on it). Fail closed: a Python without it raises ``TlsSetupError``
    naming the fix, never "no chain" — a caller would take a verified client for one without a certificate and
    skip its root and expiry checks (``tests/unit/test_identity_verified_chain.py``)."""
    getter = getattr(getattr(ssl_object, "_sslobj", None), "get_verified_chain", None)
    if getter is None:
        raise TlsSetupError(_NO_VERIFIED_CHAIN)
    return list(getter() or ())


def require_verified_chain() -> None:
    """At start (the agent's and the issuer's): ``TlsSetupError`` if this Python cannot give ``verified_chain``,
    so a missing private attribute stops the process rather than the first connection that needs it."""
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_side=True)
    verified_chain(probe)


_NO_VERIFIED_CHAIN = (f"this Python ({'.'.join(map(str, __import__('sys').version_info[:3]))}) gives no way to read a "
                      "TLS peer's verified chain (the private ssl.SSLObject._sslobj.get_verified_chain of Python 3.10 "
                      "to 3.13 is missing); tcpmesh refuses to run without it, since it checks which root a peer's "
                      "chain ends at and when it expires: run the agent and the issuer on Python 3.10-3.13 (Debian "
                      "12's python3 is 3.11), or port agent.identity.tls.verified_chain to this Python")


def peer_credential(ssl_object: ssl.SSLObject) -> peer.PeerCredential:
    """The verified chain of an established connection, reduced to when it stops being valid and the
    root it led to (``peer.PeerCredential``). Uses the verified chain OpenSSL built at the handshake."""
    chain = verified_chain(ssl_object)
    if not chain:
        raise PeerIdentityError("peer certificate was not verified; use a context from agent.identity.tls")
    not_after = min(ssl.cert_time_to_seconds(cert.get_info()["notAfter"]) for cert in chain)
    return peer.PeerCredential(not_after, _fingerprint(chain[-1].public_bytes(_DER)))


def trust_anchors(trust_bundle_pem: str | bytes) -> frozenset[str]:
    """The fingerprints of every certificate in a PEM trust bundle, as agent.identity.bundle names roots."""
    text = trust_bundle_pem.decode() if isinstance(trust_bundle_pem, bytes) else trust_bundle_pem
    return frozenset(_fingerprint(ssl.PEM_cert_to_DER_cert(block)) for block in _PEM_CERT.findall(text))


def _fingerprint(der: bytes) -> str:
    return "sha256:" + hashlib.sha256(der).hexdigest()  # the form of agent.identity.bundle.fingerprint


def check_peer(ssl_object: ssl.SSLObject | ssl.SSLSocket, expected: SpiffeId) -> SpiffeId:
    """The peer's SPIFFE ID if it is ``expected``; ``PeerIdentityError`` naming both otherwise."""
    return peer.check_expected(peer_spiffe_id(ssl_object), expected)


# OpenSSL's X509_V_ERR_* codes for the ways a peer's chain fails, in the operator's words.
_VERIFY_REASONS = {
    9: "peer certificate is not yet valid (its not-before is in the future: a clock is wrong, or it was issued ahead)",
    10: "peer certificate has expired",
    2: "peer certificate was issued by an unknown CA (its issuer is not in this node's trust bundle)",
    18: "peer certificate is self-signed, not issued by a CA of this node's trust bundle (unknown CA)",
    19: "peer certificate chains to a root that is not in this node's trust bundle (unknown CA)",
    20: "peer certificate was issued by an unknown CA (its chain does not lead to a root of this node's trust bundle)",
    7: "peer certificate signature does not verify (forged, or issued by an unknown CA of the same name)",
    47: "peer certificate names an identity outside this trust domain (the CA's name constraint forbids it)",
    12: "a CA in the peer's chain is not yet valid",
    13: "a CA in the peer's chain has expired",
    25: "the peer's chain is longer than the CAs allow (pathlen)",
}
# TLS alerts that mean the *peer* refused *our* certificate.
_ALERT_REASONS = {
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "the peer rejected this node's certificate as expired",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the peer rejected this node's certificate (bad certificate: not yet valid, or malformed)",
    "TLSV1_ALERT_UNKNOWN_CA": "the peer does not trust the CA of this node's certificate (unknown CA: is the root in its bundle?)",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": "the peer rejected this node's certificate (unsupported certificate)",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "the peer rejected this node's certificate (certificate unknown)",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "the peer requires a client certificate and got none",
    "TLSV1_UNRECOGNIZED_NAME": "the peer serves no identity under the requested name (SNI): is the workload registered on its node?",
    "TLSV1_ALERT_UNRECOGNIZED_NAME": "the peer serves no identity under the requested name (SNI): is the workload registered on its node?",
}


def describe_tls_error(exc: ssl.SSLError) -> str:
    """Why a handshake failed, for logs and flow records: which certificate check failed, in words.

    Verification failures on this side name the X.509 reason (expired, not yet valid, unknown CA,
    outside the trust domain) with OpenSSL's own message; alerts name what the peer refused.
    """
    if isinstance(exc, ssl.SSLCertVerificationError):
        code = exc.verify_code
        words = _VERIFY_REASONS.get(code, "peer certificate failed verification")
        return f"{words} [{exc.verify_message or exc.reason}]"
    reason = exc.reason or ""
    if reason in _ALERT_REASONS:
        return f"{_ALERT_REASONS[reason]} [{reason}]"
    return reason or str(exc)


def check_alpn(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> str:
    """``ALPN`` if it was negotiated. A server whose client offered no common protocol still completes
    the handshake (OpenSSL's 'no ack'), so both sides must check before speaking."""
    chosen = ssl_object.selected_alpn_protocol()
    if chosen != ALPN:
        raise PeerProtocolError(f"peer negotiated ALPN {chosen!r}, expected {ALPN!r}; "
                                "is the peer a tcpmesh agent of a compatible version?")
    return chosen


def _bare_server_context(trust_bundle_pem: str | bytes) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _harden(ctx, trust_bundle_pem)
    ctx.num_tickets = 0
    return ctx


def _pin_key_exchange(ctx: ssl.SSLContext) -> None:
    """The first of KEY_EXCHANGE_GROUPS this Python's ssl can pin as the only group."""
    for group in KEY_EXCHANGE_GROUPS:
        try:
            ctx.set_ecdh_curve(group)
            return
        except (ssl.SSLError, ValueError):
            continue
    raise TlsSetupError(f"this Python's ssl module cannot restrict TLS key exchange to {' or '.join(KEY_EXCHANGE_GROUPS)}; "
                        "run the agent with a Python linked against OpenSSL 3 (Debian 12's python3 works)")


def _harden(ctx: ssl.SSLContext, trust_bundle_pem: str | bytes) -> None:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    ctx.options |= ssl.OP_NO_TICKET | ssl.OP_NO_COMPRESSION
    # Key exchange on an elliptic curve only: OpenSSL 3 also offers and accepts the finite-field
    # groups (ffdhe2048 ...) in TLS 1.3. With OpenSSL 3, set_ecdh_curve sets the group list to this
    # one curve (Python 3.11's ssl has no call for several); agents offer it as their first key share.
    _pin_key_exchange(ctx)
    ctx.set_alpn_protocols([ALPN])
    bundle = trust_bundle_pem.decode("ascii") if isinstance(trust_bundle_pem, bytes) else trust_bundle_pem
    try:
        ctx.load_verify_locations(cadata=bundle)  # str: PEM (bytes would be read as DER)
    except (ssl.SSLError, ValueError) as exc:
        raise TlsSetupError(f"the trust bundle is not usable PEM ({exc}); pass the CA's ca.crt contents") from exc


def _load_svid(ctx: ssl.SSLContext, svid: Svid, key_dir: str | Path | None) -> None:
    try:
        with _private_file(svid.full_chain_pem, key_dir) as chain_path, \
                _private_file(svid.key_pem, key_dir) as key_path:
            ctx.load_cert_chain(chain_path, key_path)
    except ssl.SSLError as exc:
        # OpenSSL's reason names what failed (for example a key that does not match), never key bytes.
        raise TlsSetupError(f"cannot load the SVID of {svid.spiffe_id.uri} into a TLS context: "
                            f"{exc.reason or exc}") from None


@contextlib.contextmanager
def _private_file(text: str, key_dir: str | Path | None) -> Iterator[str]:
    """A path OpenSSL can read ``text`` from, readable only by this process, gone on exit."""
    fd = _memfd()
    if fd is not None:
        try:
            _write_all(fd, text.encode("ascii"))
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    if key_dir is None:
        raise TlsSetupError("cannot hand key material to OpenSSL: memfd_create or /proc is unavailable and no "
                            "private key directory was given; pass key_dir, a 0700 tmpfs directory such as "
                            "/run/tcpmesh/keys")
    path = Path(key_dir) / f".svid-{secrets.token_hex(8)}.pem"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, KEY_FILE_MODE)
    except OSError as exc:
        raise TlsSetupError(f"cannot create a private key file in {key_dir}: {exc.strerror}; "
                            "key_dir must be an existing directory the agent can write") from None
    try:
        try:
            os.fchmod(fd, KEY_FILE_MODE)
            _write_all(fd, text.encode("ascii"))
        finally:
            os.close(fd)
        yield str(path)
    finally:
        path.unlink(missing_ok=True)


def _memfd() -> int | None:
    """An anonymous in-memory file reachable through /proc/self/fd, or None where that does not work."""
    create = getattr(os, "memfd_create", None)
    if create is None:
        return None
    try:
        fd = create("tcpmesh-svid", getattr(os, "MFD_CLOEXEC", 0))
    except OSError:
        return None
    if not os.path.exists(f"/proc/self/fd/{fd}"):
        os.close(fd)
        return None
    return fd


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def issuer_context(server: bool, trust_bundle_pem: str | bytes, chain_pem: str | None, key_pem: str | None, *,
                   alpn: str, key_dir: str | Path | None = None) -> ssl.SSLContext:
    """A context for the issuer protocol: TLS 1.3, P-256 key exchange only, strict X.509, ``alpn``.

    Server side: the client certificate is optional (a joining node has none yet; the issuer decides per
    request) but verified against the bundle when sent. Client side: the issuer's certificate is required;
    its name (``spiffe://<td>/tcpmesh/issuer``) is checked by the caller. ``chain_pem``/``key_pem`` (the
    issuer's server credential, or the node credential) reach OpenSSL through a memfd as for SVIDs."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    _harden(ctx, trust_bundle_pem)
    ctx.set_alpn_protocols([alpn])
    if server:
        ctx.verify_mode = ssl.CERT_OPTIONAL
        ctx.num_tickets = 0
    else:
        ctx.check_hostname = False
    if chain_pem is not None and key_pem is not None:
        load_credential(ctx, chain_pem, key_pem, key_dir=key_dir)
    return ctx


def load_credential(ctx: ssl.SSLContext, chain_pem: str, key_pem: str, *, key_dir: str | Path | None = None) -> None:
    """Load (or replace: new handshakes only) a certificate chain and key into ``ctx`` through a memfd."""
    try:
        with _private_file(chain_pem, key_dir) as chain_path, _private_file(key_pem, key_dir) as key_path:
            ctx.load_cert_chain(chain_path, key_path)
    except ssl.SSLError as exc:
        raise TlsSetupError(f"cannot load the issuer-protocol certificate: {exc.reason or exc}") from None


def peer_uri(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> str | None:
    """The single URI SAN of the verified peer certificate, or None (no certificate, or not one URI)."""
    cert = ssl_object.getpeercert()
    if not cert:
        return None
    uris = [value for kind, value in cert.get("subjectAltName", ()) if kind == "URI"]
    return uris[0] if len(uris) == 1 else None
