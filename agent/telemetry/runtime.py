"""The agent's own resources, for leak checks and capacity alerts (docs/reliability.md):

    tcpmesh_agent_open_fds               file descriptors open now (read at scrape time)
    tcpmesh_agent_open_fds_limit         RLIMIT_NOFILE soft limit
    tcpmesh_agent_asyncio_tasks          tasks on the data-path loop          } sampled on the loop every
    tcpmesh_agent_connection_tasks       connection tasks of the proxies      } telemetry.report_interval_seconds;
    tcpmesh_agent_relays                 application connections relaying now } the admin thread reads the
    tcpmesh_agent_outbound_tunnels       pooled outbound tunnels              } last sample
    tcpmesh_agent_limited_connections    connections counted by agent.proxy.limits, by reporter
    tcpmesh_agent_pending_handshakes     inbound TLS handshakes not yet authenticated (proxy.max_handshakes)

Loop-side state is only ever read on the loop (``sample``); the collector, on the admin thread,
reads the plain numbers of the last sample, never a live dict.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
from typing import Any, Callable, Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger("tcpmesh.telemetry")


class RuntimeStats(Collector):
    def __init__(self, ctx: Any, outbound_tunnels: Callable[[], int] = lambda: 0) -> None:
        self._ctx = ctx  # agent.proxy.server.ProxyContext
        self._outbound_tunnels = outbound_tunnels
        self.last: dict[str, Any] = {}

    def sample(self) -> dict[str, Any]:
        """Take the loop-side numbers (call on the data-path loop)."""
        self.last = {
            "asyncio_tasks": len(asyncio.all_tasks()),
            "connection_tasks": len(self._ctx.tasks),
            "relays": len(self._ctx.relays),
            "outbound_tunnels": self._outbound_tunnels(),
            "limited": {reporter: limits.active for reporter, limits in self._ctx.limits.items()},
            "pending_handshakes": self._ctx.handshakes.active if self._ctx.handshakes is not None else 0,
        }
        return self.last

    async def sample_forever(self, interval: float) -> None:
        while True:
            try:
                self.sample()
            except Exception:  # a task root: telemetry must not end because one sample failed
                log.exception("sampling the agent's runtime figures failed")
            await asyncio.sleep(interval)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            fds = len(os.listdir("/proc/self/fd"))
        except OSError:
            fds = None
        if fds is not None:
            yield GaugeMetricFamily("tcpmesh_agent_open_fds", "File descriptors the agent holds now", value=fds)
        yield GaugeMetricFamily("tcpmesh_agent_open_fds_limit", "The agent's open-files limit (RLIMIT_NOFILE soft)",
                                value=resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        last = self.last
        if not last:
            return
        for key, text in (("asyncio_tasks", "Tasks on the data-path event loop"),
                          ("connection_tasks", "Connection tasks of the outbound and inbound proxies"),
                          ("relays", "Application connections relaying now"),
                          ("outbound_tunnels", "Pooled outbound tunnels (tcpmesh/2)"),
                          ("pending_handshakes", "Inbound TLS handshakes not yet authenticated (capped by "
                                                 "proxy.max_handshakes)")):
            yield GaugeMetricFamily(f"tcpmesh_agent_{key}", text, value=last[key])
        limited = GaugeMetricFamily("tcpmesh_agent_limited_connections", "Connections counted against "
                                    "proxy.max_connections now", labels=["reporter"])
        for reporter, active in sorted(last["limited"].items()):
            limited.add_metric([reporter], active)
        yield limited
