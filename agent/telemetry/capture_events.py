"""``tcpmesh_capture_events_total{mode, reason}``: the capture programs' per-reason counters (captured,
guard_denied, outside_mesh_denied, origin_missing, ...; agent/capture/abi.py names them), read from the
kernel at scrape time on the admin thread and summed over CPUs.

The kernel keeps these counters whether or not anyone reads them; `tcpmesh doctor` printed them, and
now Prometheus has them too, so an operator can alert on a refusal that happened in the kernel (a
guard or DENY at connect leaves no access-log record: the connection never reached the proxy). A
read that fails or is partial emits no sample at all, never a figure that would look like a reset.
Imports only prometheus_client.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterator

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger("tcpmesh.telemetry")


class CaptureEventsCollector(Collector):
    def __init__(self, mode: str, read: Callable[[], dict[str, int]]) -> None:
        self._mode = mode
        self._read = read  # {reason: total over CPUs}; empty when unknown or partially read

    def collect(self) -> Iterator[CounterMetricFamily]:
        events = CounterMetricFamily("tcpmesh_capture_events", "Capture programs' decisions and failures in the "
                                     "kernel, by reason (agent/capture/abi.py)", labels=("mode", "reason"))
        try:
            counts = self._read()
        except Exception:  # noqa: BLE001 — a scrape must not fail because one kernel read did
            log.exception("reading the capture counters failed")
            counts = {}
        for reason, value in sorted(counts.items()):
            events.add_metric((self._mode, reason), value)
        yield events

    def describe(self):
        return []
