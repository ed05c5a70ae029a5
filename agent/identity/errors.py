"""Errors of the identity layer: the CA files, SVID issuance, TLS context setup, and peer identities.

Pure: imports nothing from the outside world. Messages never contain key material.
"""

from __future__ import annotations

from agent.errors import TcpmeshError


class IdentityError(TcpmeshError):
    """Base class: something about certificates or keys an operator can act on."""


class CaError(IdentityError):
    """The CA directory or its files are missing, unreadable, garbled or do not belong together."""


class SvidError(IdentityError):
    """An SVID cannot be issued as asked (wrong trust domain, bad TTL)."""


class TlsSetupError(IdentityError):
    """A TLS context could not be built from an SVID and a trust bundle."""


class UnknownIdentityError(IdentityError, LookupError):
    """An identity was asked for that is not one of this node's local identities."""


class PeerIdentityError(IdentityError):
    """The peer of a TLS connection did not present the identity it had to (the peer's fault)."""


class PeerProtocolError(IdentityError):
    """The peer did not negotiate the tunnel protocol (ALPN) this agent speaks (the peer's fault)."""


class MinterError(IdentityError):
    """The SVID minting worker process could not be started, crashed, timed out or answered garbage."""
