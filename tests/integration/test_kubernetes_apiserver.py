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
  (ADDED, MODIFIED, DELETED, BOOKMARK, ERROR); events queued while no watch is open are delivered to
  the next one, as a real server replays everything after N;
- scripted faults: an ERROR event with code 410 (Expired), an HTTP 410 or 5xx answer to the next
  request, a stream cut in the middle of a chunk, a normal end of the stream;
- going away and coming back (``go_away`` / ``come_back``): every open connection is cut and the port
  refuses connections until it listens again, with the same objects.

The objects come from test_kubernetes_objects.json: Pod, Node, Service and EndpointSlice objects
(discovery.k8s.io/v1) in the shape the API server returns them (written after the API reference;
this machine has no cluster to record from).
No test lives here; pytest collects this file only for its name.
"""

from __future__ import annotations

import copy
import json
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

OBJECTS_FILE = Path(__file__).with_name("test_kubernetes_objects.json")
KINDS = {"pods": "PodList", "nodes": "NodeList", "services": "ServiceList", "endpointslices": "EndpointSliceList"}
PATHS = {"/api/v1/pods": "pods", "/api/v1/nodes": "nodes", "/api/v1/services": "services",
         "/apis/discovery.k8s.io/v1/endpointslices": "endpointslices"}
API_VERSIONS = {"endpointslices": "discovery.k8s.io/v1"}   # the rest are core ("v1")


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
        self.pending: dict[str, list[tuple]] = {k: [] for k in KINDS}   # actions for the (next) watch stream
        self.fail_next: dict[str, list[int]] = {k: [] for k in KINDS}   # HTTP statuses for the next requests
        self.watching: dict[str, int] = {k: 0 for k in KINDS}           # open watch streams
        self.requests: list[tuple[str, dict[str, str]]] = []            # (kind, query) of every request
        self.connections: set = set()                                   # open client connections
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
                self.pending[kind].append(("event", event, copy.deepcopy(obj)))
            self.cond.notify_all()
            return obj

    def delete(self, kind: str, key: str, silent: bool = False) -> None:
        with self.cond:
            obj = self.store[kind].pop(key)
            self.rv += 1
            obj["metadata"]["resourceVersion"] = str(self.rv)
            if not silent:
                self.pending[kind].append(("event", "DELETED", obj))
            self.cond.notify_all()

    def get(self, kind: str, key: str) -> dict:
        with self.cond:
            return copy.deepcopy(self.store[kind][key])

    def script(self, kind: str, *actions: str) -> None:
        """Queue stream actions: "gone" (ERROR 410 event), "drop" (cut mid-chunk), "end", "bookmark"."""
        with self.cond:
            self.pending[kind].extend((action,) for action in actions)
            self.cond.notify_all()

    def fail(self, kind: str, *statuses: int) -> None:
        """Answer the next requests for ``kind`` with these HTTP statuses (410, 500, 503, …)."""
        with self.cond:
            self.fail_next[kind].extend(statuses)

    def watch_requests(self, kind: str) -> list[dict[str, str]]:
        with self.cond:
            return [q for k, q in self.requests if k == kind and q.get("watch") == "true"]

    def list_requests(self, kind: str) -> list[dict[str, str]]:
        with self.cond:
            return [q for k, q in self.requests if k == kind and q.get("watch") != "true"]


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

        def do_GET(self) -> None:  # noqa: N802 — http.server's name
            url = urllib.parse.urlsplit(self.path)
            kind = PATHS.get(url.path)
            if kind is None:
                return self._status(404, "NotFound", f"the server could not find {url.path}")
            query = dict(urllib.parse.parse_qsl(url.query))
            with server.cond:
                server.requests.append((kind, query))
                failure = server.fail_next[kind].pop(0) if server.fail_next[kind] else None
            if failure == 410:
                return self._status(410, "Expired", f"too old resource version: {query.get('resourceVersion')}")
            if failure is not None:
                return self._status(failure, "InternalError", "scripted failure")
            if query.get("watch") == "true":
                return self._watch(kind)
            return self._list(kind, query)

        def _list(self, kind: str, query: dict[str, str]) -> None:
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
                             "items": page})

        def _watch(self, kind: str) -> None:
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
                    with server.cond:
                        while not server.pending[kind] and not server._stopping:
                            server.cond.wait(0.5)
                        if server._stopping:
                            action = ("end",)
                        else:
                            action = server.pending[kind].pop(0)
                        rv = server.rv
                    if action[0] == "event":
                        self._chunk({"type": action[1], "object": action[2]})
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

        def _json(self, code: int, doc: dict) -> None:
            body = json.dumps(doc).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler
