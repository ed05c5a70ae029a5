"""An issuer replica on loopback for tests: ``agent.issuer`` as ``tcpmesh issuer run`` wires it, served
from its own event-loop thread (tests/integration/test_issuer*.py)."""

from __future__ import annotations

import asyncio
import threading

from prometheus_client import CollectorRegistry

from agent.issuer.metrics import IssuerMetrics
from agent.issuer.run import RegistryHolder, build_service, reload_registry_file
from agent.issuer.server import IssuerServer


class Replica:
    """One issuer replica serving on loopback from its own event loop thread."""

    def __init__(self, config, name: str, port: int = 0) -> None:
        self.metrics = IssuerMetrics(CollectorRegistry())
        self.holder = RegistryHolder()
        reload_registry_file(config, self.holder, self.metrics)
        self.service = build_service(config, self.metrics, self.holder)
        self.service.name = name
        self.loop = asyncio.new_event_loop()
        self.server = IssuerServer(self.service, "127.0.0.1", port, metrics=self.metrics)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(10)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def refusals(self, reason: str) -> float:
        return self.metrics.refusals.labels(reason=reason)._value.get()

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


