"""Secure naming: which SPIFFE ID a verified peer certificate names, and whether it is the one expected.

Pure: works on the subjectAltName entries of an already verified certificate (as the ssl module
decodes them: ``("URI", "spiffe://...")``). Imports no ssl, sockets or cryptography.
"""

from __future__ import annotations

from typing import Iterable

from agent.identity.errors import PeerIdentityError
from agent.identity.spiffe import SCHEME, SpiffeId, SpiffeIdError


def spiffe_id_from_sans(sans: Iterable[tuple[str, str]]) -> SpiffeId:
    """The SPIFFE ID of a certificate with exactly one URI SAN, which must be a tcpmesh SPIFFE ID."""
    uris = [value for kind, value in sans if kind == "URI"]
    if not uris:
        raise PeerIdentityError("peer presented a certificate with no URI SAN, expected one spiffe:// ID")
    if len(uris) > 1:
        raise PeerIdentityError(f"peer presented a certificate with {len(uris)} URI SANs ({', '.join(uris)}), "
                                "an X.509-SVID has exactly one")
    uri = uris[0]
    if not uri.startswith(SCHEME):
        raise PeerIdentityError(f"peer presented {uri!r}, which is not a spiffe:// ID")
    try:
        return SpiffeId.parse(uri)
    except SpiffeIdError as exc:
        raise PeerIdentityError(f"peer presented {uri!r}, which is not a tcpmesh SPIFFE ID: {exc}") from exc


def check_expected(actual: SpiffeId, expected: SpiffeId) -> SpiffeId:
    """``actual`` if it is ``expected``; otherwise the peer is someone else and the connection must end."""
    if actual != expected:
        raise PeerIdentityError(f"peer presented {actual.uri}, expected {expected.uri}")
    return actual
