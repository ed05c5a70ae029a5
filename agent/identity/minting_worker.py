"""The minting worker: ``python -m agent.identity.minting_worker`` loads CA material and mints SVIDs, then exits.

The long-running agent never imports cryptography (its Rust extension alone is ~8 MiB of resident
file-backed memory per agent, plus ~3 MiB of objects; Python cannot unload a module). Everything
that needs it runs here, in a process that lives for one request: ``minting_client.py`` (the agent's
side, stdlib only) writes one JSON request on stdin and reads one JSON answer from stdout.

Requests (``now`` is an ISO 8601 time with offset; the agent's clock, so tests can inject one):
  * ``{"op": "load", "source": {"node_ca_dir", "ca_dir", "node"}, "now"}`` — read and check the node CA
    directory (or, development, the root directory) exactly as ``node_ca.load_node_ca`` does; answer
    ``{"ok": true, "ca": {...}}``: the public description the agent logs, reports and compares
    (subjects, serials, dates, fingerprints, the bundle PEM) and ``material`` (certificate and key
    PEM) that the agent hands back with each ``issue`` request.
  * ``{"op": "issue", "material", "spiffe_ids", "ttl_seconds", "min_ttl_seconds", "now"}`` — mint one
    SVID per identity; answer ``{"ok": true, "svids": [Svid.to_wire()...], "errors": {uri: error}}``.
  * issuer mode (docs/identity.md "The agent and the issuer"): ``keys`` {count} — fresh keys and their
    CSRs; ``credential`` {credential_dir, node} — read and check the node credential directory;
    ``describe_chain`` {pems} — the public facts of certificates.

Errors come back as ``{"ok": false, "error": {"type": "CaError", "message": "..."}}`` (the
``agent.identity.errors`` class names), never with key material. Keys travel through the pipes
only: nothing is written to a file.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from agent.identity.bundle import fingerprint, parse_bundle
from agent.identity.ca import CertificateAuthority, check_private_mode, load_private_key, private_key_pem, public_bytes
from agent.identity.errors import CaError, IdentityError
from agent.identity.files import CREDENTIAL_FILES
from agent.identity.issue import make_csr
from agent.identity.node_ca import SigningCa, load_node_ca, load_root_as_signing_ca
from agent.identity.spiffe import SpiffeId, SpiffeIdError, node_id_uri, parse_node_id

MAX_REQUEST_BYTES = 1 << 20


class ProtocolError(Exception):
    """The request is not one this worker understands (a version mismatch or a bug in the agent)."""


def certificate_info(certificate: x509.Certificate) -> dict[str, Any]:
    """The wire form of ``minting.CertInfo``."""
    return {
        "subject": certificate.subject.rfc4514_string(),
        "serial": certificate.serial_number,
        "not_before": certificate.not_valid_before_utc.isoformat(),
        "not_after": certificate.not_valid_after_utc.isoformat(),
        "fingerprint": fingerprint(certificate),
    }


def describe(signing: SigningCa) -> dict[str, Any]:
    """The wire form of ``minting.SigningInfo``: public description plus the material to sign with."""
    ca = signing.ca
    root = signing.root
    chain = [x509.load_pem_x509_certificate(pem.encode("ascii")) for pem in ca.leaf_chain_pem]
    return {
        "trust_domain": ca.trust_domain,
        "kind": signing.kind,
        "is_root": ca.is_root,
        "node": signing.node,
        "source": signing.source,
        "certificate": certificate_info(ca.certificate),
        "root": certificate_info(root) if root is not None else None,
        "bundle": [certificate_info(r) for r in signing.bundle.roots],
        "bundle_pem": signing.bundle.pem,
        "chain": [{"subject": c.subject.rfc4514_string(), "serial": c.serial_number} for c in chain],
        "material": {"cert_pem": ca.cert_pem, "key_pem": private_key_pem(ca).decode("ascii"),
                     "chain_pem": list(ca.chain_pem)},
    }


def load(request: dict[str, Any], now: datetime) -> dict[str, Any]:
    source = request["source"]
    if source.get("ca_dir"):
        signing = load_root_as_signing_ca(source["ca_dir"], now=now)
    else:
        signing = load_node_ca(source["node_ca_dir"], now=now, node=source.get("node"))
    return {"ok": True, "ca": describe(signing)}


def authority(material: dict[str, Any]) -> CertificateAuthority:
    """The CA of an ``issue`` request, from the material a ``load`` answer handed out."""
    try:
        certificate = x509.load_pem_x509_certificate(material["cert_pem"].encode("ascii"))
        key = serialization.load_pem_private_key(material["key_pem"].encode("ascii"), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise CaError("the CA material handed to the minting worker does not parse; this is a bug in the "
                      "agent (it passes what a load answer returned)") from None
    return CertificateAuthority(certificate, key, chain_pem=tuple(material.get("chain_pem", ())))  # type: ignore[arg-type]


def issue(request: dict[str, Any], now: datetime) -> dict[str, Any]:
    ca = authority(request["material"])
    try:
        spiffe_ids = [SpiffeId.parse(uri) for uri in request["spiffe_ids"]]
    except SpiffeIdError as exc:
        raise IdentityError(str(exc)) from None
    results = ca.issue_svids(spiffe_ids, int(request["ttl_seconds"]), now=now,
                             min_ttl_seconds=int(request["min_ttl_seconds"]))
    svids, errors = [], {}
    for spiffe_id, result in results.items():
        if isinstance(result, IdentityError):
            errors[spiffe_id.uri] = error_doc(result)
        else:
            svids.append(result.to_wire())
    return {"ok": True, "svids": svids, "errors": errors}


def keys(request: dict[str, Any], now: datetime) -> dict[str, Any]:
    """Fresh P-256 keys and a CSR for each (issuer mode: the key stays on the node, the CSR goes to the issuer)."""
    count = int(request["count"])
    if not 1 <= count <= 64:
        raise IdentityError(f"asked for {count} keys; 1 to 64 per request")
    answer = []
    for _ in range(count):
        key = ec.generate_private_key(ec.SECP256R1())
        answer.append({"key_pem": key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                    serialization.NoEncryption()).decode("ascii"),
                       "csr_pem": make_csr(key)})
    return {"ok": True, "keys": answer}


def credential(request: dict[str, Any], now: datetime) -> dict[str, Any]:
    """Read and check a node credential directory (issuer mode): the public facts, and the PEMs to present.

    A missing certificate is ``{"present": false}`` (the agent joins with its bootstrap token); a key
    readable by others, a key of another certificate, a certificate of another node are errors naming
    the file and the fix. An expired one is reported (``expired``), not refused: the agent then joins again."""
    directory = Path(request["credential_dir"])
    cert_path, key_path, bundle_path = (directory / name for name in CREDENTIAL_FILES)
    fix = ("create it with `tcpmesh ca issue-node-credential <node> --ca <root> --out "
           f"{directory}`, or set identity.issuer.bootstrap_token_file")
    bundle = parse_bundle(_read_bytes(bundle_path, fix), str(bundle_path)) if bundle_path.exists() else None
    if not cert_path.exists():
        return {"ok": True, "present": False, "bundle_pem": bundle.pem if bundle else None,
                "bundle": [certificate_info(r) for r in bundle.roots] if bundle else []}
    certificate = x509.load_pem_x509_certificate(_read_bytes(cert_path, fix))
    check_private_mode(key_path)
    key = load_private_key(key_path, _read_bytes(key_path, fix), fix)
    if public_bytes(key.public_key()) != public_bytes(certificate.public_key()):
        raise CaError(f"{key_path} does not belong to {cert_path} (their public keys differ); {fix}")
    sans = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
    expected = node_id_uri(certificate_trust_domain(uris), request["node"])
    if uris != [expected]:
        raise CaError(f"{cert_path} names {uris}, this is node {request['node']!r} ({expected}); point "
                      f"identity.issuer.credential_dir at this node's own credential, or {fix}")
    chain = x509.load_pem_x509_certificates(_read_bytes(cert_path, fix))
    root = bundle.issuer_of(chain[-1]) if bundle is not None else None
    return {"ok": True, "present": True, "uri": expected, "info": certificate_info(certificate),
            "root_fingerprint": fingerprint(root) if root is not None else None,   # the bundle root it chains to
            "cert_pem": _read_bytes(cert_path, fix).decode("ascii"), "key_pem": _read_bytes(key_path, fix).decode("ascii"),
            "expired": certificate.not_valid_after_utc <= now,
            "bundle_pem": bundle.pem if bundle else None,
            "bundle": [certificate_info(r) for r in bundle.roots] if bundle else []}


def describe_chain(request: dict[str, Any], now: datetime) -> dict[str, Any]:
    """The public facts of PEM certificates (the issuer's CA chain, as the agent reports it)."""
    return {"ok": True, "certificates": [certificate_info(x509.load_pem_x509_certificate(p.encode("ascii")))
                                         for p in request["pems"]]}


def certificate_trust_domain(uris: list[str]) -> str:
    for uri in uris:
        try:
            return parse_node_id(uri)[0]
        except SpiffeIdError:
            continue
    raise CaError(f"the node credential names {uris}, not a node (spiffe://<td>/node/<name>)")


def _read_bytes(path: Path, fix: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CaError(f"cannot read {path}: {exc.strerror}; {fix}") from None


OPERATIONS = {"load": load, "issue": issue, "keys": keys, "credential": credential, "describe_chain": describe_chain}


def error_doc(exc: BaseException) -> dict[str, str]:
    if isinstance(exc, IdentityError):
        return {"type": type(exc).__name__, "message": str(exc)}
    if isinstance(exc, ProtocolError):
        return {"type": "internal", "message": str(exc)}
    # Not one of ours: name the type only (a library's message could quote its input).
    return {"type": "internal", "message": f"{type(exc).__name__} in the minting worker"}


def handle(request: dict[str, Any]) -> dict[str, Any]:
    """Answer one request (the whole protocol; ``main`` only adds the pipes)."""
    try:
        operation = OPERATIONS.get(request.get("op"))
        if operation is None:
            raise ProtocolError(f"the minting worker knows no operation {request.get('op')!r}; "
                                f"it knows {', '.join(sorted(OPERATIONS))}")
        return operation(request, datetime.fromisoformat(request["now"]))
    except Exception as exc:  # the process root: every failure becomes a typed answer
        return {"ok": False, "error": error_doc(exc)}


def main() -> int:
    data = sys.stdin.buffer.read(MAX_REQUEST_BYTES + 1)
    try:
        request = json.loads(data) if len(data) <= MAX_REQUEST_BYTES else None
    except ValueError:
        request = None
    if not isinstance(request, dict):
        answer = {"ok": False, "error": {"type": "internal", "message": "the request is not one JSON object"}}
    else:
        answer = handle(request)
    sys.stdout.write(json.dumps(answer))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
