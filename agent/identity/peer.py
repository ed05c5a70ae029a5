"""Secure naming: which SPIFFE ID a verified peer certificate names, and whether it is the one expected;
and whether the credential a long-lived tunnel was verified with still holds (``PeerCredential``).

Pure: works on the subjectAltName entries of an already verified certificate (as the ssl module
decodes them: ``("URI", "spiffe://...")``) and on times and fingerprints. Imports no ssl, sockets or
cryptography.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
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


@dataclass(frozen=True)
class PeerCredential:
    """What a tunnel's peer proved at its handshake, reduced to what can stop holding later: the end of
    the verified chain's validity (the earliest notAfter in it) and the trust anchor it led to (the
    root's fingerprint, ``sha256:<hex of its DER>``, as agent.identity.bundle names roots)."""
    not_after: float  # unix time
    anchor: str

    def problem(self, now: float, anchors: frozenset[str]) -> str | None:
        """Why the credential no longer holds at ``now`` under the trust anchors ``anchors``; None if it does."""
        if now >= self.not_after:
            when = datetime.datetime.fromtimestamp(self.not_after, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
            return (f"the client certificate chain of this tunnel expired at {when} UTC "
                    f"({now - self.not_after:.0f}s ago); open a new tunnel with a current SVID")
        if self.anchor not in anchors:
            return (f"the client certificate of this tunnel chains to root {self.anchor.split(':', 1)[-1][:12]}, "
                    "which is no longer in this node's trust bundle")
        return None
