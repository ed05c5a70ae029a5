"""X.509-SVIDs: the certificate profile of a workload identity, issuing one, and when to renew it.

An SVID is a short-lived ECDSA P-256 leaf whose only name is one URI SAN, the SPIFFE ID (no subject
CN, no DNS names), usable as both TLS server and client certificate. ``Svid`` holds the PEMs; its
repr never shows the private key. ``renewal_time`` is pure; the renewal schedule (jitter, retries)
is ``schedule.py``'s.

Must not import ssl, sockets or anything of the data path; signing is the CA's (``ca.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from agent.identity.ca import CertificateAuthority
from agent.identity.errors import SvidError
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

    def __repr__(self) -> str:
        return (f"Svid({self.spiffe_id.uri}, serial={self.serial:#x}, "
                f"not_before={self.not_before.isoformat()}, not_after={self.not_after.isoformat()})")

    __str__ = __repr__


def issue_svid(ca: CertificateAuthority, spiffe_id: SpiffeId, ttl_seconds: int,
               now: datetime | None = None, *, min_ttl_seconds: int = MIN_TTL_SECONDS) -> Svid:
    """Mint a fresh key and an SVID for ``spiffe_id`` valid ``ttl_seconds`` (capped at the CA's expiry).

    ``min_ttl_seconds`` may be lowered (not below ``DEV_MIN_TTL_SECONDS``) by tests and development
    setups that want to watch several renewals in seconds.
    """
    if spiffe_id.trust_domain != ca.trust_domain:
        raise SvidError(f"cannot issue {spiffe_id.uri}: this CA serves trust domain {ca.trust_domain!r}, "
                        f"not {spiffe_id.trust_domain!r}; fix the workload's identity or the agent's trust_domain")
    floor = max(min_ttl_seconds, DEV_MIN_TTL_SECONDS)
    if ttl_seconds < floor:
        raise SvidError(f"SVID TTL {ttl_seconds}s is too short; use at least {floor} seconds")
    now = now or datetime.now(timezone.utc)
    not_before = now - CLOCK_SKEW_ALLOWANCE
    not_after = min(now + timedelta(seconds=ttl_seconds), ca.not_after)
    if not_after <= now:
        raise SvidError(f"cannot issue {spiffe_id.uri}: the CA expired on {ca.not_after.isoformat()}; "
                        "re-create or rotate the CA")
    key = ec.generate_private_key(ec.SECP256R1())
    serial = x509.random_serial_number()
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        # The subject is empty, so the SAN must be critical (RFC 5280 4.2.1.6).
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id.uri)]), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    certificate = ca.sign(builder)
    return Svid(
        spiffe_id=spiffe_id,
        cert_pem=certificate.public_bytes(serialization.Encoding.PEM).decode("ascii"),
        key_pem=key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()).decode("ascii"),
        chain_pem=ca.leaf_chain_pem,
        serial=serial,
        not_before=certificate.not_valid_before_utc,
        not_after=certificate.not_valid_after_utc,
        issued_at=now,
    )


def renewal_time(svid: Svid) -> datetime:
    """When to replace ``svid`` at the latest without jitter: half-way through its lifetime, so a failed
    renewal has the other half to retry. Counted from ``issued_at``, not the back-dated ``not_before``
    (with a TTL of seconds, the two-minute skew allowance would otherwise put it in the past)."""
    return svid.issued_at + svid.lifetime / 2


def needs_renewal(svid: Svid, now: datetime) -> bool:
    return now >= renewal_time(svid)
