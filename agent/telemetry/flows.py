"""Open and recently closed flows of this node, and the one access-log record per connection.

Written from the data-path loop, read from the admin thread: mutations are single dict/deque
operations (atomic under the GIL) and readers take copies. The access log is a logger named
``tcpmesh.access`` that receives one JSON line per closed connection.
"""

from __future__ import annotations

import collections
import json
import logging

from agent.proxy.flow import Flow

RECENT_FLOWS = 1024
access_log = logging.getLogger("tcpmesh.access")


class FlowTable:
    def __init__(self, recent: int = RECENT_FLOWS) -> None:
        self._open: dict[int, Flow] = {}
        self._closed: collections.deque[Flow] = collections.deque(maxlen=recent)

    def opened(self, flow: Flow) -> None:
        self._open[id(flow)] = flow

    def closed(self, flow: Flow) -> None:
        self._open.pop(id(flow), None)
        self._closed.append(flow)
        access_log.info(json.dumps(flow.record(), sort_keys=True))

    def snapshot(self) -> list[dict]:
        """Open flows first, then closed ones, newest last."""
        return [f.record() for f in list(self._open.values())] + [f.record() for f in list(self._closed)]

    @property
    def open_count(self) -> int:
        return len(self._open)
