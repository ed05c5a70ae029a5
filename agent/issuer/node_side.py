"""The agent's side of the issuer (``identity.mode: issuer``): node credential, CSRs, signed SVIDs.

``NodeCredential`` keeps this node's credential in ``identity.issuer.credential_dir``
(``credential.crt``, ``credential.key`` 0600, ``bundle.pem``): at start it reads and checks it (in a
minting worker); with none (or an expired one) it joins — a fresh key and CSR, the one-time bootstrap
token of ``bootstrap_token_file``, ``node`` at the issuer — and writes what it got; from then on it
renews the node SVID with itself once half its lifetime has passed (``maintain``, every poll of the
rotator). A failed renewal keeps the current credential while it is valid. No issuer answering at join
(``IssuerUnreachable``) is transient: the agent starts not joined and ``maintain`` retries the join with
jittered backoff (1 s doubling to 10 s); a refusal is permanent (``IssuerState.join_refused``). On Kubernetes
(``service_account_token_file``: the pod's projected token) every node SVID — join and renewal — is
asked for with the token as the kubelet last wrote it, and the issuer attests the node from it.
A credential the issuer no longer takes (``removed_root``: signed under a root `ca rotate remove-old` removed;
``untrusted_node_credential``) — or, at start, one that chains to no root of the credential directory's bundle — is
no good any more: an error line says so (``NODE CREDENTIAL REFUSED``), ``tcpmesh status`` shows it, and the agent
joins again (token or attestation) with backoff until it can; no restart.

``IssuerSigner`` is the ``store.Signer`` of issuer mode: one minting worker makes a key and a CSR per
identity (keys never leave the node), one ``sign`` request carries the CSRs, the answers become
``Svid``s. A refusal is that identity's ``SvidError`` (reason and the issuer's words); an unreachable
issuer fails the batch (``IssuerUnreachable``) and the rotator keeps the current SVIDs and backs off.

``IssuerSource`` is what the rotator loads at start and polls (the trust bundle file); it reports the
facts ``tcpmesh status`` needs (issuer reachable, last contact, last renewal, credential time left).

Stdlib only: must not import cryptography (the agent does not; the worker does the X.509 work).
"""

from __future__ import annotations

import logging
import random
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Iterable, Mapping

from agent.identity.errors import CaError, IdentityError, SvidError
from agent.identity.files import (BUNDLE_FILE, CREDENTIAL_CERT_FILE, CREDENTIAL_KEY_FILE, files_signature,
                                  write_file_atomic)
from agent.identity.minting_client import CertInfo, SigningInfo, Transport, call, spawn_minter
from agent.identity.spiffe import SpiffeId
from agent.identity.svid import MIN_TTL_SECONDS, Svid
from agent.issuer.client import Credential, IssuerClient, IssuerUnavailable

log = logging.getLogger("tcpmesh.identity")

RETRY_INITIAL_SECONDS = 1.0   # a failed node credential renewal is retried after 1 s, doubling up to 60 s
RETRY_MAX_SECONDS = 60.0
JOIN_RETRY_MAX_SECONDS = 10.0  # an unreachable issuer at join: 1 s doubling up to 10 s (joined within seconds of it)


def backoff(failures: int, cap: float) -> float:
    """Seconds until the next attempt after ``failures`` in a row: 1 s doubling up to ``cap``, ±20 % jitter
    (nodes started together do not retry in step)."""
    return min(RETRY_INITIAL_SECONDS * 2 ** (failures - 1), cap) * (0.8 + 0.4 * random.random())


class IssuerUnreachable(IdentityError):
    """No issuer address answered; current SVIDs stay in service until they expire."""


class CredentialRefused(CaError):
    """The issuer no longer takes this node's credential (its root was removed, or its signer is no longer trusted):
    only a new join helps, which ``NodeCredential.maintain`` tries with backoff."""


# The issuer's refusals that mean "this node's credential is no good any more": the node must join again.
REJOIN_REASONS = frozenset({"removed_root", "untrusted_node_credential"})


@dataclass(frozen=True)
class IssuerSettings:
    addresses: tuple[str, ...]
    credential_dir: str
    ca_bundle: str = ""            # empty: <credential_dir>/bundle.pem
    bootstrap_token_file: str = ""
    timeout_seconds: float = 10.0
    service_account_token_file: str = ""

    @property
    def bundle_path(self) -> Path:
        return Path(self.ca_bundle) if self.ca_bundle else Path(self.credential_dir) / BUNDLE_FILE


class IssuerState:
    """What the agent knows about the issuer, for /debug/certs and `tcpmesh status` (thread-safe reads)."""

    def __init__(self, addresses: Iterable[str]) -> None:
        self.addresses = tuple(addresses)
        self.reachable: bool | None = None      # None: not asked yet
        self.last_contact: datetime | None = None
        self.last_address: str | None = None
        self.last_error: str | None = None
        self.last_renewal: datetime | None = None
        self.credential_not_after: datetime | None = None
        self.credential_uri: str | None = None
        self.join_failures = 0                  # an unreachable issuer at join: attempts failed in a row
        self.join_retry_at: datetime | None = None  # set while this node waits to join
        self.join_refused: str | None = None    # a permanent join error met while retrying: the agent exits
        self.credential_refused: dict[str, Any] | None = None   # the issuer refused the credential: must re-join

    def contacted(self, now: datetime, address: str | None) -> None:
        self.reachable, self.last_contact, self.last_address, self.last_error = True, now, address, None

    def failed(self, error: str) -> None:
        self.reachable, self.last_error = False, error

    def report(self, now: datetime) -> dict[str, Any]:
        left = (self.credential_not_after - now).total_seconds() if self.credential_not_after else None
        return {"addresses": list(self.addresses), "reachable": self.reachable,
                "last_contact": self.last_contact.isoformat() if self.last_contact else None,
                "last_address": self.last_address, "last_error": self.last_error,
                "last_renewal": self.last_renewal.isoformat() if self.last_renewal else None,
                "joined": self.credential_uri is not None,
                "credential_refused": self.credential_refused,
                "join": None if self.join_retry_at is None else {
                    "failures": self.join_failures, "retry_at": self.join_retry_at.isoformat(),
                    "seconds_to_retry": round(max((self.join_retry_at - now).total_seconds(), 0.0), 3)},
                "node_credential": {"spiffe_id": self.credential_uri,
                                    "not_after": self.credential_not_after.isoformat()
                                    if self.credential_not_after else None,
                                    "seconds_to_expiry": round(left, 3) if left is not None else None}}


class NodeCredential:
    def __init__(self, settings: IssuerSettings, node: str, client: IssuerClient, state: IssuerState,
                 transport: Transport = spawn_minter, metrics: Any = None) -> None:
        self.settings, self.node, self.client, self.state = settings, node, client, state
        self._transport = transport
        self._metrics = metrics
        self._lock = threading.Lock()
        self._credential: Credential | None = None
        self._not_before: datetime | None = None
        self._not_after: datetime | None = None
        self._failures = 0
        self._retry_at: datetime | None = None
        self.info: CertInfo | None = None
        self.root_fingerprint: str | None = None   # the bundle root the credential chains to (from the worker)

    def load(self, now: datetime) -> dict[str, Any]:
        """Read and check the credential directory; join if there is no usable credential. The worker's doc."""
        doc = self._read(now)
        why = ("none" if not doc["present"] else "expired" if doc["expired"] else
               _outside_bundle(doc, self.settings.credential_dir))
        if why:
            if doc["present"] and not doc["expired"]:
                log.error("this node's credential (%s/credential.crt) %s; joining the issuer again",
                          self.settings.credential_dir, why)
            try:
                self._join(now, why)
            except IdentityError as exc:
                if doc["present"] and not doc["expired"]:
                    raise CaError(f"this node's credential {why}, and joining again failed: {exc}") from None
                raise
            doc = self._read(now)
        self._adopt(doc)
        return doc

    def _read(self, now: datetime) -> dict[str, Any]:
        return call(self._transport, {"op": "credential", "credential_dir": self.settings.credential_dir,
                                      "node": self.node, "now": now.isoformat()})

    def current(self) -> Credential:
        if self._credential is None and self.state.join_retry_at is not None:
            raise IssuerUnreachable(f"this node has not joined the issuer yet ({self.state.last_error}); "
                                    f"next attempt at {self.state.join_retry_at.isoformat()}")
        if self._credential is None:
            raise CaError(f"this node has no node credential in {self.settings.credential_dir}")
        return self._credential

    @property
    def joined(self) -> bool:
        return self._credential is not None

    def retry_join(self, now: datetime) -> bool:
        """Not joined yet because no issuer answered: join now if the backoff allows; True once joined.

        ``IssuerUnreachable`` is transient (logged, retried with jittered backoff); any other error (the
        issuer refused the token, the token file is gone) is permanent: recorded in ``state.join_refused``
        (never retried), and the agent's start ends with it (``Agent._first_svids_gate``)."""
        if self.state.join_refused or (self.state.join_retry_at is not None and now < self.state.join_retry_at):
            return False
        try:
            self.load(now)
        except IssuerUnreachable as exc:
            self.unreachable_at_join(now, exc)
            return False
        except IdentityError as exc:   # the issuer answered and refused: retrying would hide the fault
            self.state.join_refused, self.state.join_retry_at = str(exc), None
            log.error("joining the issuer as node %s was refused: %s", self.node, exc)
            return False
        log.info("joined the issuer after %d failed attempt(s): this node's SVIDs are asked for now",
                 self.state.join_failures)
        self.state.join_failures, self.state.join_retry_at = 0, None
        return True

    def unreachable_at_join(self, now: datetime, exc: IssuerUnreachable) -> None:
        self.state.join_failures += 1
        wait = backoff(self.state.join_failures, JOIN_RETRY_MAX_SECONDS)
        self.state.join_retry_at = now + timedelta(seconds=wait)
        if self._metrics is not None:
            self._metrics.issuer_join_failures.inc()
        log.warning("NOT READY: cannot join the issuer as node %s (attempt %d, tried %s): %s; this node has no "
                    "credential, so no SVID and no meshed connection yet (capture stays attached, pods' "
                    "connects are refused); retrying in %.1fs", self.node, self.state.join_failures,
                    ", ".join(self.state.addresses), exc, wait)

    def maintain(self, now: datetime) -> bool:
        """Renew the node SVID once half its lifetime has passed (kept on failure while valid); not joined
        yet (the issuer was unreachable at start): retry the join. True when this call joined."""
        if self._credential is None:
            return self.retry_join(now)
        if self.state.credential_refused is not None:
            return self._rejoin(now)
        if self._not_after is None or self._not_before is None:
            return False
        half = self._not_before + (self._not_after - self._not_before) / 2
        if now < half or (self._retry_at is not None and now < self._retry_at):
            return False
        with self._lock:
            try:
                self._request_node_svid(now, token=None, sa_token=self._service_account_token())
                self._failures, self._retry_at = 0, None
            except CredentialRefused:
                return False   # logged; the next poll joins again
            except IdentityError as exc:
                self._failures += 1
                self._retry_at = now + timedelta(seconds=backoff(self._failures, RETRY_MAX_SECONDS))
                left = (self._not_after - now).total_seconds()
                if left <= 0 and self.settings.service_account_token_file:
                    log.error("this node's credential EXPIRED at %s and could not be renewed by attestation (%s): "
                              "the issuer signs nothing for this node until it can; retrying with the token in %s",
                              self._not_after.isoformat(), exc, self.settings.service_account_token_file)
                elif left <= 0:
                    log.error("this node's credential EXPIRED at %s and could not be renewed (%s): the issuer will "
                              "not sign for this node until it joins again — put a new one-time token "
                              "(`tcpmesh issuer token %s`) in identity.issuer.bootstrap_token_file and restart the "
                              "agent", self._not_after.isoformat(), exc, self.node)
                else:
                    log.warning("renewing this node's credential at the issuer failed: %s; still valid for %.0fs "
                                "(until %s); retrying", exc, left, self._not_after.isoformat())
        return False

    def refused(self, error: Mapping[str, Any], now: datetime) -> CredentialRefused:
        """The issuer answered ``error`` (a reason of ``REJOIN_REASONS``) to a request made with this node's
        credential: record it (``tcpmesh status``), say so and what happens, and return the error to raise."""
        reason, message = error.get("reason"), error.get("message")
        first = self.state.credential_refused is None
        since = now.isoformat() if first else self.state.credential_refused["since"]
        self.state.credential_refused = {"reason": reason, "message": message, "since": since}
        if first:   # join again at the next poll, whatever backoff a failed renewal left
            self._failures, self._retry_at = 0, None
            log.error("NODE CREDENTIAL REFUSED: the issuer no longer takes this node's credential (%s): %s. The agent "
                      "joins again now and then with backoff — %s; meanwhile its SVIDs are not renewed",
                      reason, message, self._rejoin_how())
        return CredentialRefused(f"the issuer refused this node's credential ({reason}): {message}")

    def _rejoin_how(self) -> str:
        if self.settings.service_account_token_file:
            return f"by Kubernetes attestation with the token in {self.settings.service_account_token_file}"
        if self.settings.bootstrap_token_file:
            return (f"with the one-time token in {self.settings.bootstrap_token_file}: put a new one there "
                    f"(`tcpmesh issuer token {self.node}`) if that one is spent; no restart needed")
        return (f"but identity.issuer.bootstrap_token_file is not set: set it to a new one-time token "
                f"(`tcpmesh issuer token {self.node}`), or write a credential from the current root (`tcpmesh ca "
                f"issue-node-credential {self.node} --ca <current root> --out {self.settings.credential_dir}`)")

    def _rejoin(self, now: datetime) -> bool:
        """The issuer refused the credential: join again (token or attestation), backing off; True once joined."""
        if self._retry_at is not None and now < self._retry_at:
            return False
        with self._lock:
            try:
                self._join(now, "refused by the issuer")
                self._adopt(self._read(now))
            except IdentityError as exc:
                self._failures += 1
                wait = backoff(self._failures, RETRY_MAX_SECONDS)
                self._retry_at = now + timedelta(seconds=wait)
                log.error("NODE CREDENTIAL REFUSED (%s): joining the issuer again failed (attempt %d): %s; retrying "
                          "in %.1fs %s", (self.state.credential_refused or {}).get("reason"), self._failures, exc,
                          wait, self._rejoin_how())
                return False
        self._failures, self._retry_at = 0, None
        self.state.credential_refused = None
        log.info("joined the issuer again as node %s: a new node credential (root %s); this node's SVIDs are "
                 "issued anew under it", self.node, self.root_fingerprint)
        return True

    def _service_account_token(self) -> str | None:
        path = self.settings.service_account_token_file
        if not path:
            return None
        try:
            token = Path(path).read_text().strip()
        except OSError as exc:
            raise CaError(f"identity.issuer.service_account_token_file {path}: cannot read it ({exc.strerror}); the "
                          "DaemonSet mounts the pod's projected token there (deploy/kubernetes/03-daemonset.yaml)") from None
        if not token:
            raise CaError(f"identity.issuer.service_account_token_file {path} is empty")
        return token

    def _join(self, now: datetime, why: str) -> None:
        sa_token = self._service_account_token()
        if sa_token is not None:
            self._request_node_svid(now, token=None, sa_token=sa_token)
            log.info("joined the issuer as node %s by Kubernetes attestation (%s)", self.node,
                     self.settings.service_account_token_file)
            return
        path = self.settings.bootstrap_token_file
        fix = ("create a one-time token with `tcpmesh issuer token <node>` into identity.issuer.bootstrap_token_file, "
               f"or a credential with `tcpmesh ca issue-node-credential {self.node} --ca <root> --out "
               f"{self.settings.credential_dir}`")
        if not path:
            raise CaError(f"no usable node credential in {self.settings.credential_dir} ({why}); {fix}")
        try:
            token = Path(path).read_text().strip()
        except OSError as exc:
            raise CaError(f"identity.issuer.bootstrap_token_file {path}: cannot read it ({exc.strerror}); {fix}") from None
        self._request_node_svid(now, token=token)
        log.info("joined the issuer as node %s with the bootstrap token in %s", self.node, path)

    def _request_node_svid(self, now: datetime, token: str | None, sa_token: str | None = None) -> None:
        key = call(self._transport, {"op": "keys", "count": 1, "now": now.isoformat()})["keys"][0]
        request = {"v": 1, "op": "node", "node": self.node, "csr": key["csr_pem"]}
        if token is not None:
            request["token"] = token
        if sa_token is not None:
            request["service_account_token"] = sa_token
        proof_only = token is not None or sa_token is not None   # no client certificate needed (none at a join)
        answer = ask(self.client, self.state, request, None if proof_only else self.current(), now)
        if not answer.get("ok"):
            error = answer.get("error") or {}
            if not proof_only and error.get("reason") in REJOIN_REASONS:
                raise self.refused(error, now)
            raise CaError(f"the issuer refused this node's credential ({error.get('reason')}): {error.get('message')}")
        svid = answer["svid"]
        chain = svid["cert_pem"] + "".join(svid["chain_pem"])
        directory = Path(self.settings.credential_dir)
        write_file_atomic(directory / CREDENTIAL_KEY_FILE, key["key_pem"].encode("ascii"), 0o600)
        write_file_atomic(directory / CREDENTIAL_CERT_FILE, chain.encode("ascii"), 0o644)
        if not self.settings.ca_bundle and answer.get("bundle_pem"):
            write_file_atomic(directory / BUNDLE_FILE, answer["bundle_pem"].encode("ascii"), 0o644)
        self._credential = Credential(chain, key["key_pem"])
        self._not_before = datetime.fromisoformat(svid["not_before"])
        self._not_after = datetime.fromisoformat(svid["not_after"])
        self.state.credential_not_after, self.state.credential_uri = self._not_after, svid["spiffe_id"]
        if self._metrics is not None:
            self._metrics.node_credential_expiry.set(self._not_after.timestamp())
        log.info("node credential %s: serial %x, valid until %s", svid["spiffe_id"], svid["serial"], svid["not_after"])

    def renew_under(self, root_fingerprint: str, now: datetime) -> None:
        """Renew the node credential now because the bundle puts another root first (``ca rotate reissue``), then
        re-read it; on failure the current one stays (logged). Its SVIDs are re-issued by the rotator next."""
        with self._lock:
            try:
                self._request_node_svid(now, token=None, sa_token=self._service_account_token())
                self._adopt(self._read(now))
            except CredentialRefused:
                return   # logged; the next poll joins again
            except IdentityError as exc:
                log.warning("the trust bundle now puts root %s first, but renewing this node's credential under it "
                            "failed: %s; keeping the current one (root %s) and trying again at the next change",
                            root_fingerprint, exc, self.root_fingerprint)
                return
        if self.root_fingerprint != root_fingerprint:
            log.warning("renewed this node's credential, but the issuer still signs under root %s, not %s (the bundle's "
                        "first): has every issuer replica loaded its new intermediate?", self.root_fingerprint,
                        root_fingerprint)

    def _adopt(self, doc: Mapping[str, Any]) -> None:
        self._credential = Credential(doc["cert_pem"], doc["key_pem"])
        self.root_fingerprint = doc.get("root_fingerprint")
        self.info = CertInfo.from_wire(doc["info"])
        self._not_before, self._not_after = self.info.not_before, self.info.not_after
        self.state.credential_not_after, self.state.credential_uri = self._not_after, doc["uri"]
        if self._metrics is not None:
            self._metrics.node_credential_expiry.set(self._not_after.timestamp())


def ask(client: IssuerClient, state: IssuerState, request: dict, credential: Credential | None,
        now: datetime) -> dict[str, Any]:
    try:
        answer = client.call(request, credential)
    except IssuerUnavailable as exc:
        state.failed(str(exc))
        raise IssuerUnreachable(f"{exc}; current SVIDs stay in service until they expire") from None
    state.contacted(now, client.last_address)
    return answer


class IssuerSigner:
    """``store.Signer`` through the issuer (see the module docstring)."""

    def __init__(self, trust_domain: str, credential: NodeCredential, transport: Transport = spawn_minter) -> None:
        self.trust_domain = trust_domain
        self._credential = credential
        self._transport = transport

    def issue_svids(self, spiffe_ids: Iterable[SpiffeId], ttl_seconds: int, *, now: datetime,
                    min_ttl_seconds: int = MIN_TTL_SECONDS) -> dict[SpiffeId, Svid | IdentityError]:
        ids = list(spiffe_ids)
        credential = self._credential.current()   # not joined yet: fails before a worker makes keys
        keys = call(self._transport, {"op": "keys", "count": len(ids), "now": now.isoformat()})["keys"]
        request = {"v": 1, "op": "sign", "ttl_seconds": ttl_seconds,
                   "csrs": [{"spiffe_id": i.uri, "csr": k["csr_pem"]} for i, k in zip(ids, keys)]}
        state = self._credential.state
        answer = ask(self._credential.client, state, request, credential, now)
        if not answer.get("ok"):
            error = answer.get("error") or {}
            if error.get("reason") in REJOIN_REASONS:
                raise self._credential.refused(error, now)
            raise SvidError(f"the issuer refused ({error.get('reason')}): {error.get('message')}")
        key_of = {i.uri: k["key_pem"] for i, k in zip(ids, keys)}
        results: dict[SpiffeId, Svid | IdentityError] = {}
        for doc in answer.get("svids", ()):
            svid = Svid.from_wire({**doc, "key_pem": key_of[doc["spiffe_id"]]})
            results[svid.spiffe_id] = svid
        for uri, why in (answer.get("refused") or {}).items():
            results[SpiffeId.parse(uri)] = SvidError(f"the issuer refused {uri} ({why.get('reason')}): "
                                                     f"{why.get('message')}")
        if any(isinstance(r, Svid) for r in results.values()):
            state.last_renewal = now
        return results

    def __repr__(self) -> str:
        return f"IssuerSigner({', '.join(f'{h}:{p}' for h, p in self._credential.client.addresses)})"


class IssuerSource:
    """The rotator's source in issuer mode: the trust bundle (polled) and the node credential."""

    defer_first_issue = True  # a new identity waits (connects refused) until the rotator's thread gets its SVID

    def __init__(self, settings: IssuerSettings, node: str, trust_domain: str, *, transport: Transport = spawn_minter,
                 metrics: Any = None) -> None:
        self.settings = settings
        self.node = node
        self.trust_domain = trust_domain
        self.transport = transport
        self.state = IssuerState(settings.addresses)
        self._metrics = metrics
        self.credential: NodeCredential | None = None

    @property
    def directory(self) -> str:
        return self.settings.credential_dir

    def signature(self) -> tuple:
        return files_signature(self.settings.bundle_path.parent, (self.settings.bundle_path.name,))

    def load(self, now: datetime) -> SigningInfo:
        bundle_pem = _read_bundle(self.settings.bundle_path)
        client = IssuerClient(self.settings.addresses, bundle_pem, self.trust_domain,
                              timeout=self.settings.timeout_seconds)
        credential = NodeCredential(self.settings, self.node, client, self.state, self.transport, self._metrics)
        roots = call(self.transport, {"op": "describe_chain", "pems": _pem_blocks(bundle_pem),
                                      "now": now.isoformat()})["certificates"]
        bundle = tuple(CertInfo.from_wire(r) for r in roots)
        if self.credential is not None and self.credential._credential is not None:  # a bundle change: keep it
            old = self.credential
            credential._credential, credential.info = old._credential, old.info
            credential._not_before, credential._not_after = old._not_before, old._not_after
            credential.root_fingerprint = old.root_fingerprint
            if bundle and credential.root_fingerprint != bundle[0].fingerprint:   # `ca rotate reissue`: the new root first
                credential.renew_under(bundle[0].fingerprint, now)
        elif self.credential is not None and self.credential.state.join_retry_at is not None:
            pass   # still waiting to join (a bundle change meanwhile): maintain keeps retrying
        else:
            try:
                credential.load(now)
            except IssuerUnreachable as exc:   # transient: start not ready and keep trying (docs/identity.md)
                credential.unreachable_at_join(now, exc)
        self.credential = credential
        info = credential.info or bundle[0]
        # the root of the issuer's intermediate as the node credential shows it: SVIDs come from the same issuer
        root = next((r for r in bundle if r.fingerprint == credential.root_fingerprint), bundle[0] if bundle else None)
        return SigningInfo(trust_domain=self.trust_domain, kind="issuer (this node holds a node credential only)",
                           is_root=False, node=self.node, source=self.settings.credential_dir, certificate=info,
                           root=root, bundle=bundle, bundle_pem=bundle_pem, chain=(),
                           signer=IssuerSigner(self.trust_domain, credential, self.transport))  # type: ignore[arg-type]

    def maintain(self, now: datetime) -> bool:
        """The rotator's poll: renew (or, not joined yet, join) the node credential; True when it joined now."""
        joined = self.credential.maintain(now) if self.credential is not None else False
        if self._metrics is not None and self.state.reachable is not None:
            self._metrics.issuer_up.set(1 if self.state.reachable else 0)
        return joined

    @property
    def joined(self) -> bool:
        return self.credential is not None and self.credential.joined

    def abort(self) -> None:
        """At the agent's stop: end the issuer call in flight now, make no other (``IssuerClient.abort``)."""
        if self.credential is not None:
            self.credential.client.abort()

    def attempt_at(self) -> datetime | None:
        """Not joined yet: when the next join attempt is due (the rotator polls then); None once joined."""
        return None if self.joined else self.state.join_retry_at

    def report(self, now: datetime) -> dict[str, Any]:
        return self.state.report(now)


def _outside_bundle(doc: Mapping[str, Any], credential_dir: str) -> str:
    """Why a present, unexpired credential cannot be used — it chains to no root of the credential directory's own
    bundle (`ca rotate remove-old` rewrote it, and this node's credential was still under the old root) — or ""."""
    if not doc.get("bundle") or doc.get("root_fingerprint") is not None:
        return ""
    return (f"was signed under a root that is no longer in {credential_dir}/bundle.pem (removed by `tcpmesh ca "
            "rotate remove-old`: this node missed the rotation), so the issuer refuses it")


def _read_bundle(path: Path) -> str:
    try:
        text = path.read_text()
    except OSError as exc:
        raise CaError(f"the trust bundle {path} cannot be read ({exc.strerror}); put the root's ca.crt there "
                      "(identity.issuer.ca_bundle, or bundle.pem in identity.issuer.credential_dir)") from None
    if "BEGIN CERTIFICATE" not in text:
        raise CaError(f"the trust bundle {path} holds no PEM certificate; put the root's ca.crt there")
    return text


def _pem_blocks(text: str) -> list[str]:
    end = "-----END CERTIFICATE-----"
    return [block.strip() + "\n" + end + "\n" for block in text.split(end) if "BEGIN CERTIFICATE" in block]


def issuer_source(config: Any, metrics: Any = None) -> IssuerSource:
    """The rotator's source of ``identity.mode: issuer`` from an ``agent.config.Config`` (not loaded yet)."""
    identity = config.identity
    settings = IssuerSettings(tuple(identity.issuer.addresses), identity.issuer.credential_dir,
                              identity.issuer.ca_bundle, identity.issuer.bootstrap_token_file,
                              identity.issuer.timeout_seconds, identity.issuer.service_account_token_file)
    log.info("identity.mode issuer: SVIDs come from %s; this node holds a node credential only (%s)",
             ", ".join(settings.addresses), settings.credential_dir)
    return IssuerSource(settings, config.node.name, config.trust_domain, metrics=metrics)


def issuer_rotator(config: Any, metrics: Any = None) -> Any:
    """The identity rotator of ``identity.mode: issuer`` (the composition root calls this instead of
    ``svid_rotator.rotator_from_config``)."""
    from agent.identity.svid import DEV_MIN_TTL_SECONDS
    from agent.identity.svid_rotator import IdentityRotator

    identity = config.identity
    source = issuer_source(config, metrics)
    return IdentityRotator(source, ttl_seconds=identity.svid_ttl_seconds,  # type: ignore[arg-type]
                           min_ttl_seconds=DEV_MIN_TTL_SECONDS if identity.dev_short_ttl else MIN_TTL_SECONDS,
                           key_dir=config.state_dir, metrics=metrics, poll_seconds=identity.poll_seconds)
