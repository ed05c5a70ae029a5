"""A small local HTTP server that speaks the Kubernetes list/watch protocol for pods, nodes, Services
and EndpointSlices.

This is the one stand-in of the test suite: no API server can run on these machines (no etcd, no
kube-apiserver package, no container engine), so the Kubernetes registry source is tested against
this instead, through the official `kubernetes` client and its real HTTP stack. It implements what
the source relies on and nothing more:

- ``GET /api/v1/pods``, ``/api/v1/nodes``, ``/api/v1/services`` and
  ``/apis/discovery.k8s.io/v1/endpointslices``: a list (``limit`` / ``continue`` paging) with the
  current ``metadata.resourceVersion``, ``kind`` ``<Kind>List`` and the group's ``apiVersion``;
- the same with ``watch=true&resourceVersion=N``: a chunked stream of ``{"type", "object"}`` lines
  (ADDED, MODIFIED, DELETED, BOOKMARK, ERROR). Every open stream gets every event, and a stream
  opened from N first replays the events after N, as a real server does from its history: several
  clients may watch one kind (two issuer replicas); scripted actions go to one stream, the first to
  reach them, in the order they were queued among the events;
- scripted faults: an ERROR event with code 410 (Expired), an HTTP 410 or 5xx answer to the next
  request, a stream cut in the middle of a chunk, a normal end of the stream, a list answered one byte at a
  time (``dribble``);
- going away and coming back (``go_away`` / ``come_back``): every open connection is cut and the port
  refuses connections until it listens again, with the same objects;
- node attestation (the issuer's side): ``GET /api/v1/namespaces/<ns>/pods/<name>`` (one pod, or a
  404 ``Status``), and ``POST /apis/authentication.k8s.io/v1/tokenreviews`` answering a TokenReview as
  the API server's service-account authenticator does for a bound, projected token — signature,
  expiry, ``spec.audiences`` against the token's audiences (none given: the API server's own), the
  bound pod still there with the same uid (else "Token has been invalidated"), then ``authenticated``
  with ``user`` (``system:serviceaccount:<ns>:<sa>``, groups, ``extra`` pod-name/pod-uid/node-name/
  node-uid/credential-id) and the matching ``audiences``. ``issue_token`` is the kubelet's
  TokenRequest for a pod's projected volume; its tokens are JWT-shaped but signed with a key only
  this server holds, so a client can trust one only by asking.

The objects come from test_kubernetes_objects.json: Pod, Node, Service and EndpointSlice objects
(discovery.k8s.io/v1) in the shape the API server returns them (written after the API reference;
this machine has no cluster to record from).
No test lives here; pytest collects this file only for its name.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import json
import re
import secrets
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

OBJECTS_FILE = Path(__file__).with_name("test_kubernetes_objects.json")
KINDS = {"pods": "PodList", "nodes": "NodeList", "services": "ServiceList", "endpointslices": "EndpointSliceList"}
PATHS = {"/api/v1/pods": "pods", "/api/v1/nodes": "nodes", "/api/v1/services": "services",
         "/apis/discovery.k8s.io/v1/endpointslices": "endpointslices"}
API_VERSIONS = {"endpointslices": "discovery.k8s.io/v1"}   # the rest are core ("v1")
TOKEN_REVIEWS = "/apis/authentication.k8s.io/v1/tokenreviews"
ONE_POD = re.compile(r"^/api/v1/namespaces/([a-z0-9-]+)/pods/([a-z0-9.-]+)$")
API_AUDIENCE = "https://kubernetes.default.svc.cluster.local"   # the API server's own (--api-audiences)


def recorded_objects() -> dict[str, list[dict]]:
    return json.loads(OBJECTS_FILE.read_text())


def object_key(kind: str, obj: dict) -> str:
    return obj["metadata"]["name"] if kind == "nodes" else obj["metadata"]["uid"]


class FakeApiServer:
    def __init__(self, objects: dict[str, list[dict]] | None = None) -> None:
        objects = objects if objects is not None else recorded_objects()
        self.cond = threading.Condition()
        self.rv = 3000
        self.store: dict[str, dict[str, dict]] = {k: {} for k in KINDS}
        for kind in KINDS:
            for obj in objects.get(kind, []):
                self.store[kind][object_key(kind, obj)] = copy.deepcopy(obj)
        self.history: dict[str, list[tuple]] = {k: [] for k in KINDS}   # (rv, type, object) of every event
        self.scripted: dict[str, list[tuple]] = {k: [] for k in KINDS}  # (rv when queued, action): for one stream
        self.fail_next: dict[str, list[int]] = {k: [] for k in (*KINDS, "tokenreviews")}  # statuses for the next requests
        self.watching: dict[str, int] = {k: 0 for k in KINDS}           # open watch streams
        self.requests: list[tuple[str, dict[str, str]]] = []            # (kind, query) of every request
        self.connections: set = set()                                   # open client connections
        self.token_reviews: list[dict] = []                             # TokenReview bodies received
        self.dribble_next: dict[str, list[float]] = {k: [] for k in (*KINDS, "tokenreviews")}  # seconds per answer
        self._token_key = secrets.token_bytes(32)                       # the service-account signing key
        self._stopping = False
        self._listen(0)

    def _listen(self, port: int) -> None:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), _handler(self))
        self.httpd.daemon_threads = True
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="fake-apiserver", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def start(self) -> "FakeApiServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        with self.cond:
            self._stopping = True
            self.cond.notify_all()
        self.httpd.shutdown()
        self.httpd.server_close()

    def go_away(self) -> None:
        """The API server is gone: open watches and kept-alive connections are cut, connects refused."""
        self.stop()
        with self.cond:
            for conn in list(self.connections):
                try:
                    conn.shutdown(2)
                except OSError:
                    pass

    def come_back(self) -> None:
        """Listen again on the same port, with the objects as they are now."""
        port = self.httpd.server_address[1]
        with self.cond:
            self._stopping = False
        self._listen(port)
        self.start()

    def kubeconfig(self, path: Path) -> Path:
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "agent", "user": {"token": "not-checked"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "agent"}}]}))
        return path

    # -- changing the cluster --------------------------------------------------------------------
    def put(self, kind: str, obj: dict, silent: bool = False) -> dict:
        """Add or replace an object (ADDED / MODIFIED). ``silent``: no event (only a re-list sees it)."""
        with self.cond:
            obj = copy.deepcopy(obj)
            self.rv += 1
            obj["metadata"]["resourceVersion"] = str(self.rv)
            key = object_key(kind, obj)
            event = "MODIFIED" if key in self.store[kind] else "ADDED"
            self.store[kind][key] = obj
            if not silent:
                self.history[kind].append((self.rv, event, copy.deepcopy(obj)))
            self.cond.notify_all()
            return obj

    def delete(self, kind: str, key: str, silent: bool = False) -> None:
        with self.cond:
            obj = self.store[kind].pop(key)
            self.rv += 1
            obj["metadata"]["resourceVersion"] = str(self.rv)
            if not silent:
                self.history[kind].append((self.rv, "DELETED", obj))
            self.cond.notify_all()

    def get(self, kind: str, key: str) -> dict:
        with self.cond:
            return copy.deepcopy(self.store[kind][key])

    def issue_token(self, namespace: str, pod_name: str, audience: str, expiration_seconds: int = 600,
                    now: float | None = None) -> str:
        """What the kubelet writes into a pod's projected serviceAccountToken volume (a TokenRequest
        bound to the pod): a token for the pod's service account, for ``audience``, expiring."""
        with self.cond:
            pod = next(p for p in self.store["pods"].values()
                       if p["metadata"]["namespace"] == namespace and p["metadata"]["name"] == pod_name)
            node = self.store["nodes"].get(pod["spec"].get("nodeName") or "")
        now = time.time() if now is None else now
        sa = pod["spec"].get("serviceAccountName") or "default"
        claims = {"aud": [audience], "exp": int(now) + expiration_seconds, "iat": int(now), "nbf": int(now),
                  "iss": API_AUDIENCE, "jti": secrets.token_hex(16), "sub": f"system:serviceaccount:{namespace}:{sa}",
                  "kubernetes.io": {"namespace": namespace,
                                    "pod": {"name": pod_name, "uid": pod["metadata"]["uid"]},
                                    "serviceaccount": {"name": sa, "uid": f"sa-{namespace}-{sa}"},
                                    **({"node": {"name": node["metadata"]["name"], "uid": node["metadata"]["uid"]}}
                                       if node else {})}}
        return self.sign_claims(claims)

    def sign_claims(self, claims: dict, key: bytes | None = None) -> str:
        """A JWT-shaped token of ``claims`` (signed with this server's key, or ``key``: a forgery)."""
        def b64(data: bytes) -> str:
            return base64.urlsafe_b64encode(data).rstrip(b"=").decode()
        body = b64(json.dumps({"alg": "HS256", "kid": "stand-in"}).encode()) + "." + b64(json.dumps(claims).encode())
        return body + "." + b64(hmac.new(key or self._token_key, body.encode(), hashlib.sha256).digest())

    def review(self, spec: dict) -> dict:
        """The status of a TokenReview of ``spec``, as the service-account authenticator decides it."""
        token = spec.get("token") or ""
        wanted = list(spec.get("audiences") or [API_AUDIENCE])
        parts = token.split(".")
        if len(parts) != 3:
            return _unauthenticated("invalid bearer token, token lookup failed")
        body = parts[0] + "." + parts[1]
        mac = base64.urlsafe_b64encode(hmac.new(self._token_key, body.encode(), hashlib.sha256).digest()).rstrip(b"=")
        if not hmac.compare_digest(mac, parts[2].encode()):
            return _unauthenticated("invalid bearer token, square/go-jose: error in cryptographic primitive")
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
        if claims["exp"] <= time.time():
            return _unauthenticated("invalid bearer token, service account token has expired")
        audiences = [a for a in wanted if a in claims["aud"]]
        if not audiences:
            return _unauthenticated(f"invalid bearer token, token audiences {json.dumps(claims['aud'])} is invalid "
                                    f"for the target audiences {json.dumps(wanted)}")
        bound = claims["kubernetes.io"]
        with self.cond:
            pod = self.store["pods"].get(bound["pod"]["uid"])
        if pod is None or pod["metadata"]["name"] != bound["pod"]["name"]:
            return _unauthenticated("invalid bearer token, Token has been invalidated")
        extra = {"authentication.kubernetes.io/credential-id": [f"JTI={claims['jti']}"],
                 "authentication.kubernetes.io/pod-name": [bound["pod"]["name"]],
                 "authentication.kubernetes.io/pod-uid": [bound["pod"]["uid"]]}
        if "node" in bound:
            extra["authentication.kubernetes.io/node-name"] = [bound["node"]["name"]]
            extra["authentication.kubernetes.io/node-uid"] = [bound["node"]["uid"]]
        namespace = bound["namespace"]
        return {"authenticated": True,
                "user": {"username": claims["sub"], "uid": bound["serviceaccount"]["uid"],
                         "groups": ["system:serviceaccounts", f"system:serviceaccounts:{namespace}",
                                    "system:authenticated"],
                         "extra": extra},
                "audiences": audiences}

    def script(self, kind: str, *actions: str) -> None:
        """Queue stream actions: "gone" (ERROR 410 event), "drop" (cut mid-chunk), "end", "bookmark"."""
        with self.cond:
            self.scripted[kind].extend((self.rv, action) for action in actions)
            self.cond.notify_all()

    def fail(self, kind: str, *statuses: int) -> None:
        """Answer the next requests for ``kind`` with these HTTP statuses (410, 500, 503, …)."""
        with self.cond:
            self.fail_next[kind].extend(statuses)

    def dribble(self, kind: str, *seconds: float) -> None:
        """Answer the next requests for ``kind`` (tokenreviews, or a list) one byte at a time over these many seconds:
        an API server (or a proxy before it) that is slow without ever letting one read time out."""
        with self.cond:
            self.dribble_next[kind].extend(seconds)

    def watch_requests(self, kind: str) -> list[dict[str, str]]:
        with self.cond:
            return [q for k, q in self.requests if k == kind and q.get("watch") == "true"]

    def list_requests(self, kind: str) -> list[dict[str, str]]:
        with self.cond:
            return [q for k, q in self.requests if k == kind and q.get("watch") != "true"]


def _unauthenticated(error: str) -> dict:
    return {"user": {}, "error": f"[{error}]"}


def _handler(server: FakeApiServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet
            pass

        def setup(self) -> None:
            super().setup()
            with server.cond:
                server.connections.add(self.connection)

        def finish(self) -> None:
            with server.cond:
                server.connections.discard(self.connection)
            super().finish()

        def do_POST(self) -> None:  # noqa: N802 — http.server's name
            url = urllib.parse.urlsplit(self.path)
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if url.path != TOKEN_REVIEWS:
                return self._status(405, "MethodNotAllowed", f"the server does not allow this method on {url.path}")
            try:
                doc = json.loads(body)
                spec = doc["spec"]
                assert doc.get("kind") == "TokenReview" and doc.get("apiVersion") == "authentication.k8s.io/v1"
                assert isinstance(spec.get("token"), str) and spec["token"]
            except (ValueError, KeyError, TypeError, AssertionError):
                return self._status(400, "BadRequest", "TokenReview in version \"v1\" cannot be handled: "
                                    "spec.token: Required value")
            with server.cond:
                server.requests.append(("tokenreviews", {}))
                server.token_reviews.append(copy.deepcopy(doc))
                failure = server.fail_next["tokenreviews"].pop(0) if server.fail_next["tokenreviews"] else None
                slow = server.dribble_next["tokenreviews"].pop(0) if server.dribble_next["tokenreviews"] else 0.0
            if failure == 403:   # what a service account without create on tokenreviews meets
                return self._status(403, "Forbidden", 'tokenreviews.authentication.k8s.io is forbidden: User '
                                    '"system:serviceaccount:tcpmesh-system:tcpmesh-issuer" cannot create resource '
                                    '"tokenreviews" in API group "authentication.k8s.io" at the cluster scope')
            if failure is not None:
                return self._status(failure, "InternalError", "scripted failure")
            status = server.review(spec)
            self._json(201, {"kind": "TokenReview", "apiVersion": "authentication.k8s.io/v1",
                             "metadata": {"creationTimestamp": None}, "spec": spec, "status": status}, slow)

        def do_GET(self) -> None:  # noqa: N802 — http.server's name
            url = urllib.parse.urlsplit(self.path)
            one = ONE_POD.match(url.path)
            if one is not None:
                return self._one_pod(*one.groups())
            kind = PATHS.get(url.path)
            if kind is None:
                return self._status(404, "NotFound", f"the server could not find {url.path}")
            query = dict(urllib.parse.parse_qsl(url.query))
            with server.cond:
                server.requests.append((kind, query))
                failure = server.fail_next[kind].pop(0) if server.fail_next[kind] else None
                slow = server.dribble_next[kind].pop(0) if server.dribble_next[kind] and query.get("watch") != "true" \
                    else 0.0
            if failure == 410:
                return self._status(410, "Expired", f"too old resource version: {query.get('resourceVersion')}")
            if failure is not None:
                return self._status(failure, "InternalError", "scripted failure")
            if query.get("watch") == "true":
                return self._watch(kind, int(query.get("resourceVersion") or server.rv))
            return self._list(kind, query, slow)

        def _one_pod(self, namespace: str, name: str) -> None:
            with server.cond:
                server.requests.append(("pod", {"namespace": namespace, "name": name}))
                pod = next((copy.deepcopy(p) for p in server.store["pods"].values()
                            if p["metadata"]["namespace"] == namespace and p["metadata"]["name"] == name), None)
            if pod is None:
                return self._status(404, "NotFound", f'pods "{name}" not found')
            self._json(200, {"kind": "Pod", "apiVersion": "v1", **pod})

        def _list(self, kind: str, query: dict[str, str], dribble: float = 0.0) -> None:
            with server.cond:
                items = sorted(server.store[kind].values(), key=lambda o: object_key(kind, o))
                rv = str(server.rv)
            start = int(query.get("continue") or 0)
            limit = int(query.get("limit") or 0) or len(items)
            page = items[start:start + limit]
            metadata = {"resourceVersion": rv}
            if start + limit < len(items):
                metadata["continue"] = str(start + limit)
            self._json(200, {"kind": KINDS[kind], "apiVersion": API_VERSIONS.get(kind, "v1"), "metadata": metadata,
                             "items": page}, dribble)

        def _next(self, kind: str, cursor: int) -> tuple:
            """This stream's next action: an event after ``cursor``, or a scripted action queued before it."""
            with server.cond:
                while True:
                    if server._stopping:
                        return ("end", cursor)
                    event = next((e for e in server.history[kind] if e[0] > cursor), None)
                    script = server.scripted[kind][0] if server.scripted[kind] else None
                    if script is not None and (event is None or script[0] < event[0]):
                        server.scripted[kind].pop(0)
                        return (script[1], max(cursor, script[0]))
                    if event is not None:
                        return ("event", event[0], event[1], copy.deepcopy(event[2]))
                    server.cond.wait(0.5)

        def _watch(self, kind: str, cursor: int) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.close_connection = True
            with server.cond:
                server.watching[kind] += 1
                server.cond.notify_all()
            try:
                while True:
                    action = self._next(kind, cursor)
                    rv = action[1]
                    if action[0] == "event":
                        cursor = rv
                        self._chunk({"type": action[2], "object": action[3]})
                    elif action[0] == "bookmark":
                        self._chunk({"type": "BOOKMARK", "object": {"kind": KINDS[kind][:-len("List")],
                                                                    "apiVersion": API_VERSIONS.get(kind, "v1"),
                                                                    "metadata": {"resourceVersion": str(rv)}}})
                    elif action[0] == "gone":
                        self._chunk({"type": "ERROR", "object": {
                            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                            "message": f"too old resource version: 1 ({rv})", "reason": "Expired", "code": 410}})
                        self._end()
                        return
                    elif action[0] == "drop":
                        self.wfile.write(b"400\r\n{\"type\":\"MODIF")   # half a chunk, then the connection is gone
                        self.wfile.flush()
                        self.connection.shutdown(2)
                        return
                    else:  # "end": the server's timeoutSeconds ran out
                        self._end()
                        return
            except OSError:
                return
            finally:
                with server.cond:
                    server.watching[kind] -= 1
                    server.cond.notify_all()

        def _chunk(self, doc: dict) -> None:
            data = (json.dumps(doc) + "\n").encode()
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

        def _end(self) -> None:
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()

        def _status(self, code: int, reason: str, message: str) -> None:
            self._json(code, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                              "message": message, "reason": reason, "code": code})

        def _json(self, code: int, doc: dict, dribble: float = 0.0) -> None:
            body = json.dumps(doc).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not dribble:
                self.wfile.write(body)
                return
            self.wfile.flush()
            deadline = time.monotonic() + dribble
            for i in range(len(body)):   # one byte at a time, evenly over ``dribble`` seconds
                time.sleep(max(0.0, deadline - time.monotonic()) / (len(body) - i))
                if server._stopping:
                    return
                try:
                    self.wfile.write(body[i:i + 1])
                    self.wfile.flush()
                except OSError:
                    return

    return Handler
