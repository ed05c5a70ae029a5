"""An issuer replica on loopback for tests: ``agent.issuer`` as ``tcpmesh issuer run`` wires it, served
from its own event-loop thread (tests/integration/test_issuer*.py)."""

from __future__ import annotations

import asyncio
import threading

from prometheus_client import CollectorRegistry

from agent.issuer.metrics import IssuerMetrics
from agent.identity.files import ISSUER_CA_FILES, files_signature
from agent.issuer.run import (RegistryHolder, build_service, kubernetes_registry_source, reload_ca_dir,
                               reload_registry_file)
from agent.issuer.server import IssuerServer


class Replica:
    """One issuer replica serving on loopback from its own event loop thread."""

    def __init__(self, config, name: str, port: int = 0) -> None:
        self.config = config
        self.metrics = IssuerMetrics(CollectorRegistry())
        self.holder = RegistryHolder()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.source, self._source_task = None, None
        if config.registry.source == "kubernetes":   # as run_issuer: the watch source, first lists awaited
            self.source = kubernetes_registry_source(config, self.holder, self.metrics)
            asyncio.run_coroutine_threadsafe(self._start_source(), self.loop).result(30)
        else:
            reload_registry_file(config, self.holder, self.metrics, at_start=True)
        self.ca_signature = files_signature(config.ca_dir, ISSUER_CA_FILES)
        self.service = build_service(config, self.metrics, self.holder)
        self.service.name = name
        self.server = IssuerServer(self.service, "127.0.0.1", port, limits=config.limits, metrics=self.metrics)
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(10)

    async def _start_source(self) -> None:
        self.source.start()
        self.holder.set(await self.source.first_snapshot(20))
        self._source_task = asyncio.ensure_future(self.source.run())

    def poll(self) -> None:
        """One round of ``run_issuer``'s poll loop (registry file, CA directory), on the replica's loop thread."""
        async def once() -> None:
            if self.config.registry.source == "file":
                reload_registry_file(self.config, self.holder, self.metrics)
            self.ca_signature = reload_ca_dir(self.config, self.service, self.server, self.metrics, self.ca_signature)
        asyncio.run_coroutine_threadsafe(once(), self.loop).result(10)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def refusals(self, reason: str) -> float:
        return self.metrics.refusals.labels(reason=reason)._value.get()

    def stop(self) -> None:
        if self.loop.is_closed():   # stopped already (a test that stops it itself)
            return
        if self.source is not None:
            self.loop.call_soon_threadsafe(self._source_task.cancel)
            self.source.stop()
        asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


