"""The issuer's config file (YAML; docs/identity.md "Running the issuer"), validated with errors naming
the field and the fix. Pure, apart from reading the file."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from agent.config import build_dataclass
from agent.errors import ConfigError, invalid_yaml, problems_of, refused
from agent.identity.spiffe import (SpiffeIdError, validate_namespace, validate_service_account,
                                  validate_trust_domain)
from agent.identity.svid import DEV_MIN_TTL_SECONDS, MIN_TTL_SECONDS
from agent.issuer.protocol import DEFAULT_PORT


@dataclass(frozen=True)
class ListenConfig:
    address: str = "0.0.0.0"
    port: int = DEFAULT_PORT


@dataclass(frozen=True)
class IssuerRegistryConfig:
    source: str = "file"                      # "file" or "kubernetes": what placement is checked against
    file: str = "/etc/tcpmesh/workloads.yaml"
    poll_seconds: float = 2.0
    kubeconfig: str = ""


@dataclass(frozen=True)
class TokensConfig:
    key_file: str = ""     # `tcpmesh issuer token-key --out FILE`; empty: no bootstrap tokens accepted
    spent_dir: str = "/var/lib/tcpmesh-issuer/spent"  # shared by every replica (tokens.py)


@dataclass(frozen=True)
class KubernetesAttestationConfig:
    # A node proves itself with its agent pod's projected service-account token (kubernetes_attestation.py)
    enabled: bool = False
    audience: str = "tcpmesh-issuer"          # the DaemonSet's projected token volume asks for this audience
    namespace: str = "tcpmesh-system"         # the agent's service account: only its tokens attest a node
    service_account: str = "tcpmesh-agent"
    exclusive: bool = True                    # node SVIDs only by attestation: a node credential cannot renew itself
    timeout_seconds: float = 5.0              # one deadline for the TokenReview and the pod read together


@dataclass(frozen=True)
class AttestationConfig:
    kubernetes: KubernetesAttestationConfig = field(default_factory=KubernetesAttestationConfig)


@dataclass(frozen=True)
class RateConfig:
    per_second: float = 5.0   # per node: certificates a node may be issued per second, sustained
    burst: int = 200          # per node: at once (a node start with many identities)
    joins_per_minute: float = 10.0  # per source address: bootstrap token attempts


@dataclass(frozen=True)
class LimitsConfig:
    # What one replica holds at once and for how long (server.py); docs/identity.md "Limits of one replica"
    workers: int = 8                          # requests answered at once (threads)
    attestations: int = 4                     # Kubernetes attestations waiting for the API at once (< workers)
    max_connections: int = 1024               # TLS connections held (without a node credential: at most half)
    max_connections_per_peer: int = 16        # per node credential, or per source address without one
    max_handshakes: int = 256                 # TLS handshakes in progress (full: the oldest one is cut)
    max_handshakes_per_address: int = 8       # per source address
    handshake_timeout_seconds: float = 5.0
    request_timeout_seconds: float = 10.0     # the first request line, complete, after the handshake
    idle_seconds: float = 60.0                # between the requests of one connection


@dataclass(frozen=True)
class MetricsConfig:
    address: str = "127.0.0.1"
    port: int = 15022     # /metrics (Prometheus); 0: off


@dataclass(frozen=True)
class IssuerConfig:
    trust_domain: str = "cluster.local"
    name: str = "issuer"                          # this replica's name in logs and hello answers
    ca_dir: str = "/etc/tcpmesh/issuer"           # `tcpmesh ca issue-issuer --out`
    listen: ListenConfig = field(default_factory=ListenConfig)
    registry: IssuerRegistryConfig = field(default_factory=IssuerRegistryConfig)
    tokens: TokensConfig = field(default_factory=TokensConfig)
    attestation: AttestationConfig = field(default_factory=AttestationConfig)
    rate: RateConfig = field(default_factory=RateConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    max_svid_ttl_seconds: int = 3600
    node_svid_ttl_seconds: int = 3600
    dev_short_ttl: bool = False                   # tests only: TTLs down to 2 s


def load_issuer_config(path: str | Path) -> IssuerConfig:
    """Read and validate the issuer's config file; every refusal names the file (and a YAML error its line)."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError("--config", str(path), f"cannot read the issuer config: {exc.strerror}",
                          "pass --config with the path of an existing YAML file") from None
    try:
        doc = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise invalid_yaml(path, text, exc) from None
    try:
        return issuer_config_from_mapping(doc, source=str(path))
    except ConfigError as exc:  # say which file holds each wrong value, as the agent's config does
        located = [ConfigError(e.field if e.field == str(path) else f"{path}: {e.field}", e.value, e.problem, e.fix)
                   for e in problems_of(exc)]
        raise refused(located, where=str(path)) from None


def issuer_config_from_mapping(doc: Any, source: str = "issuer config") -> IssuerConfig:
    if not isinstance(doc, dict):
        raise ConfigError(source, type(doc).__name__, "must be a YAML mapping")
    config = build_dataclass(IssuerConfig, doc, prefix="")
    try:
        validate_trust_domain(config.trust_domain)
    except SpiffeIdError as exc:
        raise ConfigError("trust_domain", config.trust_domain, str(exc)) from None
    if config.registry.source not in ("file", "kubernetes"):
        raise ConfigError("registry.source", config.registry.source, "unknown source", "use file or kubernetes")
    floor = DEV_MIN_TTL_SECONDS if config.dev_short_ttl else MIN_TTL_SECONDS
    for name in ("max_svid_ttl_seconds", "node_svid_ttl_seconds"):
        if getattr(config, name) < floor:
            raise ConfigError(name, getattr(config, name), "is too short", f"use at least {floor} seconds")
    if not 0 < config.listen.port < 65536:
        raise ConfigError("listen.port", config.listen.port, "out of range", "use 1-65535")
    if config.rate.per_second <= 0 or config.rate.burst < 1 or config.rate.joins_per_minute <= 0:
        raise ConfigError("rate", config.rate, "every rate must be positive", "for example per_second: 5, burst: 200")
    _limits(config.limits)
    _attestation(config)
    if not config.ca_dir:
        raise ConfigError("ca_dir", config.ca_dir, "is required",
                          "point it at the directory of `tcpmesh ca issue-issuer --ca <root> --out <dir>`")
    return config


def _limits(limits: LimitsConfig) -> None:
    for name in ("workers", "max_connections", "max_connections_per_peer", "max_handshakes",
                 "max_handshakes_per_address", "attestations"):
        if getattr(limits, name) < 1:
            raise ConfigError(f"limits.{name}", getattr(limits, name), "must be at least 1",
                              f"use the default {getattr(LimitsConfig, name)}")
    if limits.max_handshakes_per_address > limits.max_handshakes:
        raise ConfigError("limits.max_handshakes_per_address", limits.max_handshakes_per_address,
                          f"is above limits.max_handshakes ({limits.max_handshakes}), which caps all addresses together",
                          f"use at most {limits.max_handshakes} (nodes behind one NAT share one address: raise both, "
                          "docs/identity.md \"Limits of one replica\")")
    if limits.attestations >= limits.workers:
        raise ConfigError("limits.attestations", limits.attestations, f"must be below limits.workers ({limits.workers}): "
                          "requests that need no API (sign, renewals) must always find a free worker",
                          f"use at most {limits.workers - 1}")
    for name in ("handshake_timeout_seconds", "request_timeout_seconds", "idle_seconds"):
        if not 0.5 <= getattr(limits, name) <= 600:
            raise ConfigError(f"limits.{name}", getattr(limits, name), "out of range", "use 0.5 to 600 seconds")


def _attestation(config: IssuerConfig) -> None:
    k8s = config.attestation.kubernetes
    if not k8s.enabled:
        return
    if config.registry.source != "kubernetes":
        raise ConfigError("attestation.kubernetes.enabled", True, "needs registry.source: kubernetes (placement "
                          "then reads the same cluster's pods)", "set registry.source: kubernetes")
    if not k8s.audience:
        raise ConfigError("attestation.kubernetes.audience", k8s.audience, "is required",
                          "use the audience of the DaemonSet's projected token, e.g. tcpmesh-issuer")
    try:
        validate_namespace(k8s.namespace)
        validate_service_account(k8s.service_account)
    except SpiffeIdError as exc:
        raise ConfigError("attestation.kubernetes", f"{k8s.namespace}/{k8s.service_account}", str(exc),
                          "name the agent DaemonSet's namespace and service account") from None
    if not 0.5 <= k8s.timeout_seconds <= 60:
        raise ConfigError("attestation.kubernetes.timeout_seconds", k8s.timeout_seconds, "out of range",
                          "use 0.5 to 60 seconds")
