"""The agent's own resources, for leak checks and capacity alerts (docs/reliability.md):

    tcpmesh_agent_open_fds               file descriptors open now (read at scrape time)
    tcpmesh_agent_open_fds_limit         RLIMIT_NOFILE soft limit
    tcpmesh_agent_asyncio_tasks          tasks on the data-path loop          } sampled on the loop every
    tcpmesh_agent_connection_tasks       connection tasks of the proxies      } telemetry.report_interval_seconds;
    tcpmesh_agent_relays                 application connections relaying now } the admin thread reads the
    tcpmesh_agent_outbound_tunnels       pooled outbound tunnels              } last sample
    tcpmesh_agent_limited_connections    connections counted by agent.proxy.limits, by reporter
    tcpmesh_agent_pending_handshakes     inbound TLS handshakes not yet authenticated (proxy.max_handshakes)
    tcpmesh_buffered_bytes               bytes held for workloads that do not read  } agent.proxy.budget,
    tcpmesh_buffer_budget_bytes          the node-wide budget for them              } sampled likewise
    tcpmesh_buffer_stalled_identities    identities whose tunnels are paused now    }
    tcpmesh_buffer_stalls_total          times an identity was stalled              }

Loop-side state is only ever read on the loop (``sample``); the collector, on the admin thread,
reads the plain numbers of the last sample, never a live dict.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
from typing import Any, Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
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
        kernel_tls = getattr(self._ctx, "kernel_tls", None)
        if kernel_tls is not None:  # who runs the tunnels' TLS (proxy.kernel_tls; agent.proxy.kernel_leg.KernelTls)
            self.last["tunnel_tls"] = (dict(kernel_tls.open), dict(kernel_tls.established), kernel_tls.switch_failures,
                                       kernel_tls.active)
        gate = getattr(self._ctx, "buffer_gate", None)
        if gate is not None:
            budget = gate.budget
            self.last["buffer"] = (budget.held, budget.total, len(budget.stalled), budget.stalls)
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
        if "tunnel_tls" in last:
            opened, established, failures, active = last["tunnel_tls"]
            open_family = GaugeMetricFamily("tcpmesh_tunnels_open", "Tunnels (both sides) open now, by who runs their "
                                            "TLS: kernel (kernel TLS) or user (OpenSSL in the agent)", labels=["tls"])
            total_family = CounterMetricFamily("tcpmesh_tunnels_established", "Tunnels (both sides) started since the "
                                               "agent started, by who runs their TLS", labels=["tls"])
            for kind in ("kernel", "user"):
                open_family.add_metric([kind], opened.get(kind, 0))
                total_family.add_metric([kind], established.get(kind, 0))
            yield open_family
            yield total_family
            yield CounterMetricFamily("tcpmesh_kernel_tls_switch_failures", "Tunnels closed because their switch to "
                                      "kernel TLS failed (proxy.kernel_tls auto then uses user-space TLS)", value=failures)
            yield GaugeMetricFamily("tcpmesh_kernel_tls_active", "1 while new tunnels switch to kernel TLS "
                                    "(proxy.kernel_tls and the start-up probe), else 0", value=1 if active else 0)
        if "buffer" in last:
            held, total, stalled, stalls = last["buffer"]
            yield GaugeMetricFamily("tcpmesh_buffered_bytes", "Bytes the agent holds for workloads whose sockets "
                                    "are full (counted against proxy.buffer_budget_bytes)", value=held)
            yield GaugeMetricFamily("tcpmesh_buffer_budget_bytes", "The node-wide budget for those bytes "
                                    "(proxy.buffer_budget_bytes, or a quarter of the cgroup memory limit)", value=total)
            yield GaugeMetricFamily("tcpmesh_buffer_stalled_identities", "Identities whose tunnels are paused now "
                                    "because they hold their share of the buffer budget", value=stalled)
            yield CounterMetricFamily("tcpmesh_buffer_stalls", "Times an identity's tunnels were paused because it "
                                      "held its share of the buffer budget (or the budget was full)", value=stalls)
