"""List + watch one resource of the API server on a thread, the way client-go's reflector does.

List (in pages), then watch from the list's resourceVersion with bookmarks; a watch that ends is
re-opened from the last resourceVersion seen; ``410 Gone`` (as an HTTP status or an ERROR event)
means that version is compacted away, so the loop lists again and replaces its copy whole; any other
failure (refused, reset, a dropped stream, a 5xx) waits with a jittered exponential backoff
(``Backoff``) and resumes. Reads raw JSON, not models, through the official ``kubernetes`` client
(imported only inside the calls that need it). Knows nothing of pods, nodes or registries.

Stop: ``request_stop`` sets the flag and shuts down the socket of the response being read (a watch stream or
a list's body), which wakes the thread; nothing is opened after it. ``join`` waits until a deadline and says
whether the thread ended. A thread still waiting for an answer's headers cannot be woken (the client gives no
handle on that socket before them): it ends within that request's read timeout (``LIST_READ_TIMEOUT_SECONDS``
for a list) and, a daemon, with the process.
"""

from __future__ import annotations

import json
import logging
import random
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from agent.errors import TcpmeshError

log = logging.getLogger("tcpmesh.registry.kubernetes")
# what a 403 tells the operator to grant (the agent's role; the issuer passes its own)
AGENT_FORBIDDEN_HINT = ("RBAC: the service account needs get/list/watch on pods, nodes, services and discovery.k8s.io "
                        "endpointslices; deploy/kubernetes/01-rbac.yaml")

WATCH_TIMEOUT_SECONDS = 300          # server side; re-opened at once when it ends (client-go: 5-10 min)
CONNECT_TIMEOUT_SECONDS = 10.0
READ_SLACK_SECONDS = 30.0            # client read timeout = watch timeout + this (a silent, dead stream)
LIST_PAGE_SIZE = 500
BACKOFF_INITIAL_SECONDS = 0.5
BACKOFF_MAX_SECONDS = 30.0
BACKOFF_JITTER = 0.2
HTTP_GONE = 410
LIST_READ_TIMEOUT_SECONDS = CONNECT_TIMEOUT_SECONDS * 6


class Backoff:
    """Jittered exponential backoff: initial, ×2 per failure, capped; ``reset()`` after a success."""

    def __init__(self, initial: float = BACKOFF_INITIAL_SECONDS, maximum: float = BACKOFF_MAX_SECONDS,
                 jitter: float = BACKOFF_JITTER, rng: random.Random | None = None) -> None:
        self.initial, self.maximum, self.jitter = initial, maximum, jitter
        self.failures = 0
        self._rng = rng or random.Random()

    def next(self) -> float:
        base = min(self.maximum, self.initial * (2 ** self.failures))
        self.failures += 1
        return base * (1 + self._rng.uniform(-self.jitter, self.jitter))

    def reset(self) -> None:
        self.failures = 0


class Gone(Exception):
    """The resourceVersion we asked for is too old (HTTP 410 or an ERROR event with code 410)."""


@dataclass
class WatchStats:
    lists: int = 0            # complete lists (the first one and every re-list)
    relists_gone: int = 0     # re-lists because of 410 Gone
    watches: int = 0          # watch requests opened
    events: int = 0           # ADDED / MODIFIED / DELETED applied
    errors: int = 0           # failures followed by a backoff
    last_error: str = ""
    failing_since: float = 0.0  # wall-clock time of the first failure of the current streak; 0: answering
    backoff_delays: list[float] = field(default_factory=list)


class WatchLoop:
    """List + watch one resource on a thread; keeps ``objects`` (key → dict) current."""

    def __init__(self, kind: str, list_call: Callable[..., Any], key: Callable[[Mapping[str, Any]], str],
                 on_change: Callable[[], None], *, watch_timeout: int = WATCH_TIMEOUT_SECONDS,
                 backoff: Backoff | None = None, page_size: int = LIST_PAGE_SIZE,
                 forbidden_hint: str = AGENT_FORBIDDEN_HINT) -> None:
        self.kind = kind
        self.forbidden_hint = forbidden_hint   # what a 403 tells the operator to grant, to whom
        self._list_call = list_call
        self._key = key
        self._on_change = on_change
        self.watch_timeout = watch_timeout
        self.backoff = backoff or Backoff()
        self.page_size = page_size
        self.objects: dict[str, dict] = {}   # replaced whole on a list, edited by events; read under lock
        self.lock = threading.Lock()
        self.synced = threading.Event()      # the first list is in
        self.resource_version = ""
        self.stats = WatchStats()
        self._stop = threading.Event()
        self._response: Any = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"k8s-watch-{self.kind}", daemon=True)
        self._thread.start()

    def request_stop(self) -> None:
        """Stop after the read in progress, and wake that read (see the module docstring); returns at once."""
        self._stop.set()
        response = self._response
        sock = getattr(getattr(response, "connection", None), "sock", None)
        if sock is not None:
            try:
                # wakes the read blocked on the stream; close() from here would wait for that read's lock
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def join(self, deadline: float) -> bool:
        """Wait for the thread until ``deadline`` (time.monotonic()); True if it has ended (or never started)."""
        if self._thread is None:
            return True
        self._thread.join(max(0.0, deadline - time.monotonic()))
        return not self._thread.is_alive()

    @property
    def thread_name(self) -> str:
        return self._thread.name if self._thread is not None else f"k8s-watch-{self.kind}"

    def snapshot(self) -> list[dict]:
        with self.lock:
            return list(self.objects.values())

    # -- the loop ------------------------------------------------------------------------------
    def _run(self) -> None:
        need_list = True
        while not self._stop.is_set():
            try:
                if need_list:
                    self._list()
                    need_list = False
                    self.backoff.reset()
                if self._stop.is_set():        # stopped during the list: open no watch
                    break
                self._watch()
                self.backoff.reset()           # the stream ended normally: re-open from resource_version
            except Gone as exc:
                self.stats.relists_gone += 1
                log.info("%s watch: %s; listing again", self.kind, exc)
                need_list = True
            except Exception as exc:  # noqa: BLE001 — a task root: every failure is logged, counted, retried
                if self._stop.is_set():
                    break
                self.stats.errors += 1
                self.stats.last_error = _describe(exc, self.forbidden_hint)
                self.stats.failing_since = self.stats.failing_since or time.time()
                delay = self.backoff.next()
                self.stats.backoff_delays.append(delay)
                log.warning("%s %s failed: %s; retrying in %.1fs", self.kind, "list" if need_list else "watch",
                            self.stats.last_error, delay)
                self._stop.wait(delay)

    def _list(self) -> None:
        objects: dict[str, dict] = {}
        token = ""
        while True:
            kwargs: dict[str, Any] = {"limit": self.page_size, "_preload_content": False,
                                      "_request_timeout": (CONNECT_TIMEOUT_SECONDS, LIST_READ_TIMEOUT_SECONDS)}
            if token:
                kwargs["_continue"] = token
            response = self._call(**kwargs)
            self._response = response      # a stop now wakes the body's read
            try:
                if self._stop.is_set():
                    response.release_conn()
                    return
                doc = _read_json(response)
            finally:
                self._response = None
            for item in doc.get("items") or ():
                objects[self._key(item)] = item
            metadata = doc.get("metadata") or {}
            token = metadata.get("continue") or ""
            if not token:
                break
        with self.lock:
            self.objects = objects
        self.resource_version = metadata.get("resourceVersion") or ""
        self.stats.lists += 1
        self._answered()
        self.synced.set()
        self._on_change()

    def _watch(self) -> None:
        from kubernetes.watch.watch import iter_resp_lines

        self.stats.watches += 1
        response = self._call(watch=True, resource_version=self.resource_version, allow_watch_bookmarks=True,
                              timeout_seconds=self.watch_timeout, _preload_content=False,
                              _request_timeout=(CONNECT_TIMEOUT_SECONDS, self.watch_timeout + READ_SLACK_SECONDS))
        self._response = response
        self._answered()
        try:
            if self._stop.is_set():   # stopped while the watch was being opened: request_stop saw no response
                return
            for line in iter_resp_lines(response):
                if self._stop.is_set():
                    return
                if line.strip():
                    self._apply(json.loads(line))
                    self.backoff.reset()           # the stream works (a bare connect does not count)
        finally:
            self._response = None
            response.close()
            response.release_conn()

    def _answered(self) -> None:
        """A list completed or a watch stream opened: the API server answers again (logged once)."""
        if self.stats.failing_since:
            log.info("%s: the Kubernetes API answers again after %.0fs of failures (%s)", self.kind,
                        time.time() - self.stats.failing_since, self.stats.last_error)
            self.stats.failing_since = 0.0

    def _apply(self, event: Mapping[str, Any]) -> None:
        kind, obj = event.get("type"), event.get("object") or {}
        if kind == "ERROR":
            if obj.get("code") == HTTP_GONE:
                raise Gone(obj.get("message") or "resourceVersion too old")
            raise TcpmeshError(f"watch ERROR event: {obj.get('code')} {obj.get('reason')}: {obj.get('message')}")
        version = (obj.get("metadata") or {}).get("resourceVersion")
        if kind in ("ADDED", "MODIFIED", "DELETED"):
            key = self._key(obj)
            with self.lock:
                if kind == "DELETED":
                    self.objects.pop(key, None)
                else:
                    self.objects[key] = obj
            self.stats.events += 1
            self._on_change()
        elif kind != "BOOKMARK":
            log.debug("%s watch: ignoring event type %r", self.kind, kind)
        if version:
            self.resource_version = version

    def _call(self, **kwargs: Any) -> Any:
        from kubernetes.client.exceptions import ApiException

        try:
            response = self._list_call(**kwargs)
        except ApiException as exc:
            if exc.status == HTTP_GONE:
                raise Gone(f"HTTP 410: {exc.reason}") from exc
            raise
        return response


def _read_json(response: Any) -> dict:
    try:
        return json.loads(response.data)
    finally:
        response.release_conn()


def _describe(exc: BaseException, forbidden_hint: str = AGENT_FORBIDDEN_HINT) -> str:
    from kubernetes.client.exceptions import ApiException

    if isinstance(exc, ApiException):
        hint = f" ({forbidden_hint})" if exc.status == 403 else ""
        return f"HTTP {exc.status} {exc.reason}{hint}"
    return f"{type(exc).__name__}: {exc}"
