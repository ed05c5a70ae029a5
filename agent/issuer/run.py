"""The issuer process: wires config → CA, registry, tokens, limits, metrics, service, server; keeps them current.

Every ``registry.poll_seconds`` it re-reads a changed registry file (a bad one is logged and the last
good one stays — placement never falls back to "allow"), reloads a changed CA directory (a re-issued
intermediate: new server certificate, new signatures; a changed bundle: who may vouch for a node), and
renews its server certificate at half life. A registry file, CA file or token key that someone other
than root or the issuer's user can change (``filetrust``) stops the start; at a reload it is refused
and the last good one stays (logged, ``tcpmesh_issuer_reloads_refused_total``). Kubernetes: the registry's own watch source (``registry.kubernetes.source``, pods and nodes
only) feeds the snapshot, and with ``attestation.kubernetes.enabled`` a ``KubernetesAttestor`` lets
agents join with their pod's projected service-account token.
Stops on SIGTERM/SIGINT. Systemd ``READY=1`` once listening (NOTIFY_SOCKET, when set).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from datetime import datetime, timezone
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server

from agent.errors import TcpmeshError
from agent.identity.files import ISSUER_CA_FILES, files_signature
from agent.issuer.config import IssuerConfig
from agent.filetrust import UntrustedFileError, check_trusted_file
from agent.issuer.metrics import IssuerMetrics
from agent.issuer.ratelimit import RateLimiter
from agent.issuer.server import IssuerServer
from agent.issuer.service import IssuerService, Limits
from agent.issuer.signing import IssuingCa
from agent.issuer.tokens import SpentLedger, load_token_key
from agent.registry.model import Registry

log = logging.getLogger("tcpmesh.issuer")


class RegistryHolder:
    """The newest registry snapshot the placement check reads (one assignment per change)."""

    def __init__(self) -> None:
        self.current: Registry | None = None
        self.signature: Any = None

    def get(self) -> Registry | None:
        return self.current

    def set(self, registry: Registry) -> bool:
        self.current = registry
        return True


def _file_signature(path: str) -> Any:
    """What a poll compares: the file's identity, size, mode, owner and times (an edit, a replaced file, a chmod
    or a chown all show), and its directory's mode and owner (not its times: other files come and go there)."""
    try:
        st = os.stat(path)
        file = (st.st_ino, st.st_size, st.st_mode, st.st_uid, st.st_mtime_ns, st.st_ctime_ns)
    except OSError:
        file = None
    try:
        st = os.stat(os.path.dirname(os.path.abspath(path)))
        directory = (st.st_mode, st.st_uid)
    except OSError:
        directory = None
    return file, directory


def reload_registry_file(config: IssuerConfig, holder: RegistryHolder, metrics: Any, *, at_start: bool = False) -> None:
    """Load ``registry.file`` if it changed. A file someone other than root or the issuer's user can change
    (``filetrust``) is refused: at start by raising (the issuer does not run), later by keeping the last good
    registry, logged and counted. A file that does not parse is logged and the last good one stays."""
    from agent.registry.static_file import load_registry_file

    signature = _file_signature(config.registry.file)
    if signature == holder.signature:
        return
    holder.signature = signature
    keeping = "none yet: every request is refused" if holder.current is None else "loaded before"
    try:
        check_trusted_file(config.registry.file, "registry.file")
    except UntrustedFileError as exc:
        if at_start:
            raise
        metrics.reloads_refused.labels(what="registry").inc()
        log.error("issuer: %s; keeping the previous registry (%s)", exc, keeping)
        return
    try:
        registry = load_registry_file(config.registry.file, config.trust_domain)
    except TcpmeshError as exc:
        metrics.reloads_refused.labels(what="registry").inc()
        log.error("issuer: the registry %s cannot be used: %s; keeping the previous one (%s)", config.registry.file,
                  exc, keeping)
        return
    holder.set(registry)
    metrics.registry_workloads.set(len(registry.workloads))
    log.info("issuer: registry %s: %d nodes, %d workloads", config.registry.file, len(registry.nodes),
             len(registry.workloads))


def reload_ca_dir(config: IssuerConfig, service: IssuerService, server: IssuerServer, metrics: Any,
                  seen: Any) -> Any:
    """One poll of ``ca_dir``: reload it if its files changed since ``seen`` (a bad one is logged and the
    loaded CA stays), else renew the server certificate near half life. Returns the signature now seen."""
    signature = files_signature(config.ca_dir, ISSUER_CA_FILES)
    now = datetime.now(timezone.utc)
    if signature == seen:
        if (server.server_not_after - now).total_seconds() < 12 * 3600:
            server.refresh_server_certificate()
        return seen
    try:
        service.ca = IssuingCa(config.ca_dir, now, previous=service.ca)
    except TcpmeshError as exc:   # IdentityError, or UntrustedFileError: someone else may change the files
        metrics.reloads_refused.labels(what="ca_dir").inc()
        log.error("issuer: the CA files in %s changed but cannot be used: %s; keeping %r",
                  config.ca_dir, exc, service.ca)
        return signature
    metrics.ca_expiry.set(service.ca.not_after.timestamp())
    log.info("issuer: reloaded %r", service.ca)
    server.refresh_server_certificate()
    return signature


def build_service(config: IssuerConfig, metrics: IssuerMetrics, holder: RegistryHolder) -> IssuerService:
    now = datetime.now(timezone.utc)
    ca = IssuingCa(config.ca_dir, now)
    if ca.trust_domain != config.trust_domain:
        raise TcpmeshError(f"ca_dir {config.ca_dir} is for trust domain {ca.trust_domain!r}, trust_domain is "
                           f"{config.trust_domain!r}; fix one of them")
    metrics.ca_expiry.set(ca.not_after.timestamp())
    token_key = load_token_key(config.tokens.key_file) if config.tokens.key_file else None
    ledger = SpentLedger(config.tokens.spent_dir) if token_key is not None else None
    min_ttl = 2 if config.dev_short_ttl else 60
    return IssuerService(ca, holder.get, token_key=token_key, ledger=ledger, attestor=make_attestor(config),
                         node_limiter=RateLimiter(config.rate.per_second, config.rate.burst),
                         join_limiter=RateLimiter(config.rate.joins_per_minute / 60.0, max(1, config.rate.joins_per_minute)),
                         metrics=metrics, name=config.name,
                         limits=Limits(config.max_svid_ttl_seconds, min_ttl, config.node_svid_ttl_seconds))


def make_attestor(config: IssuerConfig) -> Any:
    """The Kubernetes node attestor of ``attestation.kubernetes`` (None when it is off)."""
    k8s = config.attestation.kubernetes
    if not k8s.enabled:
        return None
    from agent.issuer.kubernetes_attestation import AttestationPolicy, KubernetesAttestor
    from agent.registry.kubernetes.source import make_api_client

    return KubernetesAttestor(make_api_client(config.registry.kubeconfig),
                              AttestationPolicy(k8s.audience, k8s.namespace, k8s.service_account),
                              timeout_seconds=k8s.timeout_seconds, exclusive=k8s.exclusive,
                              max_in_flight=config.limits.attestations)


def kubernetes_registry_source(config: IssuerConfig, holder: RegistryHolder, metrics: IssuerMetrics) -> Any:
    """The registry's watch source as the issuer runs it: pods and nodes, no node of its own, no cgroups."""
    from agent.issuer.kubernetes_attestation import WATCH_RULE, forbidden_fix
    from agent.registry.kubernetes.source import KubernetesSource, make_api_client

    return KubernetesSource(make_api_client(config.registry.kubeconfig), "", config.trust_domain, "",
                            lambda r: (holder.set(r), metrics.registry_workloads.set(len(r.workloads))),
                            services=False, forbidden_hint=forbidden_fix("", WATCH_RULE))


async def run_issuer(config: IssuerConfig, *, registry: CollectorRegistry | None = None) -> None:
    registry = registry or CollectorRegistry()
    metrics = IssuerMetrics(registry)
    holder = RegistryHolder()
    source = None
    if config.registry.source == "file":
        reload_registry_file(config, holder, metrics, at_start=True)
    else:
        source = kubernetes_registry_source(config, holder, metrics)
        source.start()
        holder.set(await source.first_snapshot())
    service = build_service(config, metrics, holder)
    server = IssuerServer(service, config.listen.address, config.listen.port, limits=config.limits, metrics=metrics)
    await server.start()
    if config.metrics.port:  # after the listener: /metrics answering means agents can be served
        start_http_server(config.metrics.port, config.metrics.address, registry=registry)
    _notify_ready()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tasks = [asyncio.create_task(source.run())] if source is not None else []
    ca_signature = files_signature(config.ca_dir, ISSUER_CA_FILES)
    try:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), config.registry.poll_seconds)
            except asyncio.TimeoutError:
                pass
            if config.registry.source == "file":
                reload_registry_file(config, holder, metrics)
            ca_signature = reload_ca_dir(config, service, server, metrics, ca_signature)
    finally:
        for task in tasks:
            task.cancel()
        if source is not None:
            source.stop()
        await server.close()
        log.info("issuer %s stopped", config.name)


def _notify_ready() -> None:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.sendto(b"READY=1\nSTATUS=issuing", address)
        except OSError:
            pass
