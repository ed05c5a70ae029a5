"""The identity control loop of an agent: renews SVIDs on schedule and follows its node CA directory.

``IdentityRotator`` owns the node's ``IdentityStore``. Its ``run()`` is one asyncio task (started by
the composition root) that repeatedly
  * ``check_ca()``: every ``poll_seconds``, notices replaced files in the node CA directory (a node
    intermediate re-issued, a root added to or removed from bundle.pem during a rotation), loads
    them and re-issues every SVID under the new CA and bundle; files that do not load are reported
    and the current CA stays;
  * ``renew_due()``: renews the SVIDs whose time has come (``schedule.decide``) and records failures
    with backoff — a failed renewal keeps the old, still valid certificate in service;
and sleeps until the next of those moments (or until a new identity arrives). ``switch_source()``
replaces the source itself at runtime (``identity.mode`` node_ca <-> issuer, docs/identity.md
"Migrating to the issuer"): the new source loads (issuer mode: the node joins), every identity is
re-issued from it, and only then the store swaps — all or nothing. All of them run on a
dedicated worker thread, so waiting for the minting worker never stalls the data-path loop; the
store swaps snapshots atomically, so new connections pick up new certificates and open ones keep theirs.

The agent never imports cryptography: loading and checking the CA files and minting SVIDs happen in
a short-lived worker process (``minting_worker.py``, started by ``minting_client.py``) — one for the CA at start and
after each change of its files, one per batch of renewals. This module and everything it imports are
pure or stdlib only (a test builds the agent and proves it).

It reports every issued SVID to metrics and the log (serials and dates, never key material), and
answers ``report()`` for ``/debug/certs``. Its steps are synchronous methods with an injected clock,
so tests drive them without sleeping.
"""

from __future__ import annotations

import asyncio
import logging
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from agent.identity.errors import IdentityError
from agent.identity.files import ROOT_CA_FILES, files_signature
from agent.identity.minting_client import SigningInfo, Transport, load_signing, spawn_minter
from agent.identity.report import certs_report, short_fingerprint
from agent.identity.schedule import Failure, RenewalPolicy, after_failure, decide
from agent.identity.spiffe import SpiffeId
from agent.identity.store import ISSUED_CA_CHANGE, ISSUED_FIRST, IdentityStore
from agent.identity.svid import DEV_MIN_TTL_SECONDS, MIN_TTL_SECONDS, Svid

log = logging.getLogger("tcpmesh.identity")

DEFAULT_POLL_SECONDS = 5.0
MIN_SLEEP_SECONDS = 0.01


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class CaSource:
    """Where the agent's signing CA comes from: its node CA directory, or (development) a root CA directory."""

    node_ca_dir: str
    ca_dir: str = ""  # non-empty: sign with this root directly (the agent then holds the root key)
    node: str | None = None
    transport: Transport = field(default=spawn_minter, repr=False, compare=False)  # how the minting worker is asked
    # the agent's wiring (``ca_source``): ``ensure`` on an event loop mints nothing there; a new identity is pending
    # (its connects refused) until the rotator's thread has minted it — the loop never waits for the worker
    sign_off_loop: bool = False

    @property
    def directory(self) -> str:
        return self.ca_dir or self.node_ca_dir

    def load(self, now: datetime) -> SigningInfo:
        """Load and check the CA files (in a minting worker); ``IdentityError`` naming the file and fix."""
        return load_signing(self.node_ca_dir, ca_dir=self.ca_dir, node=self.node, now=now, transport=self.transport)

    def signature(self) -> tuple:
        if self.ca_dir:
            return files_signature(self.ca_dir, ROOT_CA_FILES)
        return files_signature(self.node_ca_dir)


class IdentityRotator:
    """Keeps the node's SVIDs fresh and its CA current. See the module docstring."""

    def __init__(self, source: CaSource, *, ttl_seconds: int, min_ttl_seconds: int = MIN_TTL_SECONDS,
                 key_dir: str | Path | None = None, metrics: Any = None, policy: RenewalPolicy = RenewalPolicy(),
                 clock: Callable[[], datetime] = utcnow, poll_seconds: float = DEFAULT_POLL_SECONDS) -> None:
        self._source = source
        self._metrics = metrics
        self._policy = policy
        self._clock = clock
        self._poll = poll_seconds
        self._signature = source.signature()
        self.signing = source.load(now=clock())
        self._failed_signature: tuple | None = None
        self._failures: Mapping[SpiffeId, Failure] = {}
        self._renewals: dict[SpiffeId, int] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup: asyncio.Event | None = None
        # identities without a first SVID that failed: (failures in a row, retry at, last error)
        self._pending_failures: dict[SpiffeId, tuple[int, datetime, str]] = {}
        self._awaiting: set[SpiffeId] = set()  # identities with a tcpmesh_identity_awaiting_first_svid series
        self._worker: ThreadPoolExecutor | None = None  # run()'s thread: the steps and switch_source, one at a time
        self.store = IdentityStore(self.signing.signer, self.signing.bundle_pem, ttl_seconds, key_dir=key_dir,
                                   clock=clock, min_ttl_seconds=min_ttl_seconds, listener=self,
                                   defer_first_issue=getattr(source, "defer_first_issue", False),
                                   sign_off_loop=getattr(source, "sign_off_loop", False))
        self._ca_loaded(self.signing, "loaded")

    # -- the task ------------------------------------------------------------------------------
    async def run(self) -> None:
        """Run until cancelled. Each step's unexpected error is logged and the loop goes on."""
        loop = asyncio.get_running_loop()
        self._loop, self._wakeup = loop, asyncio.Event()
        worker = self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tcpmesh-identity")
        next_poll = loop.time() + self._poll
        try:
            while True:
                self._wakeup.clear()
                wake_at = None
                try:
                    source_at = self._source_attempt_at()
                    if loop.time() >= next_poll or (source_at is not None and self._clock() >= source_at):
                        next_poll = loop.time() + self._poll
                        await loop.run_in_executor(worker, self.check_ca)
                    wake_at = await loop.run_in_executor(worker, self.renew_due)
                except Exception:  # a task root: a bug in one step must not end rotation
                    log.exception("certificate rotation step failed; trying again")
                delay = next_poll - loop.time()
                for at in (wake_at, self._source_attempt_at()):
                    if at is not None:
                        delay = min(delay, (at - self._clock()).total_seconds())
                try:
                    await asyncio.wait_for(self._wakeup.wait(), max(delay, MIN_SLEEP_SECONDS))
                except asyncio.TimeoutError:
                    pass
        finally:
            self._loop = self._worker = None
            worker.shutdown(wait=False, cancel_futures=True)
            abort = getattr(self._source, "abort", None)   # issuer mode: the issuer call in flight ends now
            if abort is not None:
                abort()
            # A step already running (a renewal writing the node credential, say) finishes before run() returns:
            # "stopped" means no identity file is written any more. Waited for off the loop; a second cancel
            # (the stop's own deadline) stops the wait, not the step.
            await loop.run_in_executor(None, worker.shutdown, True)

    def _source_attempt_at(self) -> datetime | None:
        """Issuer mode, not joined yet: when the source retries the join (sooner than the next poll)."""
        attempt_at = getattr(self._source, "attempt_at", None)
        return attempt_at() if attempt_at is not None else None

    def wake(self) -> None:
        """Recompute the schedule now (thread-safe): a new identity may be due before the current sleep ends."""
        loop, event = self._loop, self._wakeup
        if loop is not None and event is not None:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # the loop is closing
                pass

    # -- the steps -----------------------------------------------------------------------------
    def check_ca(self) -> bool:
        """Reload the signing CA if its files changed; True if the store now uses a new CA or bundle.

        Issuer mode: first lets the source renew the node credential when due (``maintain``)."""
        maintain = getattr(self._source, "maintain", None)
        if maintain is not None and maintain(self._clock()):
            self._pending_failures = {}  # just joined the issuer: first SVIDs now, not after their backoff
        signature = self._source.signature()
        if signature == self._signature:
            return False
        try:
            signing = self._source.load(now=self._clock())
        except IdentityError as exc:
            if signature != self._failed_signature:  # once per version of the files, not on every poll
                log.warning("the CA files in %s changed but cannot be used: %s; keeping %s and retrying when "
                            "they change again", self._source.directory, exc, self._describe(self.signing))
            self._failed_signature = signature
            return False
        if (signing.certificate.fingerprint, signing.bundle_fingerprints) == (
                self.signing.certificate.fingerprint, self.signing.bundle_fingerprints):
            self._signature = signature
            return False  # rewritten with the same content
        try:
            self.store.replace_ca(signing.signer, signing.bundle_pem)
        except IdentityError as exc:
            # not recorded as seen: the next poll tries again (issuer mode: the issuer may be back by then)
            if signature != self._failed_signature:
                log.error("cannot re-issue this node's SVIDs under the new CA in %s: %s; keeping %s and trying "
                          "again every %.0fs", self._source.directory, exc, self._describe(self.signing), self._poll)
            self._failed_signature = signature
            return False
        self._signature = signature
        self.signing = signing
        self._ca_loaded(signing, "reloaded")
        return True

    async def switch_source(self, source: Any) -> SigningInfo:
        """Sign with ``source`` from now on (another ``identity.mode``), on the identity thread between steps.

        ``IdentityError`` (the new source cannot load — issuer mode: the join failed — or an identity
        cannot be issued from it): nothing changed, the current source, CA and SVIDs stay."""
        loop = asyncio.get_running_loop()
        if self._worker is None:  # run() not started (tests): no step can race
            return await asyncio.to_thread(self.switch_source_now, source)
        return await loop.run_in_executor(self._worker, self.switch_source_now, source)

    def switch_source_now(self, source: Any) -> SigningInfo:
        """``switch_source`` on the calling thread (must not run beside ``check_ca``/``renew_due``)."""
        now = self._clock()
        signing = source.load(now=now)   # issuer mode: joins with the bootstrap token / node credential
        if not getattr(source, "joined", True):   # issuer mode: no issuer answered the join (a start would wait)
            raise IdentityError(f"no issuer answered this node's join ({source.report(now).get('last_error')}); "
                                "nothing changed: start the issuer (or check identity.issuer.addresses) and reload again")
        self.store.replace_ca(signing.signer, signing.bundle_pem,
                              defer_first_issue=getattr(source, "defer_first_issue", False),
                              sign_off_loop=getattr(source, "sign_off_loop", False))
        # from here the store signs with the new source only; the old one (its node intermediate) is out of use
        previous = self.signing
        self._source, self._signature, self.signing = source, source.signature(), signing
        self._failed_signature = None
        self._failures, self._pending_failures = {}, {}
        self._ca_loaded(signing, "switched to")
        log.warning("identity source switched at runtime from %s to %s: %d SVIDs re-issued; open connections keep "
                    "their certificates, new ones use the new SVIDs", self._describe(previous),
                    self._describe(signing), len(self.store.svids()))
        return signing

    def issue_pending(self) -> datetime | None:
        """Issuer mode: first SVIDs for identities that wait for one (backoff per identity); when to retry."""
        now = self._clock()
        pending = self.store.pending()
        failures = {k: v for k, v in self._pending_failures.items() if k in pending}
        if any(failures.get(i, (0, now, ""))[1] <= now for i in pending):
            for spiffe_id, result in self.store.issue_pending().items():
                if isinstance(result, Svid):
                    failures.pop(spiffe_id, None)
                    continue
                count = failures.get(spiffe_id, (0, now, ""))[0] + 1
                wait = min(self._policy.retry_initial * (2 ** (count - 1)), self._policy.retry_max)
                wait = wait * (0.8 + 0.4 * random.random())  # jittered: nodes do not retry in step
                failures[spiffe_id] = (count, now + wait, str(result))
                if self._metrics is not None:
                    self._metrics.certificate_renewal_failures.labels(workload=spiffe_id.uri).inc()
                log.warning("cannot get the first SVID of %s (%d in a row): %s; its workloads' connections are "
                            "refused until it arrives; retrying in %.1fs", spiffe_id.uri, count, result,
                            wait.total_seconds())
        self._pending_failures = failures  # replaced, never mutated: report() reads it from another thread
        retry = [at for i, (_, at, _) in failures.items() if i in self.store.pending()]
        return min(retry) if retry else None

    def _count_awaiting(self, pending: Iterable[SpiffeId]) -> None:
        """tcpmesh_identity_awaiting_first_svid: one series per identity still without its first SVID."""
        pending = set(pending)
        if self._metrics is not None:
            for spiffe_id in pending - self._awaiting:
                self._metrics.awaiting_first_svid.labels(workload=spiffe_id.uri).set(1)
            for spiffe_id in self._awaiting - pending:
                try:
                    self._metrics.awaiting_first_svid.remove(spiffe_id.uri)
                except KeyError:
                    pass
        self._awaiting = pending

    def awaiting(self) -> list[dict[str, Any]]:
        """Identities without a first SVID: each with its failures in a row, last error and next retry."""
        now = self._clock()
        failures = self._pending_failures
        out = []
        for spiffe_id in sorted(self.store.pending()):
            count, retry_at, error = failures.get(spiffe_id, (0, None, ""))
            out.append({"spiffe_id": spiffe_id.uri, "failures": count, "last_error": error or None,
                        "retry_at": retry_at.isoformat() if retry_at else None,
                        "seconds_to_retry": round(max((retry_at - now).total_seconds(), 0.0), 3) if retry_at else None})
        return out

    def renew_due(self) -> datetime | None:
        """Renew what is due now; return when to look again (None: no identities)."""
        pending_retry = self.issue_pending() if self.store.pending() else None
        self._count_awaiting(self.store.pending())
        wake_at = self._renew_due()
        if pending_retry is not None:
            return pending_retry if wake_at is None else min(wake_at, pending_retry)
        return wake_at

    def _renew_due(self) -> datetime | None:
        now = self._clock()
        svids = self.store.svids()
        failures = {k: f for k, f in self._failures.items() if k in svids and f.serial == svids[k].serial}
        decision = decide(svids, failures, now, self._policy)
        if decision.due:
            results = self.store.renew(decision.due)
            now = self._clock()
            for spiffe_id, result in results.items():
                if isinstance(result, Svid):
                    failures.pop(spiffe_id, None)
                    continue
                failure = after_failure(svids[spiffe_id], failures.get(spiffe_id), now, str(result), self._policy)
                failures[spiffe_id] = failure
                self._renewal_failed(svids[spiffe_id], failure, now)
            decision = decide(self.store.svids(), failures, now, self._policy)
        self._failures = failures  # replaced, never mutated: report() reads it from another thread
        return decision.wake_at

    # -- StoreListener -------------------------------------------------------------------------
    def svid_issued(self, svid: Svid, reason: str) -> None:
        uri = svid.spiffe_id.uri
        if self._metrics is not None:
            self._metrics.certificate_expiry.labels(workload=uri).set(svid.not_after.timestamp())
            if reason != ISSUED_FIRST:
                self._metrics.certificate_renewals.labels(workload=uri).inc()
        if reason != ISSUED_FIRST:
            self._renewals[svid.spiffe_id] = self._renewals.get(svid.spiffe_id, 0) + 1
        log.info("issued SVID for %s (%s): serial %x, valid until %s, chain to root %s", uri,
                 "new CA" if reason == ISSUED_CA_CHANGE else reason, svid.serial, svid.not_after.isoformat(),
                 self._root_label())
        if reason == ISSUED_FIRST:
            self.wake()

    def identity_removed(self, spiffe_id: SpiffeId) -> None:
        self._renewals.pop(spiffe_id, None)
        if self._metrics is not None:
            for metric in (self._metrics.certificate_expiry, self._metrics.certificate_renewals,
                           self._metrics.certificate_renewal_failures):
                try:
                    metric.remove(spiffe_id.uri)
                except KeyError:
                    pass
        log.info("dropped the SVID of %s: no workload on this node holds it any more", spiffe_id.uri)

    # -- reporting -----------------------------------------------------------------------------
    def report(self, workloads: Mapping[SpiffeId, Iterable[str]] | None = None) -> dict[str, Any]:
        """The ``/debug/certs`` document (public material only)."""
        now = self._clock()
        report = certs_report(self.signing, self.store.svids(), self._failures, dict(self._renewals),
                              now, self._policy, workloads)
        source_report = getattr(self._source, "report", None)
        if source_report is not None:  # issuer mode: reachability, last renewal, node credential time left
            report["issuer"] = {**source_report(now), "pending": sorted(i.uri for i in self.store.pending()),
                                "awaiting": self.awaiting()}
        return report

    # -- helpers -------------------------------------------------------------------------------
    def _renewal_failed(self, svid: Svid, failure: Failure, now: datetime) -> None:
        if self._metrics is not None:
            self._metrics.certificate_renewal_failures.labels(workload=svid.spiffe_id.uri).inc()
        wait = (failure.retry_at - now).total_seconds()
        if now >= svid.not_after:
            log.error("renewing the SVID of %s failed (%d in a row): %s; it EXPIRED at %s, so peers reject this "
                      "identity until a renewal succeeds; retrying in %.1fs", svid.spiffe_id.uri, failure.count,
                      failure.error, svid.not_after.isoformat(), wait)
        else:
            log.warning("renewing the SVID of %s failed (%d in a row): %s; still serving serial %x, valid until %s "
                        "(%.0fs left); retrying in %.1fs", svid.spiffe_id.uri, failure.count, failure.error, svid.serial,
                        svid.not_after.isoformat(), (svid.not_after - now).total_seconds(), wait)

    def _ca_loaded(self, signing: SigningInfo, verb: str) -> None:
        if self._metrics is not None:
            self._metrics.node_ca_expiry.set(signing.not_after.timestamp())
        log_fn = log.warning if signing.is_root else log.info
        log_fn("%s %s from %s; trust bundle: %s", verb, self._describe(signing), signing.source,
               ", ".join(f"{r.subject} ({short_fingerprint(r.fingerprint)})" for r in signing.bundle))

    def _root_label(self) -> str:
        root = self.signing.root
        return short_fingerprint(root.fingerprint) if root is not None else "none"

    @staticmethod
    def _describe(signing: SigningInfo) -> str:
        cert = signing.certificate
        return f"{signing.kind} {cert.subject} (serial {cert.serial:x}, valid until {cert.not_after.isoformat()})"


def ca_source(config: Any) -> CaSource:
    """The source of ``identity.mode: node_ca`` (or ``identity.ca_dir``) from an ``agent.config.Config``."""
    identity = config.identity
    log.info("identity.mode node_ca (legacy): this node signs its SVIDs with a node intermediate that can sign "
             "any identity of the trust domain; move to identity.mode: issuer (docs/identity.md)")
    return CaSource(node_ca_dir=identity.node_ca_dir, ca_dir=identity.ca_dir, node=config.node.name, sign_off_loop=True)


def rotator_from_config(config: Any, metrics: Any = None) -> IdentityRotator:
    """Build the rotator (and its store) from an ``agent.config.Config``."""
    identity = config.identity
    if identity.svid_ttl_seconds < MIN_TTL_SECONDS:
        log.warning("identity.dev_short_ttl is on: SVIDs live %ds and renew about every %.0fs — for tests and "
                    "development only", identity.svid_ttl_seconds, identity.svid_ttl_seconds / 2)
    return IdentityRotator(
        ca_source(config),
        ttl_seconds=identity.svid_ttl_seconds,
        min_ttl_seconds=DEV_MIN_TTL_SECONDS if identity.dev_short_ttl else MIN_TTL_SECONDS,
        key_dir=config.state_dir, metrics=metrics, poll_seconds=identity.poll_seconds)
