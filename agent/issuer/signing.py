"""The issuer's CA key and what it signs: workload SVIDs and node SVIDs for CSRs, its own server certificate.

Holds the issuing intermediate loaded from the issuer's directory (``identity.issuer_ca.load_issuer_ca``,
every check of a node CA directory, and ``filetrust``: only root or the issuer may change its files); the
key never leaves this object. It also decides which CAs may vouch
for a node — by signature against the bundle it loaded, never by a name: the issuing intermediate, the
roots of the bundle, and a previous issuing intermediate (``issuer-previous.crt``, or one this process
loaded before) only while a root of the bundle signed it. Certificates follow the SVID
profile of ``identity.issue.sign_leaf``: the name comes from the request the placement check passed,
never from the CSR, whose only use is the public key and its proof of possession.

Imports cryptography (the issuer is its own process; the agent never imports this).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.identity.bundle import fingerprint, issued_by
from agent.identity.files import (ISSUER_CA_FILES, ISSUER_PREVIOUS_CERT_FILE, ISSUER_REMOVED_ROOTS_FILE,
                                  files_signature)
from agent.identity.issue import csr_public_key, sign_leaf
from agent.identity.issuer_ca import load_issuer_ca
from agent.identity.node_ca import SigningCa
from agent.identity.spiffe import SpiffeId, issuer_id_uri, node_id_uri
from agent.filetrust import check_trusted_file

log = logging.getLogger("tcpmesh.issuer")
MAX_PREVIOUS_ISSUER_CAS = 4   # carried across reloads: renewals of the issuing intermediate within a node SVID's life


@dataclass(frozen=True)
class ServerCredential:
    chain_pem: str
    key_pem: str
    not_after: datetime


class IssuingCa:
    def __init__(self, directory: str | Path, now: datetime, previous: IssuingCa | None = None) -> None:
        """Load ``directory``; ``previous`` is the CA this replica served until now (a reload), whose issuing
        intermediates stay node credential signers while a root of the new bundle signed them."""
        self.directory = str(directory)
        self.signature = files_signature(directory, ISSUER_CA_FILES)
        key_name = ISSUER_CA_FILES[1]
        for name in (*ISSUER_CA_FILES, ISSUER_PREVIOUS_CERT_FILE, ISSUER_REMOVED_ROOTS_FILE):   # root/issuer only
            check_trusted_file(Path(directory) / name, "ca_dir", secret=name == key_name)
        self._signing: SigningCa = load_issuer_ca(directory, now=now)
        self.trust_domain = self._signing.ca.trust_domain
        self.bundle_pem = self._signing.bundle.pem
        self.roots = self._signing.bundle.roots   # what client certificates may chain to (server.py, trustroots.py)
        self.not_after = self._signing.ca.not_after
        self.subject = self._signing.ca.certificate.subject.rfc4514_string()
        self.fingerprint = fingerprint(self._signing.ca.certificate)
        root = self._signing.bundle.issuer_of(self._signing.ca.certificate)
        self.root_fingerprint = fingerprint(root) if root is not None else None  # what `ca rotate` waits for
        self.previous_cas, self.retired = self._previous_issuer_cas(now, previous)
        self.removed_roots = self._removed_roots()   # only to refuse their clients by name (trustroots)

    @property
    def chain_pem(self) -> tuple[str, ...]:
        return self._signing.ca.leaf_chain_pem

    def _previous_issuer_cas(self, now: datetime, previous: IssuingCa | None,
                             ) -> tuple[tuple[x509.Certificate, ...], tuple[x509.Certificate, ...]]:
        """(previous issuing intermediates a root of the bundle signed, those it did not — their root left the
        bundle, or it is no CA of ours — plus roots of ``previous``'s bundle this one no longer holds)."""
        candidates: list[x509.Certificate] = []
        path = Path(self.directory) / ISSUER_PREVIOUS_CERT_FILE
        try:
            candidates.append(x509.load_pem_x509_certificate(path.read_bytes()))
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as exc:
            log.warning("issuer: %s cannot be read (%s); node SVIDs of the previous issuing intermediate must join "
                        "again. Remove the file, or restore it from `tcpmesh ca issue-issuer`", path, exc)
        if previous is not None:
            candidates += [previous._signing.ca.certificate, *previous.previous_cas]
        roots = self._signing.bundle.roots
        trusted: dict[str, x509.Certificate] = {}
        retired: dict[str, x509.Certificate] = {}
        for certificate in candidates:
            key = fingerprint(certificate)
            if key == self.fingerprint or key in trusted or key in retired:
                continue
            signed = any(issued_by(certificate, r) for r in roots)
            if signed and _is_ca(certificate) and certificate.not_valid_after_utc > now:
                trusted[key] = certificate
            else:
                retired[key] = certificate
        if previous is not None:
            current = {fingerprint(r) for r in roots}
            for old_root in previous._signing.bundle.roots:
                if fingerprint(old_root) not in current:
                    retired.setdefault(fingerprint(old_root), old_root)
        return tuple(trusted.values())[:MAX_PREVIOUS_ISSUER_CAS], tuple(retired.values())

    def _removed_roots(self) -> tuple[x509.Certificate, ...]:
        """The roots ``removed-roots.pem`` lists (`ca rotate remove-old`), minus any the bundle holds again."""
        path = Path(self.directory) / ISSUER_REMOVED_ROOTS_FILE
        try:
            roots = x509.load_pem_x509_certificates(path.read_bytes())
        except FileNotFoundError:
            return ()
        except (OSError, ValueError) as exc:
            log.warning("issuer: %s cannot be read (%s); nodes still under a removed root are then refused as a "
                        "failed handshake, not by name. Remove the file, or run `tcpmesh ca rotate remove-old` "
                        "again", path, exc)
            return ()
        current = {fingerprint(r) for r in self.roots}
        return tuple(r for r in roots if fingerprint(r) not in current)

    def node_credential_problem(self, certificate_der: bytes) -> str | None:
        """Why a TLS-verified client certificate naming a node is not a node credential, or None if it is one.

        Node credentials come from this issuer (node SVIDs), a previous issuing intermediate that a root of the
        current bundle signed (its renewal, or ``ca rotate reissue`` until ``remove-old``) or a root of the
        current bundle (``ca issue-node-credential``); each is checked by signature, never by name. A legacy
        node intermediate (same root, during the migration) can sign a leaf naming any node; a root removed from
        the bundle stays in a running replica's TLS context, and so does any CA it signs."""
        try:
            leaf = x509.load_der_x509_certificate(certificate_der)
        except ValueError:
            return "the client certificate does not parse"
        for signer in (self._signing.ca.certificate, *self.previous_cas, *self._signing.bundle.roots):
            if issued_by(leaf, signer):
                return None
        for gone in self.retired:
            if issued_by(leaf, gone):
                return (f"the node certificate was signed by {gone.subject.rfc4514_string()} (fingerprint "
                        f"{fingerprint(gone)[:12]}), whose root left the issuer's trust bundle (`tcpmesh ca rotate "
                        "remove-old`); this node missed the rotation: join again with a bootstrap token "
                        "(`tcpmesh issuer token <node>`) or a credential from the new root (`tcpmesh ca "
                        "issue-node-credential`)")
        return (f"the node certificate was signed by {leaf.issuer.rfc4514_string()}, which is neither the issuer CA, "
                "a previous issuer CA under a root of the issuer's bundle, nor such a root (a node intermediate, a "
                "removed root or a CA that only bears an issuer CA's name cannot vouch for a node); join with a "
                "bootstrap token (`tcpmesh issuer token <node>`) or `tcpmesh ca issue-node-credential`")

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


def _is_ca(certificate: x509.Certificate) -> bool:
    try:
        return bool(certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False
