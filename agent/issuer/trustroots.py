"""Which root a TLS client's verified chain ends at, and whether the issuer still trusts it. Pure but for parsing.

An ``ssl.SSLContext`` cannot forget a root, and a connection keeps the context it was accepted with, so the
server asks this after every handshake and, at every reload of the bundle, of every open connection:

- ``current``: the roots of the bundle loaded now — a chain ending at one of them verifies;
- ``removed``: roots this replica trusted before and no longer does (`tcpmesh ca rotate remove-old`), and those
  the issuer's directory lists in ``removed-roots.pem`` (written by that step: a replica started after it knows
  them too); at most ``MAX_REMOVED_ROOTS``, newest kept. The server's TLS context still accepts them, so that a client under one
  completes the handshake and is then refused by name (``removed_root``: which root, and the fix) instead of
  failing as an anonymous ``handshake_failed``; nothing it sends is read.

A chain ending at neither (only possible if something else put a root into a live context) is left to the
service's own signature checks. Imports cryptography (the issuer process only), ``agent.identity.bundle`` and
``agent.identity.tls`` (the verified chain).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from cryptography import x509

from agent.identity.bundle import fingerprint, to_pem
from agent.identity.files import MAX_REMOVED_ROOTS
from agent.identity.tls import verified_chain

_ENCODING_DER = 2   # _ssl.ENCODING_DER


@dataclass(frozen=True)
class ChainRoot:
    fingerprint: str
    subject: str


def chain_root(ssl_object: Any) -> ChainRoot | None:
    """The trust anchor the client's verified chain ends at, or None without a client certificate
    (``tls.verified_chain``: ``TlsSetupError`` on a Python that cannot tell, never None)."""
    chain = verified_chain(ssl_object)
    if not chain:
        return None
    certificate = x509.load_der_x509_certificate(chain[-1].public_bytes(_ENCODING_DER))
    return ChainRoot(fingerprint(certificate), certificate.subject.rfc4514_string())


class TrustRoots:
    def __init__(self, roots: Iterable[x509.Certificate] = (), removed: Iterable[x509.Certificate] = ()) -> None:
        self.current: dict[str, x509.Certificate] = {}
        self.removed: dict[str, x509.Certificate] = {}   # oldest first
        self.update(roots, removed)

    def update(self, roots: Iterable[x509.Certificate], removed: Iterable[x509.Certificate] = ()) -> bool:
        """Trust exactly ``roots`` from now on, and recognise ``removed`` (``removed-roots.pem``: what `ca rotate
        remove-old` took out, also before this replica started) as removed; True if a root left or a removed one
        became known (open connections must be checked again)."""
        new = {fingerprint(r): r for r in roots}
        gone = [key for key in self.current if key not in new]
        learned = False
        for root in removed:
            key = fingerprint(root)
            if key not in new and key not in self.removed and key not in self.current:
                self.removed[key], learned = root, True
        for key in gone:
            self.removed.pop(key, None)
            self.removed[key] = self.current[key]
        for key in new:
            self.removed.pop(key, None)
        while len(self.removed) > MAX_REMOVED_ROOTS:
            del self.removed[next(iter(self.removed))]
        self.current = new
        return bool(gone) or learned

    def tls_pem(self) -> str:
        """What the TLS layer verifies client chains against: the current roots and the removed ones (refused by
        name right after the handshake)."""
        return "".join(to_pem(r) for r in (*self.current.values(), *self.removed.values()))

    def is_removed(self, root: ChainRoot | None) -> bool:
        return root is not None and root.fingerprint in self.removed


def removed_root_message(root: ChainRoot, node: str | None) -> str:
    """Why a client under a removed root is refused, for it and the operator: which root, and how to re-join."""
    name = node or "<node>"
    return (f"the client certificate chains to root {root.subject} ({root.fingerprint[:19]}…), which was removed "
            "from the issuer's trust bundle (`tcpmesh ca rotate remove-old`): this node's credential was signed "
            f"under it, so the node missed the rotation and must join again — put a one-time token (`tcpmesh issuer "
            f"token {name}`) in the agent's identity.issuer.bootstrap_token_file (the agent joins with it at its next "
            f"attempt, no restart), or write a node credential from the current root (`tcpmesh ca "
            f"issue-node-credential {name} --ca <current root> --out <its identity.issuer.credential_dir>`)")
