"""``tcpmesh cert inspect FILE``: what a PEM file's certificates say — subject, SPIFFE ID, serial,
validity, issuer, fingerprint — without asking any agent. Public material only: a private key in
the file is neither parsed nor shown. Pure apart from reading the bytes handed in.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from cryptography import x509

from agent.errors import TcpmeshError
from agent.identity.bundle import fingerprint


def describe_pem(data: bytes, source: str) -> list[dict[str, Any]]:
    """One dict per certificate in ``data``; a TcpmeshError naming ``source`` when there is none."""
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise TcpmeshError(f"{source} holds no PEM certificate (-----BEGIN CERTIFICATE-----): pass a certificate "
                           "file such as a node's node-ca/node.crt, or omit FILE to ask the running agent")
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise TcpmeshError(f"{source}: a certificate in it cannot be read: {exc}") from None
    return [_describe(c) for c in certificates]


def _describe(certificate: x509.Certificate) -> dict[str, Any]:
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    try:
        is_ca = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    return {"subject": certificate.subject.rfc4514_string(), "issuer": certificate.issuer.rfc4514_string(),
            "spiffe_ids": [u for u in uris if u.startswith("spiffe://")], "ca": is_ca,
            "serial": f"{certificate.serial_number:x}",
            "not_before": certificate.not_valid_before_utc.isoformat(),
            "not_after": certificate.not_valid_after_utc.isoformat(), "fingerprint": fingerprint(certificate)}


def format_certificates(described: list[dict[str, Any]], source: str, now: datetime | None = None) -> str:
    now = now or datetime.now(timezone.utc)
    lines = [f"{source}: {len(described)} certificate(s)"]
    for i, c in enumerate(described):
        left = datetime.fromisoformat(c["not_after"]) - now
        state = "EXPIRED" if left.total_seconds() < 0 else f"expires in {_span(left.total_seconds())}"
        lines += [f"[{i}] subject     {c['subject'] or '(empty)'}{'  (a CA)' if c['ca'] else ''}",
                  f"    spiffe id   {', '.join(c['spiffe_ids']) or '-'}",
                  f"    issuer      {c['issuer']}",
                  f"    serial      {c['serial']}",
                  f"    valid       {c['not_before']} .. {c['not_after']} ({state})",
                  f"    fingerprint {c['fingerprint']}"]
    return "\n".join(lines)


def _span(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"
