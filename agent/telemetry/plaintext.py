"""``tcpmesh_plaintext_rejected_total`` / ``tcpmesh_plaintext_accepted_total``: TCP connections into
meshed pods that did not come through the inbound proxy, dropped (STRICT) or let in (PERMISSIVE),
per workload. Read from the kernel's per-CPU map at scrape time (on the admin thread), summed over
CPUs; a failed read emits nothing rather than a partial figure.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterator

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from agent.registry.model import Registry

log = logging.getLogger("tcpmesh.telemetry")


class PlaintextCollector(Collector):
    def __init__(self, read: Callable[[], dict[str, tuple[int, int]]], registry: Callable[[], Registry | None],
                 node_name: str) -> None:
        self._read = read  # {pod cgroup path: (rejected, accepted)}
        self._registry = registry
        self._node = node_name

    def collect(self) -> Iterator[CounterMetricFamily]:
        labels = ["workload", "workload_namespace"]
        rejected = CounterMetricFamily("tcpmesh_plaintext_rejected", "Plaintext TCP connections into a STRICT "
                                       "workload dropped in the kernel", labels=labels)
        accepted = CounterMetricFamily("tcpmesh_plaintext_accepted", "Plaintext TCP connections into a "
                                       "PERMISSIVE workload let in (not through the mesh)", labels=labels)
        registry = self._registry()
        try:
            counts = self._read()
        except Exception:  # noqa: BLE001 — a scrape must not fail because one kernel read did
            log.exception("reading the plaintext counters failed")
            return
        if registry is not None:
            for workload in registry.local(self._node):
                if workload.cgroup in counts:
                    dropped, let_in = counts[workload.cgroup]
                    rejected.add_metric([workload.name, workload.namespace], dropped)
                    accepted.add_metric([workload.name, workload.namespace], let_in)
        yield rejected
        yield accepted
