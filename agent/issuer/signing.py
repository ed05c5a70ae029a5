"""The issuer's CA key and what it signs: workload SVIDs and node SVIDs for CSRs, its own server certificate.

Holds the issuing intermediate loaded from the issuer's directory (``identity.issuer_ca.load_issuer_ca``,
every check of a node CA directory); the key never leaves this object. Certificates follow the SVID
profile of ``identity.issue.sign_leaf``: the name comes from the request the placement check passed,
never from the CSR, whose only use is the public key and its proof of possession.

Imports cryptography (the issuer is its own process; the agent never imports this).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.identity.bundle import fingerprint
from agent.identity.files import ISSUER_CA_FILES, files_signature
from agent.identity.issue import csr_public_key, sign_leaf
from agent.identity.issuer_ca import ISSUER_CA_LABEL, load_issuer_ca
from agent.identity.node_ca import SigningCa
from agent.identity.spiffe import SpiffeId, issuer_id_uri, node_id_uri


@dataclass(frozen=True)
class ServerCredential:
    chain_pem: str
    key_pem: str
    not_after: datetime


class IssuingCa:
    def __init__(self, directory: str | Path, now: datetime) -> None:
        self.directory = str(directory)
        self.signature = files_signature(directory, ISSUER_CA_FILES)
        self._signing: SigningCa = load_issuer_ca(directory, now=now)
        self.trust_domain = self._signing.ca.trust_domain
        self.bundle_pem = self._signing.bundle.pem
        self.not_after = self._signing.ca.not_after
        self.subject = self._signing.ca.certificate.subject.rfc4514_string()
        self.fingerprint = fingerprint(self._signing.ca.certificate)
        root = self._signing.bundle.issuer_of(self._signing.ca.certificate)
        self.root_fingerprint = fingerprint(root) if root is not None else None  # what `ca rotate` waits for

    @property
    def chain_pem(self) -> tuple[str, ...]:
        return self._signing.ca.leaf_chain_pem

    def node_credential_problem(self, certificate_der: bytes) -> str | None:
        """Why a TLS-verified client certificate naming a node is not a node credential, or None if it is one.

        Node credentials come from this issuer (node SVIDs), another issuing intermediate (``CN=tcpmesh issuer
        CA ...``: a previous one, during its renewal) or a root of the current bundle (``ca
        issue-node-credential``). A legacy node intermediate (same root, during the migration) can sign a
        leaf naming any node; a root removed from the bundle stays in a running replica's TLS context."""
        try:
            leaf = x509.load_der_x509_certificate(certificate_der)
        except ValueError:
            return "the client certificate does not parse"
        for signer in (self._signing.ca.certificate, *self._signing.bundle.roots):
            try:
                leaf.verify_directly_issued_by(signer)
                return None
            except (ValueError, TypeError, InvalidSignature):
                continue
        names = leaf.issuer.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        if names and str(names[0].value).startswith(ISSUER_CA_LABEL + " "):
            return None
        return (f"the node certificate was signed by {leaf.issuer.rfc4514_string()}, which is neither an issuer CA "
                "nor a root of the issuer's bundle (a node intermediate, or a removed root, cannot vouch for a node); "
                "join with a bootstrap token (`tcpmesh issuer token <node>`) or `tcpmesh ca issue-node-credential`")

    def sign_workload(self, csr_pem: str, spiffe_id: SpiffeId, ttl_seconds: int, now: datetime,
                      min_ttl_seconds: int) -> dict[str, Any]:
        cert = sign_leaf(self._signing.ca, spiffe_id.uri, spiffe_id.trust_domain, csr_public_key(csr_pem),
                         ttl_seconds, now, min_ttl_seconds=min_ttl_seconds)
        return self._wire(spiffe_id.uri, cert, now)

    def sign_node(self, csr_pem: str, node: str, ttl_seconds: int, now: datetime, min_ttl_seconds: int) -> dict[str, Any]:
        uri = node_id_uri(self.trust_domain, node)
        cert = sign_leaf(self._signing.ca, uri, self.trust_domain, csr_public_key(csr_pem), ttl_seconds, now,
                         min_ttl_seconds=min_ttl_seconds, client_only=True)
        return self._wire(uri, cert, now)

    def server_credential(self, ttl_seconds: int, now: datetime) -> ServerCredential:
        """A fresh key and a server certificate naming ``spiffe://<td>/tcpmesh/issuer`` (agents check that name)."""
        key = ec.generate_private_key(ec.SECP256R1())
        uri = issuer_id_uri(self.trust_domain)
        cert = sign_leaf(self._signing.ca, uri, self.trust_domain, key.public_key(), ttl_seconds, now)
        chain = cert.public_bytes(serialization.Encoding.PEM).decode("ascii") + "".join(self.chain_pem)
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()).decode("ascii")
        return ServerCredential(chain, key_pem, cert.not_valid_after_utc)

    def _wire(self, uri: str, cert: Any, now: datetime) -> dict[str, Any]:
        return {"spiffe_id": uri, "cert_pem": cert.public_bytes(serialization.Encoding.PEM).decode("ascii"),
                "chain_pem": list(self.chain_pem), "serial": cert.serial_number,
                "not_before": cert.not_valid_before_utc.isoformat(), "not_after": cert.not_valid_after_utc.isoformat(),
                "issued_at": now.isoformat()}

    def __repr__(self) -> str:
        return f"IssuingCa({self.subject}, until {self.not_after.isoformat()})"
