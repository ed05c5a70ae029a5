"""The issuer's CA material and operator-issued node credentials (docs/identity.md "The issuer").

``tcpmesh ca issue-issuer --ca ROOT --out DIR`` writes the issuer's directory: ``issuer.crt`` (an
issuing intermediate with the node intermediate's profile: CA:true pathlen:0, the trust domain's URI
name constraint), ``issuer.key`` (0600) and ``bundle.pem``; the ``issuer.crt`` it replaces is kept as
``issuer-previous.crt`` (node SVIDs it signed renew while it chains to a root of the bundle). Every
replica of the issuer loads the same directory (``load_issuer_ca``); no node ever holds it.

``tcpmesh ca issue-node-credential NODE --ca ROOT --out DIR`` writes a node credential directory:
``credential.crt`` — a leaf (CA:false, clientAuth only) naming ``spiffe://<td>/node/<NODE>``, signed by
the root — ``credential.key`` (0600) and ``bundle.pem``. It is the operator's alternative to a one-time
bootstrap token: the agent presents it once to the issuer and from then on renews a short-lived node
SVID in the same directory. Neither file can sign anything.

Imports cryptography: runs in the CLI, the issuer and the minting worker, never in the agent.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.identity.bundle import make_bundle
from agent.identity.ca import (CA_CERT_MODE, CA_KEY_MODE, CertificateAuthority, load_ca, private_key_pem,
                               write_file_atomic)
from agent.identity.errors import CaError
from agent.identity.bundle import TrustBundle
from agent.identity.files import (BUNDLE_FILE, CREDENTIAL_CERT_FILE, CREDENTIAL_KEY_FILE, ISSUER_CA_FILES,
                                  ISSUER_PREVIOUS_CERT_FILE)
from agent.identity.issue import sign_leaf
from agent.identity.node_ca import SigningCa, issue_node_ca, load_node_ca, write_bundle
from agent.identity.spiffe import SpiffeIdError, node_id_uri

ISSUER_CA_LABEL = "tcpmesh issuer CA"
ISSUER_HINT = "tcpmesh ca issue-issuer --ca <root CA dir> --out <dir>"
DEFAULT_ISSUER_CA_VALID_DAYS = 30
DEFAULT_CREDENTIAL_VALID_DAYS = 7


@dataclass(frozen=True)
class WrittenCa:
    directory: Path
    trust_domain: str
    not_after: datetime


def issue_issuer_files(root_dir: str | Path, out_dir: str | Path, *, name: str = "issuer",
                       valid_days: int = DEFAULT_ISSUER_CA_VALID_DAYS, now: datetime | None = None) -> WrittenCa:
    """Issue the issuing intermediate from the root in ``root_dir`` and write the issuer's directory."""
    root = load_ca(root_dir, now=now)
    intermediate = issue_node_ca(root, name, valid_days=valid_days, now=now, label=ISSUER_CA_LABEL)
    out = Path(out_dir)
    try:
        out.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise CaError(f"cannot create the issuer directory {out}: {exc.strerror}; choose one you can write to") from None
    write_issuer_dir(out, intermediate, make_bundle([root.certificate], where=str(Path(root_dir) / "ca.crt")))
    return WrittenCa(out, root.trust_domain, intermediate.not_after)


def write_issuer_dir(directory: Path, intermediate: CertificateAuthority, bundle: TrustBundle) -> None:
    """Write a new issuing intermediate, its key and ``bundle`` into the issuer's directory, keeping the
    intermediate it replaces as ``issuer-previous.crt`` (written first: a replica polling in between sees
    both, never a node SVID signer it cannot verify)."""
    cert_name, key_name, _ = ISSUER_CA_FILES
    replaced = directory / cert_name
    if replaced.exists() and replaced.read_bytes() != intermediate.cert_pem.encode("ascii"):
        write_file_atomic(directory / ISSUER_PREVIOUS_CERT_FILE, replaced.read_bytes(), CA_CERT_MODE)
    write_file_atomic(directory / key_name, private_key_pem(intermediate), CA_KEY_MODE)
    write_file_atomic(replaced, intermediate.cert_pem.encode("ascii"), CA_CERT_MODE)
    write_bundle(directory, bundle)


def load_issuer_ca(directory: str | Path, *, now: datetime | None = None) -> SigningCa:
    """Load and check the issuer's directory (every check of a node CA directory; errors name file and fix)."""
    return load_node_ca(directory, now=now, files=ISSUER_CA_FILES, hint=ISSUER_HINT)


def issue_node_credential(root_dir: str | Path, node: str, out_dir: str | Path, *,
                          valid_days: int = DEFAULT_CREDENTIAL_VALID_DAYS, now: datetime | None = None) -> WrittenCa:
    """Write an operator-issued node credential for ``node`` (a root-signed client leaf) into ``out_dir``."""
    root = load_ca(root_dir, now=now)
    try:
        uri = node_id_uri(root.trust_domain, node)
    except SpiffeIdError as exc:
        raise CaError(str(exc)) from None
    if valid_days < 1:
        raise CaError(f"valid_days is {valid_days}; a node credential must be valid for at least 1 day")
    now = now or datetime.now(timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = sign_leaf(root, uri, root.trust_domain, key.public_key(),
                            int(timedelta(days=valid_days).total_seconds()), now, client_only=True)
    out = Path(out_dir)
    try:
        out.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise CaError(f"cannot create the node credential directory {out}: {exc.strerror}; "
                      "choose one you can write to") from None
    write_file_atomic(out / CREDENTIAL_KEY_FILE, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()), CA_KEY_MODE)
    write_file_atomic(out / CREDENTIAL_CERT_FILE,
                      certificate.public_bytes(serialization.Encoding.PEM), CA_CERT_MODE)
    write_file_atomic(out / BUNDLE_FILE, root.cert_pem.encode("ascii"), CA_CERT_MODE)
    return WrittenCa(out, root.trust_domain, certificate.not_valid_after_utc)
