"""Minting one X.509-SVID: a fresh key and the leaf certificate profile, signed by a CA.

Runs where cryptography may be imported: the minting worker process (``minting_worker.py``), the CLI, and
tests — never the long-running agent (``CertificateAuthority.issue_svids`` and the worker call it).
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from agent.identity.errors import SvidError
from agent.identity.spiffe import SpiffeId
from agent.identity.svid import CLOCK_SKEW_ALLOWANCE, DEV_MIN_TTL_SECONDS, MIN_TTL_SECONDS, Svid



class Issuer(Protocol):
    """What minting needs of a CA (``ca.CertificateAuthority`` is one): its trust domain and expiry, the
    chain a leaf presents after itself, and a signature. Declared here so this module does not import ``ca``."""

    trust_domain: str

    @property
    def not_after(self) -> datetime: ...

    @property
    def leaf_chain_pem(self) -> tuple[str, ...]: ...

    def sign(self, builder: x509.CertificateBuilder) -> x509.Certificate: ...


def issue_svid(ca: Issuer, spiffe_id: SpiffeId, ttl_seconds: int,
               now: datetime | None = None, *, min_ttl_seconds: int = MIN_TTL_SECONDS) -> Svid:
    """Mint a fresh key and an SVID for ``spiffe_id`` valid ``ttl_seconds`` (capped at the CA's expiry).

    ``min_ttl_seconds`` may be lowered (not below ``DEV_MIN_TTL_SECONDS``) by tests and development
    setups that want to watch several renewals in seconds.
    """
    now = now or datetime.now(timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = sign_leaf(ca, spiffe_id.uri, spiffe_id.trust_domain, key.public_key(), ttl_seconds, now,
                            min_ttl_seconds=min_ttl_seconds)
    return Svid(
        spiffe_id=spiffe_id,
        cert_pem=certificate.public_bytes(serialization.Encoding.PEM).decode("ascii"),
        key_pem=key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()).decode("ascii"),
        chain_pem=ca.leaf_chain_pem,
        serial=certificate.serial_number,
        not_before=certificate.not_valid_before_utc,
        not_after=certificate.not_valid_after_utc,
        issued_at=now,
    )


def sign_leaf(ca: Issuer, uri: str, trust_domain: str, public_key: ec.EllipticCurvePublicKey, ttl_seconds: int,
              now: datetime, *, min_ttl_seconds: int = MIN_TTL_SECONDS, client_only: bool = False) -> x509.Certificate:
    """The SVID profile around ``public_key``: one critical URI SAN ``uri``, empty subject, CA:false,
    digitalSignature, serverAuth+clientAuth (``client_only``: clientAuth alone, for node credentials),
    ``not_before`` back-dated for skew, ``not_after`` capped at the CA's. Used for keys minted here and
    for CSRs the issuer signs (the key then never left its node)."""
    if trust_domain != ca.trust_domain:
        raise SvidError(f"cannot issue {uri}: this CA serves trust domain {ca.trust_domain!r}, "
                        f"not {trust_domain!r}; fix the workload's identity or the agent's trust_domain")
    floor = max(min_ttl_seconds, DEV_MIN_TTL_SECONDS)
    if ttl_seconds < floor:
        raise SvidError(f"SVID TTL {ttl_seconds}s is too short; use at least {floor} seconds")
    not_before = now - CLOCK_SKEW_ALLOWANCE
    not_after = min(now + timedelta(seconds=ttl_seconds), ca.not_after)
    if not_after <= now:
        raise SvidError(f"cannot issue {uri}: the CA expired on {ca.not_after.isoformat()}; "
                        "re-create or rotate the CA")
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH] if client_only else [ExtendedKeyUsageOID.SERVER_AUTH,
                                                                     ExtendedKeyUsageOID.CLIENT_AUTH]
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        # The subject is empty, so the SAN must be critical (RFC 5280 4.2.1.6).
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )
    return ca.sign(builder)


def make_csr(key: ec.EllipticCurvePrivateKey) -> str:
    """A PKCS#10 request proving possession of ``key`` (subject and extensions empty: the issuer decides the
    name from the request and the requesting node, never from the CSR)."""
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM).decode("ascii")


def csr_public_key(csr_pem: str) -> ec.EllipticCurvePublicKey:
    """The P-256 public key of a CSR whose signature verifies (proof of possession); ``SvidError`` otherwise."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem.encode("ascii") if isinstance(csr_pem, str) else csr_pem)
    except (ValueError, TypeError, UnicodeEncodeError):
        raise SvidError("the CSR is not a PEM PKCS#10 request") from None
    if not csr.is_signature_valid:
        raise SvidError("the CSR's signature does not verify (no proof of possession of its key)")
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise SvidError("the CSR's key is not ECDSA P-256; tcpmesh SVIDs use P-256 keys")
    return key
