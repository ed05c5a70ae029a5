"""The node's local identities: their SVIDs and TLS contexts, kept as immutable swapped snapshots.

``IdentityStore.ensure(ids)`` reconciles: issues SVIDs for identities newly listed, renews those past
half-life, drops those no longer listed, then publishes a new snapshot with one assignment (the data
path reads whatever snapshot is current and never sees a half-built one). ``plan`` is the pure diff.

Only this node's local workloads get SVIDs here. Calls into ``svid`` / ``tls``; owns no sockets.
"""

from __future__ import annotations

import ssl
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable, Mapping

from agent.identity.ca import CertificateAuthority
from agent.identity.errors import SvidError, UnknownIdentityError
from agent.identity.spiffe import SpiffeId
from agent.identity.svid import Svid, issue_svid, needs_renewal
from agent.identity.tls import SniServerContexts, client_context, server_context


@dataclass(frozen=True)
class Plan:
    """What ``ensure`` changes. Each tuple is sorted."""

    issue: tuple[SpiffeId, ...]
    renew: tuple[SpiffeId, ...]
    keep: tuple[SpiffeId, ...]
    remove: tuple[SpiffeId, ...]

    @property
    def changed(self) -> bool:
        return bool(self.issue or self.renew or self.remove)


def plan(current: Mapping[SpiffeId, Svid], desired: Iterable[SpiffeId], now: datetime) -> Plan:
    """Pure: which identities get a first SVID, a new one, keep theirs, or lose theirs."""
    wanted = set(desired)
    held = wanted & set(current)
    renew = {i for i in held if needs_renewal(current[i], now)}
    return Plan(issue=tuple(sorted(wanted - held)), renew=tuple(sorted(renew)),
                keep=tuple(sorted(held - renew)), remove=tuple(sorted(set(current) - wanted)))


@dataclass(frozen=True)
class _Entry:
    svid: Svid
    client: ssl.SSLContext
    server: ssl.SSLContext


class IdentityStore:
    """SVIDs and TLS contexts of this node's local identities, signed by ``ca``.

    Readers (the proxies) call ``client_context_for``, ``server_context`` and ``svid`` from any
    thread; ``ensure`` is the only writer and is serialized.
    """

    def __init__(self, ca: CertificateAuthority, trust_bundle_pem: str | bytes, ttl_seconds: int, *,
                 key_dir: str | Path | None = None,
                 clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc)) -> None:
        self._ca = ca
        self._bundle = trust_bundle_pem
        self._ttl = ttl_seconds
        self._key_dir = key_dir
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: Mapping[SpiffeId, _Entry] = {}
        self._front = SniServerContexts(trust_bundle_pem)

    def ensure(self, spiffe_ids: Iterable[SpiffeId]) -> Plan:
        """Make the local identities exactly ``spiffe_ids``; return what changed.

        Validates every identity first: on error nothing changes.
        """
        desired = frozenset(spiffe_ids)
        foreign = sorted(i.uri for i in desired if i.trust_domain != self._ca.trust_domain)
        if foreign:
            raise SvidError(f"cannot hold {', '.join(foreign)}: this node's CA serves trust domain "
                            f"{self._ca.trust_domain!r}; fix the workloads' identities or the agent's trust_domain")
        with self._lock:
            now = self._clock()
            current = self._entries
            todo = plan({i: e.svid for i, e in current.items()}, desired, now)
            if not todo.changed:
                return todo
            entries = {i: current[i] for i in todo.keep}
            for spiffe_id in (*todo.issue, *todo.renew):
                entries[spiffe_id] = self._build(spiffe_id, now)
            self._front.replace({i: e.server for i, e in entries.items()})
            self._entries = entries  # a new dict replaces the old one; never mutated afterwards
            return todo

    def client_context_for(self, spiffe_id: SpiffeId) -> ssl.SSLContext:
        """The context to dial with on behalf of local workload ``spiffe_id``."""
        return self._entry(spiffe_id).client

    @property
    def server_context(self) -> ssl.SSLContext:
        """The inbound listener's context: presents the local identity the client's SNI names."""
        return self._front.context

    def served_identity(self, ssl_object: ssl.SSLObject | ssl.SSLSocket) -> SpiffeId | None:
        """Which local identity an inbound handshake on ``server_context`` presented (named by SNI)."""
        return self._front.served_identity(ssl_object)

    def svid(self, spiffe_id: SpiffeId) -> Svid:
        return self._entry(spiffe_id).svid

    @property
    def identities(self) -> frozenset[SpiffeId]:
        return frozenset(self._entries)

    def __contains__(self, spiffe_id: object) -> bool:
        return spiffe_id in self._entries

    def __repr__(self) -> str:
        return f"IdentityStore(trust_domain={self._ca.trust_domain!r}, identities={sorted(i.uri for i in self._entries)})"

    def _entry(self, spiffe_id: SpiffeId) -> _Entry:
        entries = self._entries
        try:
            return entries[spiffe_id]
        except KeyError:
            local = ", ".join(sorted(i.uri for i in entries)) or "none"
            raise UnknownIdentityError(f"{spiffe_id} is not a local identity of this node (local: {local}); "
                                       "is its workload registered on this node?") from None

    def _build(self, spiffe_id: SpiffeId, now: datetime) -> _Entry:
        svid = issue_svid(self._ca, spiffe_id, self._ttl, now=now)
        return _Entry(svid=svid,
                      client=client_context(svid, self._bundle, key_dir=self._key_dir),
                      server=server_context(svid, self._bundle, key_dir=self._key_dir))
