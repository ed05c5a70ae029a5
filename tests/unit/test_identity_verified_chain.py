"""The verified chain of a TLS connection — the root a client's chain ended at (the issuer's ``removed_root``) and
its earliest notAfter (the inbound proxy's per-OPEN check) — is read through one helper,
``agent.identity.tls.verified_chain``. Python 3.11 has no public way (``SSLObject.get_verified_chain`` is 3.13's);
the private C object's is used, and a Python without it must fail closed and loudly, never answer "no chain"
(a caller would take a verified client for one without a certificate and skip its root and expiry checks).

Seen failing before the helper: ``trustroots.chain_root`` answered None (no client certificate) for a connection
whose private attribute was gone, so a client under a removed root was served as one without a certificate;
``tls.peer_credential`` raised a bare AttributeError naming nothing."""

from __future__ import annotations

import ssl

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from agent.identity.bundle import fingerprint
from agent.identity.ca import generate_ca
from agent.identity.errors import TlsSetupError
from agent.identity.issue import issue_svid
from agent.identity.spiffe import SpiffeId
from agent.identity.tls import (SniServerContexts, client_context, peer_credential, require_verified_chain,
                                server_context, verified_chain)
from agent.issuer.trustroots import chain_root
from tests.unit.test_identity_tls import handshake

CLIENT = SpiffeId.parse("spiffe://td/ns/a/sa/b")
DB = SpiffeId.parse("spiffe://td/ns/db/sa/postgres")


class _WithoutPrivateChain:
    """An established connection as a Python without ``_sslobj.get_verified_chain`` would show it."""

    def __init__(self, real: ssl.SSLObject) -> None:
        self._real = real
        self._sslobj = object()

    def __getattr__(self, name: str):
        return getattr(self._real, name)


class _GoneSslObject(ssl.SSLObject):
    @classmethod
    def _create(cls, *args, **kwargs):
        made = super()._create(*args, **kwargs)
        made._sslobj = object()
        return made


@pytest.fixture(scope="module")
def established():
    root = generate_ca("td")
    client, server = issue_svid(root, CLIENT, 600), issue_svid(root, DB, 3600)
    front = SniServerContexts(root.cert_pem, {DB: server_context(server, root.cert_pem)})
    return root, handshake(client_context(client, root.cert_pem), front.context, DB.sni)


def test_on_this_python_the_verified_chain_ends_at_the_root(established) -> None:
    root, result = established
    require_verified_chain()
    chain = verified_chain(result.server)
    assert len(chain) == 2 and chain[-1].public_bytes(2) == root.certificate.public_bytes(Encoding.DER)
    assert chain_root(result.server).fingerprint == fingerprint(root.certificate)


def test_without_the_private_attribute_every_reader_fails_closed_naming_the_fix(established, monkeypatch) -> None:
    _, result = established
    gone = _WithoutPrivateChain(result.server)
    for read in (verified_chain, chain_root, peer_credential):
        with pytest.raises(TlsSetupError, match=r"get_verified_chain.*Python 3\.10"):
            read(gone)
    monkeypatch.setattr(ssl.SSLContext, "sslobject_class", _GoneSslObject)   # the start-time probe sees it too
    with pytest.raises(TlsSetupError, match="get_verified_chain"):
        require_verified_chain()
