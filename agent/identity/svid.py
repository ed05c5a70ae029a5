"""X.509-SVIDs as the agent holds them: ``Svid`` (the PEMs and dates of one issued certificate) and
when to renew it.

An SVID is a short-lived ECDSA P-256 leaf whose only name is one URI SAN, the SPIFFE ID (no subject
CN, no DNS names), usable as both TLS server and client certificate. ``Svid`` holds the PEMs; its
repr never shows the private key. ``renewal_time`` is pure; the renewal schedule (jitter, retries)
is ``schedule.py``'s. Minting one (key generation, the certificate profile, signing) is
``issue.py``'s and runs in the minting worker process (``minting_worker.py``), never in the agent.

Pure: must not import cryptography, ssl, sockets or anything of the data path — the long-running
agent imports it. Whoever mints in-process (tools, tests) imports ``issue.issue_svid`` directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from agent.identity.spiffe import SpiffeId

# not_before lies this far in the past so that a peer whose clock lags still accepts a fresh SVID.
CLOCK_SKEW_ALLOWANCE = timedelta(minutes=2)
MIN_TTL_SECONDS = 60
# The floor when a test or development setup asks for short TTLs on purpose (identity.dev_short_ttl).
DEV_MIN_TTL_SECONDS = 2


@dataclass(frozen=True)
class Svid:
    """One issued X.509-SVID. ``chain_pem``: certificates presented after the leaf (root excluded)."""

    spiffe_id: SpiffeId
    cert_pem: str
    key_pem: str = field(repr=False)
    chain_pem: tuple[str, ...]
    serial: int
    not_before: datetime
    not_after: datetime
    # When it was issued: not_before lies CLOCK_SKEW_ALLOWANCE earlier, so lifetimes count from here.
    issued_at: datetime

    @property
    def lifetime(self) -> timedelta:
        """How long it was issued for (from ``issued_at``; the skew allowance is not part of it)."""
        return self.not_after - self.issued_at

    @property
    def full_chain_pem(self) -> str:
        """Leaf then intermediates: what a TLS peer is sent."""
        return self.cert_pem + "".join(self.chain_pem)

    def to_wire(self) -> dict[str, Any]:
        """The minting worker's answer for this SVID (JSON; the key included: it travels over a pipe only)."""
        return {"spiffe_id": self.spiffe_id.uri, "cert_pem": self.cert_pem, "key_pem": self.key_pem,
                "chain_pem": list(self.chain_pem), "serial": self.serial, "not_before": self.not_before.isoformat(),
                "not_after": self.not_after.isoformat(), "issued_at": self.issued_at.isoformat()}

    @classmethod
    def from_wire(cls, doc: dict[str, Any]) -> "Svid":
        return cls(spiffe_id=SpiffeId.parse(doc["spiffe_id"]), cert_pem=doc["cert_pem"], key_pem=doc["key_pem"],
                   chain_pem=tuple(doc["chain_pem"]), serial=int(doc["serial"]),
                   not_before=datetime.fromisoformat(doc["not_before"]),
                   not_after=datetime.fromisoformat(doc["not_after"]),
                   issued_at=datetime.fromisoformat(doc["issued_at"]))

    def __repr__(self) -> str:
        return (f"Svid({self.spiffe_id.uri}, serial={self.serial:#x}, "
                f"not_before={self.not_before.isoformat()}, not_after={self.not_after.isoformat()})")

    __str__ = __repr__


def renewal_time(svid: Svid) -> datetime:
    """When to replace ``svid`` at the latest without jitter: half-way through its lifetime, so a failed
    renewal has the other half to retry. Counted from ``issued_at``, not the back-dated ``not_before``
    (with a TTL of seconds, the two-minute skew allowance would otherwise put it in the past)."""
    return svid.issued_at + svid.lifetime / 2


def needs_renewal(svid: Svid, now: datetime) -> bool:
    return now >= renewal_time(svid)

