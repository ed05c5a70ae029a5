"""The node's local identities: their SVIDs and TLS contexts, kept as immutable swapped snapshots.

``IdentityStore.ensure(ids)`` reconciles: issues SVIDs for identities newly listed, renews those past
half-life, drops those no longer listed, then publishes a new snapshot with one assignment (the data
path reads whatever snapshot is current and never sees a half-built one). ``plan`` is the pure diff.

``renew(ids)`` re-issues chosen identities (the rotator's schedule decides which and when);
``replace_ca`` switches to a new signing CA and trust bundle and re-issues every identity under it
(a node intermediate re-issued, a root added to or removed from the bundle). Every SVID issued is
reported to an optional ``StoreListener`` (metrics, logs).

What runs where: ``ensure`` runs on the data-path event loop (the registry reconcile); ``renew``,
``issue_pending`` and ``replace_ca`` run on the rotator's worker thread. The state lock guards the
snapshot and is held only to read it or publish a new one, never across a signer call, so the event
loop never waits for the issuer. The worker-thread calls build outside it (one at a time, under a
second lock the event loop never takes, so no CA swap lands mid-renewal) and publish with a merge:
an identity removed meanwhile stays removed, one added meanwhile stays (pending, or, added under the
old CA during a ``replace_ca``, re-issued under the new one before the swap). In
issuer mode ``ensure`` asks no signer at all. In node_ca mode as the agent wires it (``sign_off_loop``)
neither when it is called on an event loop — the data path's: minting starts a worker process (≈ 105 ms
at its start) — a new identity is then pending, as in issuer mode, until the rotator's thread mints it
(``issue_pending``); called from a thread without a loop (tools, tests) it mints at once, as before.

SVIDs are minted by a ``Signer``: in the agent a ``minting.RemoteSigner``, which mints in a
short-lived worker process so the agent never imports cryptography; in tools and tests a
``ca.CertificateAuthority`` signing in-process. All identities due together are minted in one call.

Only this node's local workloads get SVIDs here. Calls into ``svid`` / ``tls``; owns no sockets.
Must not import cryptography.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable, Mapping, Protocol, Sequence

from agent.identity.errors import IdentityError, PeerIdentityError, SvidError, UnknownIdentityError
from agent.identity.spiffe import SpiffeId
from agent.identity.svid import MIN_TTL_SECONDS, Svid, needs_renewal
from agent.identity.tls import SniServerContexts, client_context, peer_spiffe_id, server_context, trust_anchors

ISSUED_FIRST = "first"
ISSUED_RENEWAL = "renewal"
ISSUED_CA_CHANGE = "ca-change"


class Signer(Protocol):
    """What the store mints SVIDs with (``minting.RemoteSigner``, ``ca.CertificateAuthority``)."""

    trust_domain: str

    def issue_svids(self, spiffe_ids: Sequence[SpiffeId], ttl_seconds: int, *, now: datetime,
                    min_ttl_seconds: int = MIN_TTL_SECONDS) -> Mapping[SpiffeId, Svid | IdentityError]:
        """One SVID or the error that prevented it per identity; raises ``IdentityError`` if nothing
        could be minted at all (the worker did not start or answer)."""
        ...


class StoreListener(Protocol):
    def svid_issued(self, svid: Svid, reason: str) -> None: ...
    def identity_removed(self, spiffe_id: SpiffeId) -> None: ...


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
    thread; writers publish under the state lock, and the worker-thread writers build outside it
    (see the module docstring).
    """

    def __init__(self, ca: Signer, trust_bundle_pem: str | bytes, ttl_seconds: int, *,
                 key_dir: str | Path | None = None,
                 clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
                 min_ttl_seconds: int = MIN_TTL_SECONDS, listener: StoreListener | None = None,
                 defer_first_issue: bool = False, sign_off_loop: bool = False) -> None:
        self._ca = ca
        # Issuer mode: ``ensure`` never asks the signer (a network call) on the caller's thread; a new
        # identity is *pending* — its connects are refused (UnknownIdentityError) — until the rotator's
        # ``issue_pending`` gets its first SVID.
        self._defer = defer_first_issue
        # node_ca mode in the agent: ensure() on an event loop defers like issuer mode (the module docstring)
        self._sign_off_loop = sign_off_loop
        self._pending: frozenset[SpiffeId] = frozenset()
        self._bundle = trust_bundle_pem
        self._ttl = ttl_seconds
        self._min_ttl = min_ttl_seconds
        self._key_dir = key_dir
        self._clock = clock
        self._listener = listener
        self._lock = threading.Lock()        # the snapshot's state; never held across a signer call
        self._build_lock = threading.Lock()  # worker threads only: one renew/issue_pending/replace_ca at a time
        self._entries: Mapping[SpiffeId, _Entry] = {}
        self._front = SniServerContexts(trust_bundle_pem)
        self._context_hook: Callable[[ssl.SSLContext], None] | None = None  # set_context_hook
        self._anchors: tuple[str | bytes, frozenset[str]] | None = None

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
            deferred = self._defer or (self._sign_off_loop and _on_event_loop())
            if deferred:
                self._pending = frozenset(todo.issue)
                todo = Plan(issue=(), renew=(), keep=tuple(sorted((*todo.keep, *todo.renew))), remove=todo.remove)
                wake = getattr(self._listener, "wake", None)
                if self._pending and wake is not None:
                    wake()  # the rotator's thread asks the issuer, or mints (node_ca mode)
            if not todo.changed:
                return todo
            entries = {i: current[i] for i in todo.keep}
            # node_ca mode called off any event loop only (every other call deferred above): a local signer
            entries.update(_every_entry(self._build((*todo.issue, *todo.renew), now, self._ca, self._bundle)))
            self._publish(entries)
            if not deferred:   # pending from an earlier call on the loop: minted now, or no longer wanted
                self._pending = self._pending & frozenset(todo.keep)
        for spiffe_id in todo.issue:
            self._notify_issued(entries[spiffe_id].svid, ISSUED_FIRST)
        for spiffe_id in todo.renew:
            self._notify_issued(entries[spiffe_id].svid, ISSUED_RENEWAL)
        for spiffe_id in todo.remove:
            if self._listener is not None:
                self._listener.identity_removed(spiffe_id)
        return todo

    def renew(self, spiffe_ids: Iterable[SpiffeId]) -> dict[SpiffeId, Svid | IdentityError]:
        """Re-issue each of ``spiffe_ids`` that is still held; the rest of the snapshot is kept.

        Each identity succeeds or fails on its own; a failed one keeps its current SVID. Returns the
        new SVID or the error, per identity (identities no longer held are skipped).
        """
        results: dict[SpiffeId, Svid | IdentityError] = {}
        with self._build_lock:
            with self._lock:
                now, signer, bundle = self._clock(), self._ca, self._bundle  # replace_ca waits for the build lock
                before = dict(self._entries)
            built = self._build(sorted(set(spiffe_ids) & set(before)), now, signer, bundle)  # the lock is free
            with self._lock:
                entries = dict(self._entries)
                for spiffe_id, result in built.items():
                    if entries.get(spiffe_id) is not before[spiffe_id]:
                        continue  # removed (or re-issued by ensure) meanwhile: it stays as it is now
                    if isinstance(result, _Entry):
                        entries[spiffe_id] = result
                        results[spiffe_id] = result.svid
                    else:
                        results[spiffe_id] = result
                if any(isinstance(r, Svid) for r in results.values()):
                    self._publish(entries)
        for result in results.values():
            if isinstance(result, Svid):
                self._notify_issued(result, ISSUED_RENEWAL)
        return results

    def pending(self) -> frozenset[SpiffeId]:
        """Identities waiting for their first SVID (issuer mode); their connects are refused meanwhile."""
        return self._pending

    def issue_pending(self) -> dict[SpiffeId, Svid | IdentityError]:
        """Try to get a first SVID for every pending identity; each succeeds or stays pending on its own."""
        results: dict[SpiffeId, Svid | IdentityError] = {}
        with self._build_lock:
            with self._lock:
                todo = sorted(self._pending)
                now, signer, bundle = self._clock(), self._ca, self._bundle
            if not todo:
                return results
            built = self._build(todo, now, signer, bundle)  # the lock is free: ensure goes on meanwhile
            with self._lock:
                entries = dict(self._entries)
                for spiffe_id, result in built.items():
                    if spiffe_id not in self._pending or spiffe_id in entries:
                        continue  # removed meanwhile: it must not come back
                    if isinstance(result, _Entry):
                        entries[spiffe_id] = result
                        results[spiffe_id] = result.svid
                    else:
                        results[spiffe_id] = result
                issued = {i for i, r in results.items() if isinstance(r, Svid)}
                self._pending = self._pending - issued   # added meanwhile: still pending, asked next round
                if issued:
                    self._publish(entries)
        for result in results.values():
            if isinstance(result, Svid):
                self._notify_issued(result, ISSUED_FIRST)
        return results

    def replace_ca(self, ca: Signer, trust_bundle_pem: str | bytes, *, defer_first_issue: bool | None = None,
                   sign_off_loop: bool | None = None) -> None:
        """Sign with ``ca`` and trust ``trust_bundle_pem`` from now on; re-issue every identity under them.

        All or nothing: if any identity cannot be issued, the old CA, bundle and SVIDs stay. Open
        connections keep the contexts they were made with. ``defer_first_issue`` (not None): the new
        signer's way with new identities (a runtime switch of ``identity.mode``), set with the swap.
        """
        if ca.trust_domain != self._ca.trust_domain:
            raise SvidError(f"the new CA serves trust domain {ca.trust_domain!r}, this node {self._ca.trust_domain!r}; "
                            "a root rotation keeps the trust domain")
        with self._build_lock:
            built: dict[SpiffeId, _Entry] = {}
            while True:
                with self._lock:
                    now, held = self._clock(), set(self._entries)
                    if held <= set(built):  # every identity held now has its SVID from the new CA: swap
                        entries = {i: built[i] for i in held}
                        self._ca, self._bundle = ca, trust_bundle_pem
                        if defer_first_issue is not None:
                            self._defer = defer_first_issue
                        if sign_off_loop is not None:
                            self._sign_off_loop = sign_off_loop
                        self._publish(entries)
                        break
                # outside the lock (the new signer may be the issuer); on any error nothing has changed.
                # A second round only for identities ensure added (node_ca mode) during the first.
                built.update(_every_entry(self._build(sorted(held - set(built)), now, ca, trust_bundle_pem)))
        for entry in entries.values():
            self._notify_issued(entry.svid, ISSUED_CA_CHANGE)

    def peer_identity(self, ssl_object: ssl.SSLObject | ssl.SSLSocket) -> SpiffeId:
        """The verified peer's SPIFFE ID, which must be of this node's trust domain.

        The bundle's name constraints already keep other trust domains out; this is the second guard.
        """
        peer = peer_spiffe_id(ssl_object)
        if peer.trust_domain != self._ca.trust_domain:
            raise PeerIdentityError(f"peer presented {peer.uri}, from trust domain {peer.trust_domain!r}; "
                                    f"this node accepts trust domain {self._ca.trust_domain!r} only")
        return peer

    @property
    def ca(self) -> Signer:
        return self._ca

    @property
    def trust_bundle_pem(self) -> str | bytes:
        return self._bundle

    @property
    def trust_anchors(self) -> frozenset[str]:
        """Fingerprints of the bundle's certificates (agent.identity.tls.trust_anchors), cached per bundle."""
        bundle = self._bundle
        cached = self._anchors
        if cached is None or cached[0] is not bundle:
            cached = self._anchors = (bundle, trust_anchors(bundle))
        return cached[1]

    def svids(self) -> Mapping[SpiffeId, Svid]:
        """The current SVID of every local identity (a copy of the snapshot; public material only)."""
        return {spiffe_id: entry.svid for spiffe_id, entry in self._entries.items()}

    def set_context_hook(self, hook: Callable[[ssl.SSLContext], None] | None) -> None:
        """Call ``hook`` on every TLS context the store holds, now and whenever it publishes new ones (the agent's
        kernel TLS gives each its key log: agent.proxy.kernel_tls). Contexts are complete before they are published."""
        with self._lock:
            self._context_hook = hook
            if hook is not None:
                self._hook_contexts(self._entries)

    def _hook_contexts(self, entries: Mapping[SpiffeId, _Entry]) -> None:
        hook = self._context_hook
        if hook is None:
            return
        hook(self._front.context)
        for entry in entries.values():
            hook(entry.client)
            hook(entry.server)

    def _publish(self, entries: dict[SpiffeId, _Entry]) -> None:
        self._hook_contexts(entries)
        self._front.replace({i: e.server for i, e in entries.items()})
        self._entries = entries  # a new dict replaces the old one; never mutated afterwards

    def _notify_issued(self, svid: Svid, reason: str) -> None:
        if self._listener is not None:
            self._listener.svid_issued(svid, reason)

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

    def _build(self, spiffe_ids: Sequence[SpiffeId], now: datetime, signer: Signer,
               bundle: str | bytes) -> dict[SpiffeId, _Entry | IdentityError]:
        """Mint SVIDs for ``spiffe_ids`` with ``signer`` in one call and build their contexts trusting
        ``bundle``; per identity, the entry or the error. A signer that fails as a whole fails every
        identity with its error. Reads no mutable state of the store (callers pass a snapshot)."""
        if not spiffe_ids:
            return {}
        try:
            minted = signer.issue_svids(spiffe_ids, self._ttl, now=now, min_ttl_seconds=self._min_ttl)
        except IdentityError as exc:
            return {spiffe_id: exc for spiffe_id in spiffe_ids}
        built: dict[SpiffeId, _Entry | IdentityError] = {}
        for spiffe_id in spiffe_ids:
            svid = minted.get(spiffe_id) or SvidError(f"the signer returned no SVID for {spiffe_id.uri}")
            if isinstance(svid, IdentityError):
                built[spiffe_id] = svid
                continue
            try:
                built[spiffe_id] = _Entry(svid=svid,
                                          client=client_context(svid, bundle, key_dir=self._key_dir),
                                          server=server_context(svid, bundle, key_dir=self._key_dir))
            except IdentityError as exc:
                built[spiffe_id] = exc
        return built


def _on_event_loop() -> bool:
    """Whether the caller runs on an event loop (the agent's data path): then ``ensure`` must not mint."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _every_entry(built: Mapping[SpiffeId, _Entry | IdentityError]) -> dict[SpiffeId, _Entry]:
    """All or nothing: the entries, or the first identity's error raised."""
    for result in built.values():
        if not isinstance(result, _Entry):
            raise result
    return dict(built)  # type: ignore[arg-type]
