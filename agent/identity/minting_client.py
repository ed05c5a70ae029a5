"""The agent's side of the minting worker: CA material and SVIDs without importing cryptography.

``load_signing`` asks a worker (``python -m agent.identity.minting_worker``, one process per request) to
read and check the node CA directory and returns a ``SigningInfo``: what the agent logs, reports
on ``/debug/certs`` and compares to notice a changed CA (subjects, serials, dates, fingerprints),
the trust bundle PEM its TLS contexts load with ``ssl``, and a ``RemoteSigner``. The signer is the
``store.Signer`` of the agent's ``IdentityStore``: each ``issue_svids`` call starts one worker that
mints every identity due together and exits. The CA key and the new SVID keys pass through the
worker's stdin/stdout pipes only, never through a file.

The worker's failures come back as the ``agent.identity.errors`` class they were raised as (a
``CaError`` naming the file and the fix, an ``SvidError``, ...); a worker that cannot start,
crashes, times out or answers garbage is a ``MinterError``. ``Transport`` is injectable: tests
may answer in-process with ``minting_worker.handle`` (which imports cryptography).

Stdlib only (subprocess, json): must not import cryptography — the point of this module.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from agent.identity import errors
from agent.identity.errors import IdentityError, MinterError
from agent.identity.spiffe import SpiffeId
from agent.identity.svid import MIN_TTL_SECONDS, Svid

MINTER_MODULE = "agent.identity.minting_worker"
DEFAULT_TIMEOUT = 30.0
Transport = Callable[[dict], dict]
_ERRORS = {cls.__name__: cls for cls in (errors.IdentityError, errors.CaError, errors.SvidError,
                                          errors.TlsSetupError)}


def spawn_minter(request: dict, timeout: float = DEFAULT_TIMEOUT) -> dict:
    """Run one worker process for ``request`` and return its JSON answer."""
    package_root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
    started = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, "-m", MINTER_MODULE], input=json.dumps(request).encode("ascii"),
                              capture_output=True, timeout=timeout, env=env, check=False)
    except subprocess.TimeoutExpired:
        raise MinterError(f"the SVID minting worker ({MINTER_MODULE}) did not answer within {timeout:.0f}s; "
                          "is the machine overloaded?") from None
    except OSError as exc:
        raise MinterError(f"cannot start the SVID minting worker {sys.executable} -m {MINTER_MODULE}: "
                          f"{exc.strerror or exc}; the agent's service must be allowed to start processes") from None
    try:
        answer = json.loads(proc.stdout)
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        tail = proc.stderr.decode("utf-8", "replace").strip().splitlines()[-5:]
        raise MinterError(f"the SVID minting worker exited with code {proc.returncode} after "
                          f"{time.monotonic() - started:.1f}s without an answer: " + (" | ".join(tail) or "no output"))
    return answer


def call(transport: Transport, request: dict) -> dict:
    """``transport(request)``, with a failure answer raised as its typed error."""
    answer = transport(request)
    if not answer.get("ok"):
        raise error_from(answer.get("error") or {})
    return answer


def error_from(doc: Mapping[str, Any]) -> IdentityError:
    message = str(doc.get("message") or "no message")
    cls = _ERRORS.get(str(doc.get("type")))
    if cls is None:
        return MinterError(f"the SVID minting worker failed: {message}")
    return cls(message)


@dataclass(frozen=True)
class CertInfo:
    """The public facts of one CA certificate, as the worker read them."""

    subject: str
    serial: int
    not_before: datetime
    not_after: datetime
    fingerprint: str  # sha256:<hex> of the DER

    @classmethod
    def from_wire(cls, doc: Mapping[str, Any]) -> "CertInfo":
        return cls(doc["subject"], int(doc["serial"]), datetime.fromisoformat(doc["not_before"]),
                   datetime.fromisoformat(doc["not_after"]), doc["fingerprint"])

    def summary(self) -> dict[str, Any]:
        """The ``/debug/certs`` form (serial in hex)."""
        return {"subject": self.subject, "serial": f"{self.serial:x}", "not_before": self.not_before.isoformat(),
                "not_after": self.not_after.isoformat(), "fingerprint": self.fingerprint}


class RemoteSigner:
    """Signs SVIDs with one loaded CA by starting a minting worker per batch (``store.Signer``).

    Holds the CA's certificate and key PEM as the worker handed them out (the key is never shown:
    not in repr, logs or errors) and passes them back with each request.
    """

    def __init__(self, trust_domain: str, material: Mapping[str, Any], transport: Transport, label: str) -> None:
        self.trust_domain = trust_domain
        self._material = dict(material)
        self._transport = transport
        self._label = label

    def issue_svids(self, spiffe_ids: Iterable[SpiffeId], ttl_seconds: int, *, now: datetime,
                    min_ttl_seconds: int = MIN_TTL_SECONDS) -> dict[SpiffeId, Svid | IdentityError]:
        ids = list(spiffe_ids)
        answer = call(self._transport, {"op": "issue", "material": self._material,
                                        "spiffe_ids": [i.uri for i in ids], "ttl_seconds": ttl_seconds,
                                        "min_ttl_seconds": min_ttl_seconds, "now": now.isoformat()})
        results: dict[SpiffeId, Svid | IdentityError] = {}
        for doc in answer.get("svids", ()):
            svid = Svid.from_wire(doc)
            results[svid.spiffe_id] = svid
        for uri, error in (answer.get("errors") or {}).items():
            results[SpiffeId.parse(uri)] = error_from(error)
        return results

    def __repr__(self) -> str:
        return f"RemoteSigner({self._label})"


@dataclass(frozen=True)
class SigningInfo:
    """What the agent signs with and whom it trusts, as the worker loaded it (public facts + a signer)."""

    trust_domain: str
    kind: str  # "node intermediate", or the development root
    is_root: bool
    node: str | None  # the node an intermediate was issued for; None when a root signs directly
    source: str  # the directory it was loaded from
    certificate: CertInfo  # the signing CA
    root: CertInfo | None  # the root of the bundle the CA chains to
    bundle: tuple[CertInfo, ...]  # the trust bundle's roots, in file order
    bundle_pem: str
    chain: tuple[tuple[str, int], ...]  # (subject, serial) of each certificate a leaf presents after itself
    signer: RemoteSigner = field(repr=False, compare=False)

    @property
    def bundle_fingerprints(self) -> tuple[str, ...]:
        return tuple(root.fingerprint for root in self.bundle)

    @property
    def not_after(self) -> datetime:
        return self.certificate.not_after

    @classmethod
    def from_wire(cls, doc: Mapping[str, Any], transport: Transport) -> "SigningInfo":
        certificate = CertInfo.from_wire(doc["certificate"])
        return cls(trust_domain=doc["trust_domain"], kind=doc["kind"], is_root=bool(doc["is_root"]),
                   node=doc.get("node"), source=doc["source"], certificate=certificate,
                   root=CertInfo.from_wire(doc["root"]) if doc.get("root") else None,
                   bundle=tuple(CertInfo.from_wire(r) for r in doc["bundle"]), bundle_pem=doc["bundle_pem"],
                   chain=tuple((c["subject"], int(c["serial"])) for c in doc["chain"]),
                   signer=RemoteSigner(doc["trust_domain"], doc["material"], transport,
                                       f"{certificate.subject}, serial {certificate.serial:x}"))


def load_signing(node_ca_dir: str, *, ca_dir: str = "", node: str | None = None, now: datetime,
                 transport: Transport = spawn_minter) -> SigningInfo:
    """Have a worker load and check the CA directory; ``CaError`` (naming the file and the fix) if unusable."""
    answer = call(transport, {"op": "load", "source": {"node_ca_dir": node_ca_dir, "ca_dir": ca_dir, "node": node},
                              "now": now.isoformat()})
    return SigningInfo.from_wire(answer["ca"], transport)
