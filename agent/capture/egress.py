"""Reading the kernel's egress events: one per pod TCP connect to a destination outside the mesh.

The connect hooks never redirect such a connect (it leaves from the pod with the pod's own address,
or is refused at connect() under policy.outbound_passthrough DENY); they write one struct
tcpmesh_egress_event into the pinned ring buffer tcpmesh_egress instead. ``EgressReader`` drains it
with libbpf's ring_buffer API over ctypes (no bcc): ``fileno()`` is an epoll fd for the agent's
event loop (``loop.add_reader``), ``drain()`` hands every waiting event, parsed into an
``EgressEvent``, to the callback. Telemetry only: the connection itself never touches the agent.
Must not import the proxy, plumbing or telemetry packages.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from dataclasses import dataclass
from typing import Callable

from agent.capture import abi
from agent.bpf.errors import AttachError

# int (*ring_buffer_sample_fn)(void *ctx, void *data, size_t size)
_SAMPLE_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)


@dataclass(frozen=True)
class EgressEvent:
    cgroup_id: int
    pid: int
    uid: int
    comm: str
    destination_ip: str
    destination_port: int
    denied: bool


def parse_event(raw: bytes) -> EgressEvent | None:
    """A record of tcpmesh_egress, or None if it is too short to be one (never raises)."""
    if len(raw) < ctypes.sizeof(abi.EgressEvent):
        return None
    event = abi.EgressEvent.from_buffer_copy(raw)
    ip, port = abi.egress_destination(event)
    return EgressEvent(cgroup_id=event.cgroup_id, pid=event.pid, uid=event.uid,
                       comm=event.comm.decode(errors="replace"), destination_ip=ip, destination_port=port,
                       denied=bool(event.denied))


class EgressReader:
    """libbpf's ring_buffer over the pinned tcpmesh_egress. Owns ``ring_fd`` (a duplicate of the
    pinned set's: libbpf keeps the fd in its epoll set and mmaps through it)."""

    def __init__(self, ring_fd: int, on_event: Callable[[EgressEvent], None]) -> None:
        self._fd = ring_fd
        self._lib = ctypes.CDLL(ctypes.util.find_library("bpf") or "libbpf.so.1", use_errno=True)
        self._lib.ring_buffer__new.restype = ctypes.c_void_p
        self._lib.ring_buffer__new.argtypes = [ctypes.c_int, _SAMPLE_FN, ctypes.c_void_p, ctypes.c_void_p]
        self._lib.ring_buffer__consume.argtypes = [ctypes.c_void_p]
        self._lib.ring_buffer__epoll_fd.argtypes = [ctypes.c_void_p]
        self._lib.ring_buffer__free.argtypes = [ctypes.c_void_p]
        self._on_event = on_event
        self.malformed = 0
        self._callback = _SAMPLE_FN(self._sample)  # kept alive as long as the ring buffer
        self._rb = self._lib.ring_buffer__new(ring_fd, self._callback, None, None)
        if not self._rb:
            os.close(ring_fd)
            raise AttachError("ring_buffer__new", "tcpmesh_egress", ctypes.get_errno() or 22)

    def _sample(self, _ctx: int, data: int, size: int) -> int:
        event = parse_event(ctypes.string_at(data, size))
        if event is None:
            self.malformed += 1
            return 0
        try:
            self._on_event(event)
        except Exception:  # noqa: BLE001 — a failing consumer must not stop the drain (libbpf would abort it)
            self.malformed += 1
        return 0

    def fileno(self) -> int:
        return self._lib.ring_buffer__epoll_fd(self._rb)

    def drain(self) -> int:
        """Hand every waiting event to the callback; returns how many were consumed."""
        if not self._rb:
            return 0
        count = self._lib.ring_buffer__consume(self._rb)
        if count < 0:
            raise AttachError("ring_buffer__consume", "tcpmesh_egress", -count)
        return count

    def close(self) -> None:
        """Free the ring buffer and its fd. Idempotent."""
        if self._rb:
            self._lib.ring_buffer__free(self._rb)
            self._rb = None
            os.close(self._fd)


def open_reader(ring_fd: int, on_event: Callable[[EgressEvent], None]) -> EgressReader:
    """An EgressReader over a duplicate of ``ring_fd`` (the pinned set closes its own when it closes)."""
    return EgressReader(os.dup(ring_fd), on_event)
