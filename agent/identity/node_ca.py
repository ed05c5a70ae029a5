"""Node intermediates: issuing one from the root, and the node CA directory an agent signs SVIDs from.

The root stays offline (``tcpmesh ca init``). ``tcpmesh ca issue-node NODE --ca ROOT --out DIR``
writes a node CA directory, the only CA material an agent holds:

    node.crt    the node intermediate: CA:true pathlen:0, keyCertSign+cRLSign, URI SAN spiffe://<td>,
                a critical URI name constraint permitting only <td> (so only spiffe://<td>/... leaves) — 0644
    node.key    its ECDSA P-256 key — 0600, created with that mode
    bundle.pem  the trust bundle: the root(s) peers must chain to (two during a root rotation) — 0644

``load_node_ca`` turns the directory into a ``SigningCa`` (the intermediate with its key, and the
bundle), checking everything an operator could get wrong; errors name the file and the fix and
never contain key material. ``load_root_as_signing_ca`` is the development shortcut of an agent that
signs with the root itself. Touches only the files named here.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from agent.identity.bundle import TrustBundle, make_bundle, parse_bundle
from agent.identity.ca import (CA_BACKDATE, CA_CERT_MODE, CertificateAuthority, ca_name, check_private_mode,
                               load_ca, load_private_key, public_bytes, trust_domain_of,
                               with_ca_extensions, write_ca_files, write_file_atomic)
from agent.identity.errors import CaError
from agent.identity.spiffe import SpiffeIdError
from agent.identity.spiffe import validate_node_name as spiffe_validate_node_name
from agent.identity.files import BUNDLE_FILE, NODE_CA_FILES, NODE_CERT_FILE, NODE_KEY_FILE, files_signature

NODE_CA_LABEL = "tcpmesh node CA"
DEFAULT_NODE_CA_VALID_DAYS = 30
ISSUE_HINT = "tcpmesh ca issue-node <node> --ca <root CA dir> --out <dir>"


def validate_node_name(node: str) -> str:
    try:
        return spiffe_validate_node_name(node)
    except SpiffeIdError as exc:
        raise CaError(str(exc)) from None


def issue_node_ca(root: CertificateAuthority, node: str, *, valid_days: int = DEFAULT_NODE_CA_VALID_DAYS,
                  now: datetime | None = None, label: str = NODE_CA_LABEL) -> CertificateAuthority:
    """A new intermediate for ``node`` signed by ``root``, in memory. Valid ``valid_days``, capped at the root's expiry.

    ``label`` starts its CN: the issuer's issuing intermediate (``issuer_ca.py``) has the same profile."""
    validate_node_name(node)
    if not root.is_root:
        raise CaError("node intermediates are issued by the root CA (the directory of `tcpmesh ca init`), "
                      "not by another intermediate: pathlen 0 forbids that chain")
    if valid_days < 1:
        raise CaError(f"valid_days is {valid_days}; a node intermediate must be valid for at least 1 day")
    now = now or datetime.now(timezone.utc)
    not_after = min(now + timedelta(days=valid_days), root.not_after)
    if not_after <= now:
        raise CaError(f"the root CA expired on {root.not_after.isoformat()}; rotate the root (`tcpmesh ca rotate`)")
    td = root.trust_domain
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(ca_name(td, f"{label} {node}", key.public_key()))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(max(now - CA_BACKDATE, root.certificate.not_valid_before_utc))
        .not_valid_after(not_after)
    )
    return CertificateAuthority(root.sign(with_ca_extensions(builder, td, key.public_key(), path_length=0)), key)


def node_name_of(certificate: x509.Certificate) -> str | None:
    """The node a tcpmesh node intermediate was issued for (from its CN), or None."""
    names = certificate.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    if not names:
        return None
    parts = str(names[0].value).split(" ")
    prefix = NODE_CA_LABEL.split(" ")
    return parts[len(prefix)] if len(parts) == len(prefix) + 2 and parts[:len(prefix)] == prefix else None


@dataclass(frozen=True)
class NodeCaFiles:
    """What ``issue_node_files`` wrote."""

    directory: Path
    node: str
    trust_domain: str
    not_after: datetime
    serial: int
    bundle: TrustBundle


def issue_node_files(root_dir: str | Path, node: str, out_dir: str | Path, *,
                     valid_days: int = DEFAULT_NODE_CA_VALID_DAYS, force: bool = False,
                     now: datetime | None = None) -> NodeCaFiles:
    """Issue ``node``'s intermediate from the root in ``root_dir`` and write the node CA directory.

    Re-issuing into an existing directory is the normal way to renew an intermediate; an existing
    bundle.pem is kept as long as it contains this root (so a rotation's extra root survives). A
    directory of another node or trust domain, or a bundle without this root, is refused unless ``force``.
    """
    root = load_ca(root_dir, now=now)
    out = Path(out_dir)
    bundle = make_bundle([root.certificate], where=f"{Path(root_dir) / 'ca.crt'}")
    existing = read_existing(out)
    if existing is not None and not force:
        old_cert, old_bundle = existing
        old_node = node_name_of(old_cert) if old_cert is not None else None
        if old_node is not None and old_node != node:
            raise CaError(f"{out} holds the node CA of {old_node!r}, not {node!r}; use that node's own directory, "
                          "or pass --force to replace it")
        if old_bundle is not None:
            if old_bundle.trust_domain != root.trust_domain:
                raise CaError(f"{out / BUNDLE_FILE} trusts trust domain {old_bundle.trust_domain!r}, the root in "
                              f"{root_dir} is {root.trust_domain!r}; pass --force to start this node over")
            if root.certificate not in old_bundle:
                raise CaError(f"{out / BUNDLE_FILE} does not contain the root in {root_dir}: peers of this node would "
                              "not verify its new certificates. If you are rotating roots, run `tcpmesh ca rotate "
                              "add-root` first; to start this node over, pass --force")
            bundle = old_bundle
    intermediate = issue_node_ca(root, node, valid_days=valid_days, now=now)
    write_node_dir(out, intermediate, bundle)
    return NodeCaFiles(out, node, root.trust_domain, intermediate.not_after,
                       intermediate.certificate.serial_number, bundle)


def read_existing(out: Path) -> tuple[x509.Certificate | None, TrustBundle | None] | None:
    """The certificate and bundle already in a node CA directory (None where absent), or None if neither is."""
    cert_path, bundle_path = out / NODE_CERT_FILE, out / BUNDLE_FILE
    if not (cert_path.exists() or bundle_path.exists()):
        return None
    cert = None
    if cert_path.exists():
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        except (ValueError, OSError):
            cert = None
    bundle = parse_bundle(bundle_path.read_bytes(), str(bundle_path)) if bundle_path.exists() else None
    return cert, bundle


def write_node_dir(out: Path, intermediate: CertificateAuthority, bundle: TrustBundle) -> None:
    """Key, then certificate, then bundle: each written whole and renamed into place."""
    try:
        out.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise CaError(f"cannot create the node CA directory {out}: {exc.strerror}; "
                      "choose a directory you can write to") from None
    write_ca_files(intermediate, out / NODE_CERT_FILE, out / NODE_KEY_FILE)
    write_bundle(out, bundle)


def write_bundle(out: Path, bundle: TrustBundle) -> None:
    write_file_atomic(out / BUNDLE_FILE, bundle.pem.encode("ascii"), CA_CERT_MODE)


@dataclass(frozen=True)
class SigningCa:
    """What an agent signs SVIDs with and whom it trusts: its CA (normally a node intermediate) and the bundle."""

    ca: CertificateAuthority
    bundle: TrustBundle
    source: str  # the directory it was loaded from
    node: str | None  # the node an intermediate was issued for; None when a root signs directly

    @property
    def root(self) -> x509.Certificate | None:
        """The root of the bundle this CA chains to."""
        return self.ca.certificate if self.ca.is_root else self.bundle.issuer_of(self.ca.certificate)

    @property
    def kind(self) -> str:
        return "root (development: the agent holds the root key)" if self.ca.is_root else "node intermediate"

    def __repr__(self) -> str:
        return f"SigningCa({self.kind}, {self.ca!r}, {self.bundle!r})"


def load_node_ca(node_ca_dir: str | Path, *, now: datetime | None = None, node: str | None = None,
                 files: tuple[str, str, str] = NODE_CA_FILES, hint: str = ISSUE_HINT) -> SigningCa:
    """Load and check a node CA directory. ``node``, if given, must be the node it was issued for.

    ``files`` and ``hint`` let the issuer's directory (``issuer_ca.py``: the same profile) use this check."""
    directory = Path(node_ca_dir)
    cert_path, key_path, bundle_path = (directory / name for name in files)
    reissue = f"re-issue it with `{hint.replace('<dir>', str(directory))}`"
    certificate = _load_cert(cert_path, directory, reissue, hint)
    check_private_mode(key_path)
    key = load_private_key(key_path, _read(key_path, directory, hint), reissue)
    if public_bytes(key.public_key()) != public_bytes(certificate.public_key()):
        raise CaError(f"{key_path} does not belong to {cert_path} (their public keys differ): the pair was probably "
                      f"replaced half-way; {reissue}")
    bundle = parse_bundle(_read(bundle_path, directory, hint), str(bundle_path))
    constraints = _extension(certificate, x509.BasicConstraints)
    usage = _extension(certificate, x509.KeyUsage)
    if constraints is None or not constraints.ca or usage is None or not usage.key_cert_sign:
        raise CaError(f"{cert_path} is not a CA certificate (basicConstraints CA:true and keyCertSign are required); "
                      f"{reissue}")
    if certificate.issuer == certificate.subject:
        raise CaError(f"{cert_path} is a root CA: an agent holds a node intermediate only, never the root key; "
                      f"keep the root offline and {reissue}")
    if constraints.path_length != 0:
        raise CaError(f"{cert_path} allows a path length of {constraints.path_length}; a node intermediate must have "
                      f"pathlen 0 (it signs SVIDs only); {reissue}")
    td = trust_domain_of(certificate, where=str(cert_path))
    if td != bundle.trust_domain:
        raise CaError(f"{cert_path} is for trust domain {td!r} but {bundle_path} trusts {bundle.trust_domain!r}; {reissue}")
    if bundle.issuer_of(certificate) is None:
        raise CaError(f"{cert_path} was not issued by any root in {bundle_path} "
                      f"({', '.join(r.subject.rfc4514_string() for r in bundle.roots)}): peers would reject its SVIDs; "
                      f"{reissue} from the root that is in the bundle, or add that root (`tcpmesh ca rotate add-root`)")
    now = now or datetime.now(timezone.utc)
    if certificate.not_valid_after_utc <= now:
        raise CaError(f"{cert_path} expired on {certificate.not_valid_after_utc.isoformat()}; {reissue}")
    issued_for = node_name_of(certificate)
    if node is not None and issued_for is not None and issued_for != node:
        raise CaError(f"{cert_path} was issued for node {issued_for!r}, this is node {node!r}; point "
                      "identity.node_ca_dir at this node's own directory or issue one for it")
    try:
        ca = CertificateAuthority(certificate, key)
    except CaError as exc:
        raise CaError(f"{cert_path}: {exc}; {reissue}") from None
    return SigningCa(ca, bundle, str(directory), issued_for)


def load_root_as_signing_ca(ca_dir: str | Path, *, now: datetime | None = None) -> SigningCa:
    """Development shortcut (identity.ca_dir): sign SVIDs with the root itself; the bundle is that root."""
    root = load_ca(ca_dir, now=now)
    return SigningCa(root, make_bundle([root.certificate], where=str(Path(ca_dir) / "ca.crt")), str(ca_dir), None)


def _load_cert(path: Path, directory: Path, reissue: str, hint: str = ISSUE_HINT) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(_read(path, directory, hint))
    except ValueError as exc:
        raise CaError(f"{path} is not a PEM certificate ({exc}); {reissue}") from None


def _read(path: Path, directory: Path, hint: str = ISSUE_HINT) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        what = "issue this node's CA" if hint == ISSUE_HINT else "create it"
        raise CaError(f"{path} does not exist; {what} with `{hint.replace('<dir>', str(directory))}` "
                      f"(the directory given is {directory})") from None
    except OSError as exc:
        raise CaError(f"cannot read {path}: {exc.strerror}; run the agent as a user that may read it") from None


def _extension(certificate: x509.Certificate, kind: type):
    try:
        return certificate.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


__all__ = ["BUNDLE_FILE", "NODE_CA_FILES", "NODE_CERT_FILE", "NODE_KEY_FILE", "SigningCa", "files_signature",
           "issue_node_ca",
           "issue_node_files", "load_node_ca", "load_root_as_signing_ca", "node_name_of"]
