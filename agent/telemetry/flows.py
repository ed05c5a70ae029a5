"""Open and recently closed flows of this node, and the hand-off of one access record per connection.

Written from the data-path loop, read from the admin thread: mutations are single dict/deque
operations (atomic under the GIL) and readers take copies. Each closed flow (and each opened one,
when ``log_open``) becomes one access record handed to the access log's ``submit``, which must not
block (agent.audit.writer.AccessLog queues it for its own thread).
"""

from __future__ import annotations

import collections
import itertools
from typing import Any, Protocol

from agent.audit.record import access_record
from agent.connection.flow import Flow

RECENT_FLOWS = 1024


class RecordSink(Protocol):
    def submit(self, record: dict[str, Any]) -> None: ...


class FlowTable:
    def __init__(self, recent: int = RECENT_FLOWS, access_log: RecordSink | None = None,
                 log_open: bool = False) -> None:
        self._open: dict[int, Flow] = {}
        self._closed: collections.deque[tuple[int, Flow]] = collections.deque(maxlen=recent)
        self._close_seq = itertools.count(1)
        self.access_log = access_log
        self.log_open = log_open

    def opened(self, flow: Flow) -> None:
        self._open[id(flow)] = flow
        if self.log_open and self.access_log is not None:
            self.access_log.submit(access_record("open", flow))

    def closed(self, flow: Flow) -> None:
        self._open.pop(id(flow), None)
        self._closed.append((next(self._close_seq), flow))
        if self.access_log is not None:
            self.access_log.submit(access_record("close", flow))

    def egress(self, flow: Flow) -> None:
        """A connect outside the mesh the kernel reported: listed with the closed flows, one ``egress`` record."""
        self._closed.append((next(self._close_seq), flow))
        if self.access_log is not None:
            self.access_log.submit(access_record("egress", flow))

    def snapshot(self) -> list[dict]:
        """Open flows first, then closed ones, newest last."""
        return [f.record() for f in list(self._open.values())] + [f.record() for _, f in list(self._closed)]

    def query(self, workload: str | None = None, port: int | None = None, after: int = 0) -> dict[str, Any]:
        """Open flows and the flows closed after cursor ``after``, filtered; plus the new cursor.

        ``workload`` matches the source or destination workload by name or ``namespace/name``;
        ``port`` matches the destination port.
        """
        closed = list(self._closed)
        cursor = closed[-1][0] if closed else after
        flows = [("open", f) for f in list(self._open.values())] + [("closed", f) for seq, f in closed if seq > after]
        records = []
        for state, flow in flows:
            if port is not None and flow.destination_port != port:
                continue
            if workload and not _names_workload(flow, workload):
                continue
            record = flow.record()
            record["state"] = state
            records.append(record)
        return {"flows": records, "cursor": max(cursor, after)}

    @property
    def open_count(self) -> int:
        return len(self._open)

    def open_flows(self) -> list[Flow]:
        return list(self._open.values())


def _names_workload(flow: Flow, wanted: str) -> bool:
    for name, namespace in ((flow.source_workload, flow.source_namespace),
                            (flow.destination_workload, flow.destination_namespace)):
        if wanted in (name, f"{namespace}/{name}"):
            return True
    return False
