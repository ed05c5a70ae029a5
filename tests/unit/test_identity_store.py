"""IdentityStore: reconciling the node's local identities into atomically swapped snapshots."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone
from typing import Callable

import pytest

from agent.identity.ca import generate_ca
from agent.identity.errors import MinterError, SvidError, UnknownIdentityError
from agent.identity.spiffe import SpiffeId
from agent.identity.store import IdentityStore, plan
from agent.identity.issue import issue_svid
from agent.identity.svid import renewal_time

A = SpiffeId.parse("spiffe://td/ns/a/sa/b")
DB = SpiffeId.parse("spiffe://td/ns/db/sa/postgres")
CACHE = SpiffeId.parse("spiffe://td/ns/cache/sa/redis")
T0 = datetime(2030, 1, 1, tzinfo=timezone.utc)


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture(scope="module")
def ca():
    return generate_ca("td", now=T0 - timedelta(days=1))


@pytest.fixture
def clock() -> Clock:
    return Clock(T0)


@pytest.fixture
def store(ca, clock) -> IdentityStore:
    return IdentityStore(ca, ca.cert_pem, 3600, clock=clock)


def test_plan_is_a_pure_diff(ca) -> None:
    fresh = issue_svid(ca, A, 3600, now=T0)
    stale = issue_svid(ca, DB, 3600, now=T0 - timedelta(minutes=50))
    result = plan({A: fresh, DB: stale, CACHE: fresh}, [A, DB, SpiffeId.parse("spiffe://td/ns/n/sa/new")], T0)
    assert result.issue == (SpiffeId.parse("spiffe://td/ns/n/sa/new"),)
    assert result.renew == (DB,)
    assert result.keep == (A,)
    assert result.remove == (CACHE,)
    assert result.changed
    assert not plan({A: fresh}, [A], T0).changed


def test_ensure_issues_for_listed_identities_only(store) -> None:
    result = store.ensure([A, DB])
    assert result.issue == (A, DB)
    assert store.identities == {A, DB}
    assert store.svid(A).spiffe_id == A
    assert store.client_context_for(A) is not store.client_context_for(DB)
    with pytest.raises(UnknownIdentityError, match=r"spiffe://td/ns/cache/sa/redis is not a local identity.*"
                                                   r"local: spiffe://td/ns/a/sa/b, spiffe://td/ns/db/sa/postgres"):
        store.client_context_for(CACHE)


def test_ensure_is_idempotent_and_keeps_svids(store) -> None:
    store.ensure([A, DB])
    svid, ctx = store.svid(A), store.client_context_for(A)
    result = store.ensure([DB, A])
    assert not result.changed
    assert store.svid(A) is svid and store.client_context_for(A) is ctx


def test_ensure_removes_identities_no_longer_listed(store) -> None:
    store.ensure([A, DB])
    front = store.server_context
    result = store.ensure([DB])
    assert result.remove == (A,) and store.identities == {DB} and A not in store
    with pytest.raises(UnknownIdentityError):
        store.svid(A)
    assert store.server_context is front  # the listener's context survives every change


def test_ensure_renews_at_half_life(store, clock) -> None:
    store.ensure([A])
    first = store.svid(A)
    clock.now = renewal_time(first)
    assert store.ensure([A]).renew == (A,)
    assert store.svid(A).serial != first.serial and store.svid(A).not_before > first.not_before


def test_snapshots_are_replaced_not_mutated(store) -> None:
    store.ensure([A])
    before = store._entries
    store.ensure([A, DB])
    assert store._entries is not before and set(before) == {A}  # a reader holding the old one is undisturbed


def test_foreign_trust_domain_changes_nothing(store) -> None:
    store.ensure([A])
    with pytest.raises(SvidError, match="spiffe://other/ns/x/sa/y: this node's CA serves trust domain 'td'"):
        store.ensure([A, DB, SpiffeId.parse("spiffe://other/ns/x/sa/y")])
    assert store.identities == {A}


def test_repr_shows_identities_not_keys(store) -> None:
    store.ensure([A, DB])
    for text in (repr(store), str(store), repr(store._entries)):
        assert "PRIVATE KEY" not in text
        assert "".join(store.svid(A).key_pem.splitlines()[1:2])[:16] not in text
    assert A.uri in repr(store)


class CountingSigner:
    """A ``Signer`` around a CA that records its batches and can fail one identity or every call."""

    def __init__(self, ca) -> None:
        self.ca, self.trust_domain, self.batches = ca, ca.trust_domain, []
        self.refuse: SpiffeId | None = None
        self.down = False
        self.during: Callable[[], object] | None = None  # runs once on another thread while the call is open
        self.serials: set[int] = set()

    def issue_svids(self, spiffe_ids, ttl_seconds, *, now, min_ttl_seconds=60):
        self.batches.append(tuple(spiffe_ids))
        during, self.during = self.during, None
        if during is not None:
            on_another_thread(during)
        if self.down:
            raise MinterError("the SVID minting worker exited with code 1 without an answer")
        results = self.ca.issue_svids(spiffe_ids, ttl_seconds, now=now, min_ttl_seconds=min_ttl_seconds)
        if self.refuse in results:
            results[self.refuse] = SvidError(f"cannot issue {self.refuse.uri}")
        self.serials |= {r.serial for r in results.values() if not isinstance(r, Exception)}
        return results


def on_another_thread(call: Callable[[], object]) -> object:
    """``call()`` on a thread of its own (the event loop's ``ensure`` beside a worker-thread build); it
    must finish while the build is still open. The bound only catches a deadlock (a call waiting for the
    build that waits for it) and is far above any normal run."""
    outcome: list = []
    thread = threading.Thread(target=lambda: outcome.append(call()), daemon=True)
    thread.start()
    thread.join(30)
    assert outcome, "the call waited for the signer call in flight (it blocks on the store's lock)"
    return outcome[0]


def test_identities_due_together_are_minted_in_one_signer_call(ca, clock) -> None:
    signer = CountingSigner(ca)
    store = IdentityStore(signer, ca.cert_pem, 3600, clock=clock)
    store.ensure([A, DB, CACHE])
    assert signer.batches == [(A, CACHE, DB)]  # one minting worker for the whole reconcile, sorted
    store.renew([A, DB])
    assert signer.batches[-1] == (A, DB)


def test_a_signer_that_fails_as_a_whole_changes_nothing(ca, clock) -> None:
    signer = CountingSigner(ca)
    store = IdentityStore(signer, ca.cert_pem, 3600, clock=clock)
    store.ensure([A, DB])
    before = store.svids()
    signer.down = True
    results = store.renew([A, DB])
    assert all(isinstance(r, MinterError) for r in results.values()) and set(results) == {A, DB}
    assert store.svids() == before
    with pytest.raises(MinterError, match="without an answer"):
        store.ensure([A, DB, CACHE])
    assert store.identities == {A, DB}


def test_one_refused_identity_fails_the_reconcile_but_only_itself_on_renewal(ca, clock) -> None:
    signer = CountingSigner(ca)
    store = IdentityStore(signer, ca.cert_pem, 3600, clock=clock)
    store.ensure([A, DB])
    old = store.svid(DB)
    signer.refuse = DB
    results = store.renew([A, DB])
    assert isinstance(results[DB], SvidError) and store.svid(DB) is old
    assert results[A] == store.svid(A) and store.svid(A).serial != old.serial
    signer.refuse = CACHE
    with pytest.raises(SvidError, match="cannot issue spiffe://td/ns/cache/sa/redis"):
        store.ensure([DB, CACHE])  # all or nothing: A stays, CACHE is not added
    assert store.identities == {A, DB}


# -- writers on two threads: the worker's build runs outside the lock ensure takes (issue #18) ----------
def test_an_identity_removed_while_its_renewal_is_built_does_not_come_back(ca, clock) -> None:
    signer = CountingSigner(ca)
    store = IdentityStore(signer, ca.cert_pem, 3600, clock=clock)
    store.ensure([A, DB])
    old_db = store.svid(DB)
    signer.during = lambda: store.ensure([DB])     # A's pod leaves while the rotator renews A and DB
    results = store.renew([A, DB])
    assert store.identities == {DB} and A not in store and A not in results
    assert results[DB] == store.svid(DB) and store.svid(DB).serial != old_db.serial


def test_an_identity_added_while_pending_ones_are_issued_stays_pending(ca, clock) -> None:
    signer = CountingSigner(ca)
    store = IdentityStore(signer, ca.cert_pem, 3600, clock=clock, defer_first_issue=True)
    store.ensure([A])
    signer.during = lambda: store.ensure([A, DB])  # issuer mode: ensure asks no signer and does not wait
    assert set(store.issue_pending()) == {A}
    assert store.identities == {A} and store.pending() == {DB}
    assert set(store.issue_pending()) == {DB} and store.identities == {A, DB} and not store.pending()
    signer.during = lambda: store.ensure([A])
    store.ensure([A, CACHE])
    assert store.issue_pending() == {} and store.identities == {A} and not store.pending()  # removed: not back


def test_replace_ca_reissues_an_identity_added_during_its_build_under_the_new_ca(ca, clock) -> None:
    store = IdentityStore(ca, ca.cert_pem, 3600, clock=clock)
    store.ensure([A])
    new = CountingSigner(generate_ca("td", now=T0 - timedelta(days=1)))
    new.during = lambda: store.ensure([A, CACHE])  # node_ca mode: ensure mints CACHE under the old CA
    store.replace_ca(new, new.ca.cert_pem)
    assert new.batches == [(A,), (CACHE,)] and store.ca is new
    assert {store.svid(A).serial, store.svid(CACHE).serial} <= new.serials


def test_replace_ca_failing_halfway_changes_nothing_and_ensure_goes_on_meanwhile(ca, clock) -> None:
    store = IdentityStore(ca, ca.cert_pem, 3600, clock=clock)
    store.ensure([A, DB])
    before = store.svids()
    new = CountingSigner(generate_ca("td", now=T0 - timedelta(days=1)))
    new.refuse = DB                                # A's SVID from the new CA is minted, DB's refused
    new.during = lambda: store.ensure([A, DB, CACHE])
    with pytest.raises(SvidError, match="cannot issue spiffe://td/ns/db/sa/postgres"):
        store.replace_ca(new, new.ca.cert_pem)
    assert store.ca is ca and store.trust_bundle_pem == ca.cert_pem
    assert store.identities == {A, DB, CACHE} and {i: store.svid(i) for i in (A, DB)} == before
    assert not {s.serial for s in store.svids().values()} & new.serials   # no SVID of the new CA in service
