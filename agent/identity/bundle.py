"""Trust bundles: the set of root CAs an agent accepts peers from — one normally, two during a root
rotation (old and new side by side, so every chain verifies whichever root it ends in).

Pure over bytes: parses, checks and describes PEM bundles; ``node_ca.py`` reads and writes the file.
Must not import ssl, sockets or anything of the data path.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from agent.identity.ca import trust_domain_of
from agent.identity.errors import CaError
from agent.identity.report import short_fingerprint


def fingerprint(certificate: x509.Certificate) -> str:
    """``sha256:<64 hex digits>`` of the DER certificate: how roots are named in bundles, logs and reports."""
    return "sha256:" + hashlib.sha256(certificate.public_bytes(serialization.Encoding.DER)).hexdigest()




def to_pem(certificate: x509.Certificate) -> str:
    return certificate.public_bytes(serialization.Encoding.PEM).decode("ascii")


def issued_by(certificate: x509.Certificate, issuer: x509.Certificate) -> bool:
    """Whether ``issuer``'s key signed ``certificate`` (and the names line up)."""
    try:
        certificate.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


@dataclass(frozen=True)
class TrustBundle:
    """One or more self-signed roots of one trust domain, in file order, without duplicates."""

    roots: tuple[x509.Certificate, ...]
    trust_domain: str

    @property
    def pem(self) -> str:
        return "".join(to_pem(root) for root in self.roots)

    @property
    def fingerprints(self) -> tuple[str, ...]:
        return tuple(fingerprint(root) for root in self.roots)

    def __contains__(self, certificate: object) -> bool:
        return isinstance(certificate, x509.Certificate) and fingerprint(certificate) in self.fingerprints

    def issuer_of(self, certificate: x509.Certificate) -> x509.Certificate | None:
        """The root of this bundle that signed ``certificate``, if any."""
        return next((root for root in self.roots if issued_by(certificate, root)), None)

    def with_root(self, root: x509.Certificate) -> "TrustBundle":
        """This bundle plus ``root`` (unchanged if it is already in)."""
        if root in self:
            return self
        return make_bundle([*self.roots, root], where="the new root")

    def expiring_first(self) -> datetime:
        return min(root.not_valid_after_utc for root in self.roots)

    def __repr__(self) -> str:
        return f"TrustBundle({self.trust_domain!r}, {[short_fingerprint(fp) for fp in self.fingerprints]})"


def make_bundle(roots: list[x509.Certificate], where: str) -> TrustBundle:
    """Check ``roots`` are self-signed CA certificates of one trust domain; drop duplicates."""
    if not roots:
        raise CaError(f"{where} holds no certificate; a trust bundle needs at least one root CA")
    unique: dict[str, x509.Certificate] = {}
    domains = set()
    for index, root in enumerate(roots, 1):
        label = f"{where} (certificate {index}, {root.subject.rfc4514_string()})"
        if root.issuer != root.subject or not issued_by(root, root):
            raise CaError(f"{label} is not a self-signed root; a trust bundle holds root CAs only "
                          "(node intermediates are sent by the agents themselves)")
        try:
            constraints = root.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            constraints = None
        if constraints is None or not constraints.ca:
            raise CaError(f"{label} is not a CA certificate (basicConstraints CA:true is required)")
        domains.add(trust_domain_of(root, where=label))
        unique.setdefault(fingerprint(root), root)
    if len(domains) > 1:
        raise CaError(f"{where} mixes trust domains ({', '.join(sorted(domains))}); one agent serves one trust "
                      "domain, and a root rotation keeps the trust domain")
    return TrustBundle(tuple(unique.values()), domains.pop())


def parse_bundle(pem: bytes | str, where: str) -> TrustBundle:
    data = pem.encode("ascii") if isinstance(pem, str) else pem
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise CaError(f"{where} holds no certificate; a trust bundle needs at least one root CA (PEM)")
    try:
        roots = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise CaError(f"{where} is not a list of PEM certificates ({exc}); restore it, or rewrite it with "
                      "`tcpmesh ca issue-node` / `tcpmesh ca rotate`") from None
    return make_bundle(roots, where)
