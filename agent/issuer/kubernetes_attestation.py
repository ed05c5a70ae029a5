"""Kubernetes node attestation: a projected service-account token proves which node an agent runs on.

The DaemonSet's agent pod carries a token the kubelet projects into it (``serviceAccountToken``
volume, audience ``tcpmesh-issuer``, 10 minutes, refreshed by the kubelet), bound to that pod. The
agent sends it in its ``node`` request; the issuer (any replica: nothing here is stored) decides:

1. **TokenReview** (``POST /apis/authentication.k8s.io/v1/tokenreviews``, ``spec.audiences`` =
   our audience): the API server checks signature, expiry, audience and that the bound pod still
   exists with the same uid. The token is opaque here — never decoded, so nothing in it is trusted
   unless the API server vouches for it. Refused: not ``authenticated`` (``bad_sa_token``, with the
   API's error), or ``status.audiences`` without ours (an authenticator that ignored the audience:
   ``wrong_audience``).
2. **Who**: ``user.username`` must be ``system:serviceaccount:<namespace>:<service_account>`` of the
   agent (``wrong_service_account``): a token of any other pod of the cluster proves nothing.
3. **Which pod**: ``user.extra`` ``authentication.kubernetes.io/pod-name`` / ``pod-uid`` (only a
   pod-bound token has them; a legacy Secret token does not: ``bad_sa_token``).
4. **Where**: ``GET`` that pod; gone or another uid (a pod recreated with the same name) →
   ``pod_gone``; finished, another service account or not scheduled → ``pod_gone`` too; else
   ``spec.nodeName`` is the node — cross-checked with the review's ``node-name`` extra when the
   API server sends one (1.30+). The caller compares it with the node asked for (``wrong_node``).

An API server that cannot be asked is ``attestation_unavailable`` (the agent retries; its current
credential stays valid meanwhile); a 403 names the issuer's ServiceAccount (as the API server saw
it) and the ClusterRole rule it lacks (``FORBIDDEN_FIX``). A slow one: the two calls together must
finish within ``timeout_seconds`` (a deadline, not only a per-read timeout: an API server or proxy
that dribbles its answer never lets a read time out), else ``attestation_timeout``; at most
``max_in_flight`` attestations wait for the API at once, the next is refused ``busy`` at once —
so a slow API server holds at most that many of the issuer's request workers, each for at most the
deadline, and requests that need no API (``sign``) keep being answered. ``bound_pod`` and
``attested_node`` are pure (tests feed them JSON); ``KubernetesAttestor`` does the two calls
through the official client, raw JSON, on its own threads; ``close`` (the issuer's stop) ends them within
``close``'s bound: it shuts down the sockets of the API calls in progress (a dribbled read never times out
by itself), so no attestation thread outlives the stop. Imports no asyncio and no registry;
``kubernetes`` only inside ``KubernetesAttestor`` (the pure part loads without it). The issuer
calls it from its request threads.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any, Mapping

log = logging.getLogger("tcpmesh.issuer")
DEFAULT_AUDIENCE = "tcpmesh-issuer"
POD_NAME = "authentication.kubernetes.io/pod-name"
POD_UID = "authentication.kubernetes.io/pod-uid"
NODE_NAME = "authentication.kubernetes.io/node-name"
FINISHED_PHASES = ("Succeeded", "Failed")
ISSUER_SERVICE_ACCOUNT = "tcpmesh-system/tcpmesh-issuer"   # deploy/kubernetes/04-issuer.yaml
ISSUER_MANIFEST = "deploy/kubernetes/04-issuer.yaml"
# The ClusterRole tcpmesh-issuer rule each of the issuer's API calls needs (what a 403 tells the operator to add)
TOKENREVIEW_RULE = '{apiGroups: ["authentication.k8s.io"], resources: ["tokenreviews"], verbs: ["create"]}'
POD_GET_RULE = '{apiGroups: [""], resources: ["pods"], verbs: ["get", "list", "watch"]}'
WATCH_RULE = '{apiGroups: [""], resources: ["pods", "nodes"], verbs: ["list", "watch"]} (pods also "get")'


def forbidden_fix(api_message: str, rule: str) -> str:
    """What a 403 at the issuer means and the fix: the ServiceAccount the API server saw, the rule to add. Pure."""
    seen = re.search(r'User "([^"]+)"', api_message or "")
    who = f"the issuer's ServiceAccount ({seen.group(1)})" if seen else \
        f"the issuer's ServiceAccount ({ISSUER_SERVICE_ACCOUNT} in {ISSUER_MANIFEST})"
    return (f"{who} is not allowed this call: add the rule {rule} to the ClusterRole tcpmesh-issuer bound to it "
            f"({ISSUER_MANIFEST}); the agent's RBAC (01-rbac.yaml) plays no part here")


class AttestationRefused(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class AttestationPolicy:
    audience: str = DEFAULT_AUDIENCE
    namespace: str = "tcpmesh-system"        # the agent DaemonSet's namespace
    service_account: str = "tcpmesh-agent"   # and its service account

    @property
    def username(self) -> str:
        return f"system:serviceaccount:{self.namespace}:{self.service_account}"


@dataclass(frozen=True)
class BoundPod:
    namespace: str
    name: str
    uid: str
    node_hint: str = ""   # the review's node-name extra (API servers 1.30+), "" without

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class Attested:
    node: str
    pod: BoundPod


def token_review(token: str, policy: AttestationPolicy) -> dict[str, Any]:
    return {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
            "spec": {"token": token, "audiences": [policy.audience]}}


def _one(extra: Mapping[str, Any], key: str) -> str:
    values = extra.get(key) or []
    return values[0] if isinstance(values, list) and len(values) == 1 and isinstance(values[0], str) else ""


def bound_pod(review: Mapping[str, Any], policy: AttestationPolicy) -> BoundPod:
    """The pod a reviewed token is bound to, if the review vouches for the agent's service account. Pure."""
    status = review.get("status") or {}
    if status.get("authenticated") is not True:
        raise AttestationRefused("bad_sa_token", "the Kubernetes API did not authenticate the service-account "
                                 f"token: {status.get('error') or 'no reason given'}")
    if policy.audience not in (status.get("audiences") or []):
        raise AttestationRefused("wrong_audience", f"the token is not for audience {policy.audience!r} (the review "
                                 f"says {status.get('audiences') or 'none'}); the DaemonSet's projected token needs "
                                 f"audience: {policy.audience}")
    user = status.get("user") or {}
    if user.get("username") != policy.username:
        raise AttestationRefused("wrong_service_account", f"the token is {user.get('username')!r}'s; only the agent's "
                                 f"service account {policy.username} may attest a node (attestation.kubernetes."
                                 "namespace / service_account)")
    extra = user.get("extra") or {}
    name, uid = _one(extra, POD_NAME), _one(extra, POD_UID)
    if not name or not uid:
        raise AttestationRefused("bad_sa_token", "the token is not bound to a pod (no pod-name/pod-uid in the "
                                 "review): mount a projected serviceAccountToken volume, not a Secret token")
    return BoundPod(policy.namespace, name, uid, _one(extra, NODE_NAME))


def attested_node(pod: Mapping[str, Any], bound: BoundPod, policy: AttestationPolicy) -> str:
    """The node the bound pod runs on, read from the pod the API returned. Pure."""
    meta, spec, status = pod.get("metadata") or {}, pod.get("spec") or {}, pod.get("status") or {}
    if meta.get("uid") != bound.uid:
        raise AttestationRefused("pod_gone", f"pod {bound.key} is not the pod the token was made for (uid "
                                 f"{meta.get('uid')}, token {bound.uid}): it was deleted and recreated")
    if (spec.get("serviceAccountName") or "default") != policy.service_account:
        raise AttestationRefused("wrong_service_account", f"pod {bound.key} runs as "
                                 f"{spec.get('serviceAccountName') or 'default'!r}, not {policy.service_account!r}")
    if status.get("phase") in FINISHED_PHASES:
        raise AttestationRefused("pod_gone", f"pod {bound.key} has finished (phase {status['phase']})")
    node = spec.get("nodeName") or ""
    if not node:
        raise AttestationRefused("pod_gone", f"pod {bound.key} is not scheduled to a node")
    if bound.node_hint and bound.node_hint != node:
        raise AttestationRefused("wrong_node", f"the token was made on node {bound.node_hint!r}, pod {bound.key} "
                                 f"is on {node!r}")
    return node


class KubernetesAttestor:
    """TokenReview + pod GET through the official client (``api_client``: ``make_api_client``)."""

    def __init__(self, api_client: Any, policy: AttestationPolicy, *, timeout_seconds: float = 5.0,
                 exclusive: bool = True, max_in_flight: int = 4) -> None:
        from kubernetes import client

        self.policy = policy
        self.exclusive = exclusive   # the service refuses node SVID renewals by node credential
        self.timeout = timeout_seconds
        self.max_in_flight = max_in_flight
        self._auth = client.AuthenticationV1Api(api_client)
        self._core = client.CoreV1Api(api_client)
        # a slot is held until the API calls really end (not at the deadline): never more threads than slots
        self._slots = threading.BoundedSemaphore(max_in_flight)
        self._pool = ThreadPoolExecutor(max_in_flight, thread_name_prefix="issuer-attest")
        self._threads: set[threading.Thread] = set()   # the pool's threads, as they run (joined at close)
        self._connections: weakref.WeakSet[Any] = weakref.WeakSet()   # to the API: shut down at close
        _track_connections(api_client, self._connections)

    def attest(self, token: str) -> Attested:
        """The attested node, within ``timeout_seconds``; ``AttestationRefused`` otherwise (``busy`` at once
        when ``max_in_flight`` attestations are already waiting for the API)."""
        if not self._slots.acquire(blocking=False):
            raise AttestationRefused("busy", f"{self.max_in_flight} node attestations are waiting for the Kubernetes "
                                     "API already (limits.attestations); the agent retries")
        try:
            future = self._pool.submit(self._attest_now, token)
        except RuntimeError:   # the pool is shut down: the issuer stops
            self._slots.release()
            raise AttestationRefused("attestation_unavailable", "the issuer is stopping") from None
        future.add_done_callback(lambda _: self._slots.release())
        try:
            return future.result(timeout=self.timeout)
        except FutureTimeout:
            raise AttestationRefused("attestation_timeout", f"the Kubernetes API did not finish the TokenReview and "
                                     f"the pod read within {self.timeout:g} s (attestation.kubernetes."
                                     "timeout_seconds); is the API server overloaded? The agent retries") from None

    def close(self, timeout_seconds: float | None = None) -> list[str]:
        """Stop: refuse new attestations, cut the API calls in progress (their sockets are shut down, so a read
        that would never time out returns now) and join the threads — within ``timeout_seconds`` (default: the
        attestation deadline plus one second, which also bounds a connect in progress). Returns the names of
        threads still running after it (logged as an error; none unless a call ignores a shut-down socket)."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        deadline = time.monotonic() + (self.timeout + 1 if timeout_seconds is None else timeout_seconds)
        while True:
            for connection in list(self._connections):
                sock = getattr(connection, "sock", None)
                if sock is not None:
                    try:
                        sock.shutdown(socket.SHUT_RDWR)
                    except (OSError, ValueError):   # closed already, or never connected
                        pass
            alive = [t for t in list(self._threads) if t.is_alive()]
            if not alive or time.monotonic() >= deadline:
                break
            alive[0].join(min(0.05, max(0.0, deadline - time.monotonic())))
        if alive:
            log.error("issuer: %d attestation thread(s) still running at stop: %s", len(alive),
                      ", ".join(t.name for t in alive))
        return [t.name for t in alive]

    def _attest_now(self, token: str) -> Attested:
        self._threads.add(threading.current_thread())
        review = self._call("TokenReview", self._auth.create_token_review, token_review(token, self.policy),
                            rule=TOKENREVIEW_RULE)
        bound = bound_pod(review, self.policy)
        pod = self._call(f"pod {bound.key}", self._core.read_namespaced_pod, bound.name, bound.namespace,
                         not_found="pod_gone", rule=POD_GET_RULE)
        return Attested(attested_node(pod, bound, self.policy), bound)

    def _call(self, what: str, method: Any, *args: Any, not_found: str = "", rule: str = "") -> dict[str, Any]:
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            response = method(*args, _preload_content=False, _request_timeout=(self.timeout, self.timeout))
            try:
                return json.loads(response.data)
            finally:
                response.release_conn()
        except ApiException as exc:
            if exc.status == 404 and not_found:
                raise AttestationRefused(not_found, f"{what} no longer exists") from None
            hint = f": {forbidden_fix(_api_message(exc), rule)}" if exc.status == 403 else ""
            raise AttestationRefused("attestation_unavailable", f"the Kubernetes API refused the issuer's {what} "
                                     f"request: HTTP {exc.status} {exc.reason}{hint}") from None
        except (HTTPError, OSError, ValueError) as exc:   # refused, timed out, reset; a body that is not JSON
            raise AttestationRefused("attestation_unavailable", f"the Kubernetes API did not answer the {what} "
                                     f"request: {type(exc).__name__}: {exc}") from None


def _track_connections(api_client: Any, into: "weakref.WeakSet[Any]") -> None:
    """Make every connection ``api_client`` opens to the API server add itself to ``into`` once connected (so a
    stop can shut its socket down). The official client's urllib3 PoolManager creates its pools lazily, from
    ``pool_classes_by_scheme``: those get a connection class that reports itself."""
    from urllib3 import HTTPConnectionPool, HTTPSConnectionPool
    from urllib3.connection import HTTPConnection, HTTPSConnection

    def tracked(base: type) -> type:
        class Tracked(base):  # type: ignore[misc, valid-type]
            def connect(self) -> None:
                into.add(self)
                super().connect()
        return Tracked

    manager = api_client.rest_client.pool_manager
    manager.pool_classes_by_scheme = {
        "http": type("TrackedHTTPConnectionPool", (HTTPConnectionPool,), {"ConnectionCls": tracked(HTTPConnection)}),
        "https": type("TrackedHTTPSConnectionPool", (HTTPSConnectionPool,),
                      {"ConnectionCls": tracked(HTTPSConnection)})}


def _api_message(exc: Any) -> str:
    """The ``message`` of the Status the API server answered with (it names the user it saw), or ""."""
    try:
        return str(json.loads(exc.body).get("message") or "")
    except (TypeError, ValueError, AttributeError):
        return ""
