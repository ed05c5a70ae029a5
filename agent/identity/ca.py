"""The certificate authority: making a root CA, writing and loading its files, signing certificates.

Owns ``ca.crt`` / ``ca.key`` on disk and the CA private key in memory: the key never leaves a
``CertificateAuthority`` (callers hand it a certificate builder to sign) and never appears in a repr,
log line or error message. The certificate profile of workload SVIDs lives in ``issue.py``.

Touches the filesystem only in ``init_ca`` and ``load_ca``; ``generate_ca`` is in-memory.
Must not import ssl, sockets or anything of the data path.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterable

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.identity.errors import CaError, IdentityError
from agent.identity.files import CA_CERT_FILE, CA_KEY_FILE, write_file_atomic
from agent.identity.issue import issue_svid
from agent.identity.spiffe import SCHEME, SpiffeId, SpiffeIdError, validate_trust_domain
from agent.identity.svid import MIN_TTL_SECONDS, Svid

CA_CERT_MODE = 0o644
CA_KEY_MODE = 0o600
DEFAULT_CA_VALID_DAYS = 365
# The root is valid from slightly in the past so that nodes whose clocks lag accept it at once.
CA_BACKDATE = timedelta(minutes=5)
SIGNATURE_HASH = hashes.SHA256()
INIT_HINT = "tcpmesh ca init --trust-domain <trust-domain> --out <dir>"


def ca_name(trust_domain: str, label: str, public_key: ec.EllipticCurvePublicKey) -> x509.Name:
    """``O=tcpmesh, OU=<trust-domain>, CN=<label> <8 hex digits of the key id>``.

    The key-id suffix keeps the names of two roots of one trust domain apart (during a root rotation
    both are in every bundle), so chain building, ``openssl`` output and ``cert inspect`` tell them apart.
    """
    key_id = x509.SubjectKeyIdentifier.from_public_key(public_key).digest.hex()[:8]
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "tcpmesh"),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, trust_domain),
        x509.NameAttribute(NameOID.COMMON_NAME, f"{label} {key_id}"),
    ])


def trust_domain_uri(trust_domain: str) -> str:
    """``spiffe://<trust-domain>``: the CA's URI SAN and, as a host, its URI name constraint."""
    return f"{SCHEME}{trust_domain}"


@dataclass(frozen=True)
class CaFiles:
    """Where ``init_ca`` wrote the CA, and what it wrote."""

    cert_path: Path
    key_path: Path
    trust_domain: str
    not_after: datetime


class CertificateAuthority:
    """A CA certificate with its private key. Signs certificates; does not show its key to anyone.

    A root, or a node intermediate (docs/identity.md): then ``chain_pem`` carries the certificates
    between this CA and the root that a leaf must present after itself.
    """

    def __init__(self, certificate: x509.Certificate, private_key: ec.EllipticCurvePrivateKey,
                 chain_pem: tuple[str, ...] = ()) -> None:
        if public_bytes(certificate.public_key()) != public_bytes(private_key.public_key()):
            raise CaError("the CA private key does not belong to the CA certificate "
                          "(their public keys differ)")
        self._certificate = certificate
        self._key = private_key
        self.trust_domain = trust_domain_of(certificate, where="the CA certificate")
        self.cert_pem = certificate.public_bytes(serialization.Encoding.PEM).decode("ascii")
        self.chain_pem = chain_pem

    @property
    def certificate(self) -> x509.Certificate:
        return self._certificate

    @property
    def not_after(self) -> datetime:
        return self._certificate.not_valid_after_utc

    @property
    def is_root(self) -> bool:
        return self._certificate.issuer == self._certificate.subject

    @property
    def leaf_chain_pem(self) -> tuple[str, ...]:
        """Certificates a leaf signed by this CA presents after itself (none for a root)."""
        return () if self.is_root else (self.cert_pem, *self.chain_pem)

    def sign(self, builder: x509.CertificateBuilder) -> x509.Certificate:
        """Set the issuer and authority key identifier on ``builder`` and sign it with the CA key."""
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key())
        builder = builder.issuer_name(self._certificate.subject).add_extension(aki, critical=False)
        return builder.sign(self._key, SIGNATURE_HASH)

    def issue_svids(self, spiffe_ids: Iterable[SpiffeId], ttl_seconds: int, *, now: datetime,
                    min_ttl_seconds: int = MIN_TTL_SECONDS) -> dict[SpiffeId, Svid | IdentityError]:
        """Mint an SVID for each of ``spiffe_ids`` in this process (the ``store.Signer`` protocol);
        each succeeds or fails on its own. The agent signs through ``minting_client.RemoteSigner`` instead."""
        results: dict[SpiffeId, Svid | IdentityError] = {}
        for spiffe_id in spiffe_ids:
            try:
                results[spiffe_id] = issue_svid(self, spiffe_id, ttl_seconds, now=now, min_ttl_seconds=min_ttl_seconds)
            except IdentityError as exc:
                results[spiffe_id] = exc
        return results

    def __repr__(self) -> str:
        return (f"CertificateAuthority(trust_domain={self.trust_domain!r}, "
                f"subject={self._certificate.subject.rfc4514_string()!r}, not_after={self.not_after.isoformat()})")


def with_ca_extensions(builder: x509.CertificateBuilder, trust_domain: str, public_key: ec.EllipticCurvePublicKey,
                       path_length: int) -> x509.CertificateBuilder:
    """The extensions every tcpmesh CA certificate carries (root: path_length 1, node/issuer intermediate: 0):
    a CA that only signs certificates and CRLs, named by its trust domain, confined to it."""
    return (
        builder
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(trust_domain_uri(trust_domain))]),
                       critical=False)
        # RFC 5280 URI constraints name a host: only spiffe://<trust-domain>/... leaves chain to this CA (repeated
        # on intermediates so one stays confined even if it were ever chained to a root without it).
        .add_extension(x509.NameConstraints(permitted_subtrees=[x509.UniformResourceIdentifier(trust_domain)],
                                            excluded_subtrees=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def generate_ca(trust_domain: str, *, valid_days: int = DEFAULT_CA_VALID_DAYS,
                now: datetime | None = None) -> CertificateAuthority:
    """A new self-signed root for ``trust_domain``, in memory only."""
    try:
        validate_trust_domain(trust_domain)
    except SpiffeIdError as exc:
        raise CaError(str(exc)) from exc
    if valid_days < 1:
        raise CaError(f"valid_days is {valid_days}; a CA must be valid for at least 1 day")
    now = now or datetime.now(timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    name = ca_name(trust_domain, "tcpmesh root CA", key.public_key())
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CA_BACKDATE)
        .not_valid_after(now + timedelta(days=valid_days))
    )
    builder = (
        with_ca_extensions(builder, trust_domain, key.public_key(), path_length=1)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False)
    )
    return CertificateAuthority(builder.sign(key, SIGNATURE_HASH), key)


def init_ca(trust_domain: str, out_dir: str | Path, *, valid_days: int = DEFAULT_CA_VALID_DAYS,
            overwrite: bool = False) -> CaFiles:
    """Create a root CA and write ``ca.crt`` (0644) and ``ca.key`` (0600) into ``out_dir``.

    Refuses to replace an existing CA unless ``overwrite``: every SVID the old one issued would stop
    verifying. Each file is written to a temporary name created with its final mode, then renamed.
    """
    out = Path(out_dir)
    cert_path, key_path = out / CA_CERT_FILE, out / CA_KEY_FILE
    existing = [p.name for p in (cert_path, key_path) if p.exists() or p.is_symlink()]
    if existing and not overwrite:
        raise CaError(
            f"{out} already holds a CA ({', '.join(existing)}); refusing to overwrite it because every "
            "certificate it issued would stop verifying. Use another directory, or pass --force to "
            "`tcpmesh ca init` (overwrite=True) to replace it on purpose"
        )
    ca = generate_ca(trust_domain, valid_days=valid_days)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CaError(f"cannot create the CA directory {out}: {exc.strerror}; "
                      "choose a directory you can write to") from exc
    write_ca_files(ca, cert_path, key_path)
    return CaFiles(cert_path=cert_path, key_path=key_path, trust_domain=ca.trust_domain, not_after=ca.not_after)


def write_ca_files(ca: CertificateAuthority, cert_path: Path, key_path: Path) -> None:
    """Write a CA's key (0600, first) and certificate (0644), each created with its mode and renamed."""
    write_file_atomic(key_path, private_key_pem(ca), CA_KEY_MODE)
    write_file_atomic(cert_path, ca.cert_pem.encode("ascii"), CA_CERT_MODE)


def private_key_pem(ca: CertificateAuthority) -> bytes:
    """The CA key as unencrypted PKCS#8 PEM: for its 0600 file, or the pipe to the minting worker only."""
    return ca._key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())


def load_ca(ca_dir: str | Path, *, now: datetime | None = None,
            require_private_key_mode: bool = True) -> CertificateAuthority:
    """Load ``ca.crt`` and ``ca.key`` from ``ca_dir`` and check that they are a usable pair.

    Errors name the file and the fix. ``require_private_key_mode`` refuses a key that group or
    others can read (``chmod 600`` fixes it).
    """
    ca_dir = Path(ca_dir)
    cert_path, key_path = ca_dir / CA_CERT_FILE, ca_dir / CA_KEY_FILE
    recreate = f"re-create the CA with `{INIT_HINT} --force` (every issued SVID then stops verifying)"
    cert_bytes = read_file(cert_path, ca_dir)
    try:
        certificate = x509.load_pem_x509_certificate(cert_bytes)
    except ValueError as exc:
        raise CaError(f"{cert_path} is not a PEM certificate ({exc}); restore it from a backup or {recreate}") from exc
    if require_private_key_mode:
        check_private_mode(key_path)
    key = load_private_key(key_path, read_file(key_path, ca_dir), recreate)
    if public_bytes(key.public_key()) != public_bytes(certificate.public_key()):
        raise CaError(
            f"{key_path} does not belong to {cert_path}: the key's public half differs from the certificate's. "
            f"Put back the ca.key that was created together with this ca.crt, or {recreate}"
        )
    _check_is_ca(certificate, cert_path, recreate)
    now = now or datetime.now(timezone.utc)
    if certificate.not_valid_after_utc <= now:
        raise CaError(f"{cert_path} expired on {certificate.not_valid_after_utc.isoformat()}; {recreate}")
    try:
        return CertificateAuthority(certificate, key)
    except CaError as exc:
        raise CaError(f"{cert_path}: {exc}; {recreate}") from exc


def load_private_key(key_path: Path, key_bytes: bytes, recreate: str) -> ec.EllipticCurvePrivateKey:
    """Parse an unencrypted PEM EC key. Errors name the file, never anything of its content."""
    try:
        key = serialization.load_pem_private_key(key_bytes, password=None)
    except TypeError:
        raise CaError(f"{key_path} is encrypted with a passphrase; tcpmesh needs an unencrypted key for now: "
                      f"decrypt it with `openssl pkey -in {key_path} -out {key_path}.plain` and move it into place"
                      ) from None
    except (ValueError, UnsupportedAlgorithm) as exc:  # raised `from None`: never echo key parsing details
        raise CaError(f"{key_path} is not a PEM private key ({type(exc).__name__}); restore it from a backup "
                      f"or {recreate}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CaError(f"{key_path} holds a {type(key).__name__.lstrip('_')}, tcpmesh CAs use ECDSA P-256 keys; {recreate}")
    return key


def _check_is_ca(certificate: x509.Certificate, cert_path: Path, recreate: str) -> None:
    try:
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
        usage = certificate.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound as exc:
        raise CaError(f"{cert_path} is not a CA certificate (it has no {exc.oid._name} extension); {recreate}") from exc
    if not constraints.ca or not usage.key_cert_sign:
        raise CaError(f"{cert_path} is not a CA certificate (basicConstraints CA:true and keyCertSign are "
                      f"required); point identity.ca_dir at the CA's directory or {recreate}")


def trust_domain_of(certificate: x509.Certificate, where: str) -> str:
    try:
        sans = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        sans = None
    uris = sans.get_values_for_type(x509.UniformResourceIdentifier) if sans else []
    domains = [u[len(SCHEME):] for u in uris if u.startswith(SCHEME) and "/" not in u[len(SCHEME):]]
    if len(domains) != 1:
        raise CaError(f"{where} must name its trust domain in exactly one URI SAN 'spiffe://<trust-domain>' "
                      f"(it has {uris or 'none'})")
    try:
        return validate_trust_domain(domains[0])
    except SpiffeIdError as exc:
        raise CaError(f"{where}: {exc}") from exc


def public_bytes(public_key: object) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER,  # type: ignore[attr-defined]
                                   serialization.PublicFormat.SubjectPublicKeyInfo)


def read_file(path: Path, ca_dir: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CaError(f"{path} does not exist; create a CA with `{INIT_HINT}` or point identity.ca_dir at the "
                      f"directory holding {CA_CERT_FILE} and {CA_KEY_FILE} (now {ca_dir})") from None
    except OSError as exc:
        raise CaError(f"cannot read {path}: {exc.strerror}; run the agent as a user that may read it") from None


def check_private_mode(key_path: Path) -> None:
    try:
        mode = stat.S_IMODE(key_path.stat().st_mode)
    except OSError:
        return  # read_file reports a missing or unreadable file with its own message
    if mode & 0o077:
        raise CaError(f"{key_path} has mode {mode:04o}: group or others may read the CA key; "
                      f"run `chmod 600 {key_path}` (and rotate the CA if others could have copied it)")
