"""The rotator's steps with an injected clock: renewals on schedule, failures kept and retried, the
node CA directory followed (re-issued intermediate, broken files), metrics and the report — which
must never carry key material. The rotator loads its CA and mints through real minting worker
processes here (``minting.spawn_minter``), as the agent does."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from datetime import datetime, timedelta, timezone

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from agent.identity.bundle import fingerprint
from agent.identity.ca import init_ca, load_ca
from agent.identity.errors import IdentityError, SvidError
from agent.identity.node_ca import NODE_KEY_FILE, issue_node_files
from agent.identity.minting_client import RemoteSigner
from agent.identity.report import format_report, select
from agent.identity.svid_rotator import CaSource, IdentityRotator
from agent.identity.spiffe import SpiffeId
from agent.telemetry.metrics import Metrics

TD = "td.test"
WEB = SpiffeId.parse("spiffe://td.test/ns/shop/sa/web")
DB = SpiffeId.parse("spiffe://td.test/ns/data/sa/postgres")


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(timezone.utc)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **kwargs) -> None:
        self.now += timedelta(**kwargs)


@pytest.fixture
def node_dir(tmp_path):
    init_ca(TD, tmp_path / "root")
    issue_node_files(tmp_path / "root", "node1", tmp_path / "node1")
    return tmp_path / "node1"


@pytest.fixture
def metrics():
    return Metrics(CollectorRegistry())


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def rotator(node_dir, metrics, clock):
    rot = IdentityRotator(CaSource(str(node_dir), node="node1"), ttl_seconds=3600, metrics=metrics, clock=clock)
    rot.store.ensure([WEB, DB])
    return rot


def sample(metrics, name: str, **labels) -> float | None:
    return metrics.registry.get_sample_value(name, labels or None)


def test_first_issue_sets_expiry_metrics_but_is_not_a_renewal(rotator, metrics) -> None:
    svid = rotator.store.svid(WEB)
    assert sample(metrics, "tcpmesh_certificate_expiry_timestamp_seconds", workload=WEB.uri) == svid.not_after.timestamp()
    assert sample(metrics, "tcpmesh_certificate_renewals_total", workload=WEB.uri) is None
    assert sample(metrics, "tcpmesh_node_ca_expiry_timestamp_seconds") == rotator.signing.not_after.timestamp()


def test_renews_each_identity_when_its_time_comes(rotator, metrics, clock) -> None:
    first = {i: rotator.store.svid(i) for i in (WEB, DB)}
    wake = rotator.renew_due()
    assert wake is not None and clock.now + timedelta(minutes=23) < wake < clock.now + timedelta(minutes=37)
    assert {i: rotator.store.svid(i) for i in (WEB, DB)} == first  # nothing due yet
    clock.now = wake
    rotator.renew_due()
    renewed = [i for i in (WEB, DB) if rotator.store.svid(i).serial != first[i].serial]
    assert renewed, "the identity whose time came was renewed"
    for i in renewed:
        assert sample(metrics, "tcpmesh_certificate_renewals_total", workload=i.uri) == 1
        assert sample(metrics, "tcpmesh_certificate_expiry_timestamp_seconds", workload=i.uri) == \
            rotator.store.svid(i).not_after.timestamp()
    clock.advance(minutes=40)
    rotator.renew_due()
    assert all(rotator.store.svid(i).serial != first[i].serial for i in (WEB, DB))


def test_failed_renewal_keeps_the_old_certificate_and_backs_off(rotator, metrics, clock, monkeypatch, caplog) -> None:
    old = rotator.store.svid(WEB)
    client_ctx = rotator.store.client_context_for(WEB)

    def broken(*args, **kwargs):
        raise SvidError("the signer is unavailable")

    monkeypatch.setattr(RemoteSigner, "issue_svids", broken)
    clock.advance(minutes=40)
    with caplog.at_level(logging.WARNING, logger="tcpmesh.identity"):
        wake = rotator.renew_due()
    assert rotator.store.svid(WEB) is old and rotator.store.client_context_for(WEB) is client_ctx
    assert wake == clock.now + timedelta(seconds=1)
    assert sample(metrics, "tcpmesh_certificate_renewal_failures_total", workload=WEB.uri) == 1
    assert "renewing the SVID of spiffe://td.test/ns/shop/sa/web failed (1 in a row): the signer is unavailable; " \
           f"still serving serial {old.serial:x}" in caplog.text
    report = rotator.report()
    (web,) = select(report, WEB.uri)
    assert web["state"] == "retrying" and web["failures"] == 1 and web["last_error"] == "the signer is unavailable"
    clock.advance(seconds=1)
    assert rotator.renew_due() == clock.now + timedelta(seconds=2)  # doubled
    monkeypatch.undo()
    clock.advance(seconds=2)
    rotator.renew_due()
    assert rotator.store.svid(WEB).serial != old.serial
    assert select(rotator.report(), WEB.uri)[0]["state"] == "valid"


def test_expired_certificate_whose_renewal_fails_is_logged_as_an_error(rotator, clock, monkeypatch, caplog) -> None:
    monkeypatch.setattr(RemoteSigner, "issue_svids", lambda *a, **k: (_ for _ in ()).throw(SvidError("down")))
    clock.advance(hours=2)
    with caplog.at_level(logging.ERROR, logger="tcpmesh.identity"):
        rotator.renew_due()
    assert "EXPIRED" in caplog.text and "peers reject this identity" in caplog.text
    assert select(rotator.report(), WEB.uri)[0]["state"] == "expired"


def test_reissued_intermediate_is_picked_up_and_every_svid_reissued(rotator, node_dir, metrics, caplog) -> None:
    before = {i: rotator.store.svid(i).serial for i in (WEB, DB)}
    old_ca = rotator.signing.certificate.fingerprint
    assert not rotator.check_ca()  # nothing changed
    issue_node_files(node_dir.parent / "root", "node1", node_dir)
    with caplog.at_level(logging.INFO, logger="tcpmesh.identity"):
        assert rotator.check_ca()
    assert rotator.signing.certificate.fingerprint != old_ca
    for i in (WEB, DB):
        svid = rotator.store.svid(i)
        assert svid.serial != before[i] and svid.chain_pem == ((node_dir / "node.crt").read_text(),)
        assert sample(metrics, "tcpmesh_certificate_renewals_total", workload=i.uri) == 1
    assert "reloaded node intermediate" in caplog.text
    assert not rotator.check_ca()


def test_broken_files_keep_the_current_ca_and_are_reported_once(rotator, node_dir, caplog) -> None:
    signing = rotator.signing
    serial = rotator.store.svid(WEB).serial
    (node_dir / NODE_KEY_FILE).chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="tcpmesh.identity"):
        assert not rotator.check_ca()
        assert not rotator.check_ca()
    assert caplog.text.count("changed but cannot be used") == 1
    assert "group or others may read the CA key" in caplog.text and "keeping node intermediate" in caplog.text
    assert rotator.signing is signing and rotator.store.svid(WEB).serial == serial
    (node_dir / NODE_KEY_FILE).chmod(0o600)
    assert rotator.check_ca() is False  # same content as before: nothing to re-issue
    assert rotator.store.svid(WEB).serial == serial


def test_removed_identity_takes_its_series_along(rotator, metrics) -> None:
    rotator.store.ensure([DB])
    assert sample(metrics, "tcpmesh_certificate_expiry_timestamp_seconds", workload=WEB.uri) is None
    assert sample(metrics, "tcpmesh_certificate_expiry_timestamp_seconds", workload=DB.uri) is not None


def test_report_names_serials_dates_and_root_but_never_keys(rotator, node_dir, metrics) -> None:
    report = rotator.report({WEB: ["web-1", "web-2"]})
    text = json.dumps(report) + format_report(report, select(report, None)) + generate_latest(metrics.registry).decode()
    assert "BEGIN" not in text and "PRIVATE" not in text
    for i in (WEB, DB):
        key_body = "".join(rotator.store.svid(i).key_pem.splitlines()[1:-1])
        assert key_body[:24] not in text
    node_key = "".join((node_dir / NODE_KEY_FILE).read_text().splitlines()[1:-1])
    assert node_key[:24] not in text
    root = load_ca(node_dir.parent / "root").certificate
    (web,) = select(report, "web-1")
    assert web["serial"] == f"{rotator.store.svid(WEB).serial:x}"
    assert web["root"]["fingerprint"] == fingerprint(root) == report["node_ca"]["root"]["fingerprint"]
    assert web["chain"][0]["subject"].startswith("CN=tcpmesh node CA node1 ")
    assert 0 < web["seconds_to_renewal"] < web["seconds_to_expiry"] <= 3600
    assert report["trust_bundle"][0]["fingerprint"] == fingerprint(root)
    assert select(report, "shop/web") == [web] and select(report, "nobody") == []
    rendered = format_report(report, [web])
    assert "spiffe://td.test/ns/shop/sa/web (web-1, web-2)" in rendered and "valid" in rendered


def test_root_as_signer_is_allowed_for_development_with_a_warning(tmp_path, caplog) -> None:
    init_ca(TD, tmp_path / "root")
    with caplog.at_level(logging.WARNING, logger="tcpmesh.identity"):
        rot = IdentityRotator(CaSource("", ca_dir=str(tmp_path / "root")), ttl_seconds=3600)
    assert "the agent holds the root key" in caplog.text
    rot.store.ensure([WEB])
    assert rot.report()["identities"][0]["chain"] == []


def test_a_node_ca_of_another_node_is_refused_at_start(node_dir, tmp_path) -> None:
    shutil.copytree(node_dir, tmp_path / "copy")
    with pytest.raises(Exception, match="issued for node 'node1', this is node 'node2'"):
        IdentityRotator(CaSource(str(tmp_path / "copy"), node="node2"), ttl_seconds=3600)


# -- switch_source: identity.mode changed at runtime (agent.control.identity_switch) ------------------

class RefusingSigner:
    """A signer whose every issuance fails as a whole, as an issuer that refuses does."""

    def __init__(self, trust_domain: str) -> None:
        self.trust_domain = trust_domain

    def issue_svids(self, spiffe_ids, ttl_seconds, *, now, min_ttl_seconds=0):
        raise SvidError("the issuer refused (not_placed): no such workload on node1")


class SourceWith:
    """A source that loads like ``inner`` but signs with ``signer`` (and defers first issues: issuer mode)."""

    defer_first_issue = True

    def __init__(self, inner, signer=None) -> None:
        self.inner, self.signer, self.directory = inner, signer, inner.directory

    def load(self, now):
        signing = self.inner.load(now)
        return signing if self.signer is None else dataclasses.replace(signing, signer=self.signer)

    def signature(self):
        return self.inner.signature()


def test_switch_source_reissues_every_svid_and_leaves_open_contexts_alone(rotator, tmp_path, caplog) -> None:
    issue_node_files(tmp_path / "root", "node1", tmp_path / "other")
    before = {i: (rotator.store.svid(i).serial, rotator.store.client_context_for(i)) for i in (WEB, DB)}
    with caplog.at_level(logging.INFO, logger="tcpmesh.identity"):
        signing = rotator.switch_source_now(SourceWith(CaSource(str(tmp_path / "other"), node="node1")))
    assert rotator.signing is signing and rotator.store.ca is signing.signer
    for i in (WEB, DB):
        svid = rotator.store.svid(i)
        assert svid.serial != before[i][0] and svid.chain_pem == ((tmp_path / "other" / "node.crt").read_text(),)
        assert rotator.store.client_context_for(i) is not before[i][1]   # new connections: new contexts
    assert "identity source switched at runtime" in caplog.text
    new = SpiffeId.parse("spiffe://td.test/ns/shop/sa/new")
    rotator.store.ensure([WEB, DB, new])
    assert rotator.store.pending() == {new}   # the new source's way: first SVIDs on the rotator's thread


@pytest.mark.parametrize("broken", ["load", "issue"])
def test_a_switch_that_fails_changes_nothing(rotator, tmp_path, broken) -> None:
    signing, source = rotator.signing, rotator._source
    serials = {i: rotator.store.svid(i).serial for i in (WEB, DB)}
    if broken == "load":
        new_source = CaSource(str(tmp_path / "missing"), node="node1")
    else:
        new_source = SourceWith(source, RefusingSigner(TD))
    with pytest.raises(IdentityError):
        rotator.switch_source_now(new_source)
    assert rotator.signing is signing and rotator._source is source and rotator.store.ca is signing.signer
    assert {i: rotator.store.svid(i).serial for i in (WEB, DB)} == serials
    assert not rotator.check_ca()   # still following the old directory, nothing pending
    rotator.store.ensure([WEB, DB, SpiffeId.parse("spiffe://td.test/ns/shop/sa/new")])
    assert rotator.store.pending() == frozenset()   # still node_ca: first issues on the caller's thread


def test_node_ca_mode_signs_a_new_identity_off_the_event_loop(node_dir) -> None:
    """node_ca mode as the agent wires it (``sign_off_loop``): ``ensure`` called on the data-path event loop must
    not mint there (starting the minting worker costs ≈ 105 ms, during which every tunnel of the node waits).
    The identity is pending until the rotator's thread has minted it; meanwhile the loop runs other callbacks.
    Checked by ordering, not time: the mint waits for a callback only the loop can run. Seen failing before the
    change: the mint ran on the loop thread inside ``ensure`` (and waited its bound for the callback)."""
    import asyncio
    import threading

    from agent.identity import minting_worker

    signing, release, events = threading.Event(), threading.Event(), []

    def transport(request: dict) -> dict:
        if request.get("op") == "issue":
            events.append("mint on the loop thread" if threading.current_thread() is loop_thread else "mint elsewhere")
            signing.set()
            if not release.wait(10):   # only the loop releases it; the bound only ends a deadlock
                events.append("the loop never ran while minting")
        return minting_worker.handle(request)

    source = CaSource(str(node_dir), node="node1", transport=transport, sign_off_loop=True)
    rotator = IdentityRotator(source, ttl_seconds=3600)

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.create_task(rotator.run())
        try:
            rotator.store.ensure([WEB])
            events.append("ensure returned")
            assert WEB in rotator.store.pending() and WEB not in rotator.store
            while not signing.is_set():
                await asyncio.sleep(0.01)
            loop.call_soon(lambda: (events.append("the loop ran a callback while minting"), release.set()))
            started = loop.time()
            while WEB not in rotator.store:
                assert loop.time() - started < 30, events
                await asyncio.sleep(0.01)
            events.append("SVID in service")
        finally:
            task.cancel()

    loop_thread = threading.current_thread()   # asyncio.run runs the loop on this thread
    asyncio.run(scenario())
    assert events == ["ensure returned", "mint elsewhere", "the loop ran a callback while minting",
                      "SVID in service"], events
    assert not rotator.store.pending()
    # the same store called from a thread without an event loop (tools, the CLI) still mints at once
    rotator.store.ensure([WEB, DB])
    assert DB in rotator.store


def test_a_cancelled_run_returns_only_after_the_step_in_flight_has_finished(rotator, monkeypatch) -> None:
    """A stop must not leave the identity thread writing: CI saw a renewal's ``.credential.key.*.tmp`` in the
    credential directory after the agent had stopped (the step ran on in the worker thread after run() returned)."""
    import asyncio
    import threading

    started, release, finished = threading.Event(), threading.Event(), threading.Event()

    def slow_step():
        started.set()
        release.wait(10)
        finished.set()
        return None

    monkeypatch.setattr(rotator, "renew_due", slow_step)

    async def scenario() -> None:
        task = asyncio.create_task(rotator.run())
        while not started.is_set():
            await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.sleep(0.2)
        assert not task.done(), "run() returned while its step was still running"
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert finished.is_set()

    asyncio.run(scenario())
