"""Whether a config is sound: ``validate`` names every problem at once (field, value, fix) in the order of the
checks; ``admin_allowed_sources`` reads the one setting the admin server takes in parsed form. Pure; judges a
config whose ``capture.cgroup_root: auto`` is resolved already (agent.config.load).
"""

from __future__ import annotations

import ipaddress
import os
from typing import Any, Callable, Iterator

from agent.config.model import (CAPTURE_MODES, DEFAULT_ACCESS_LOG_KEY, DEFAULT_ADMIN_SOCKET,
                                 DEFAULT_BUFFER_IDENTITY_SHARES, IDENTITY_MODES, INBOUND_IDLE_MARGIN_SECONDS,
                                 KERNEL_TLS_CHOICES, MIN_BUFFER_BUDGET_BYTES, REGISTRY_SOURCES, SAME_NODE_CHOICES,
                                 SOURCE_ADDRESS_CHOICES,
                                 AccessLogConfig, AdminConfig, CaptureConfig, Config, IdentityConfig,
                                 IdentityIssuerConfig, ProxyConfig)
from agent.errors import ConfigError, refused
from agent.identity.spiffe import SpiffeIdError, validate_trust_domain
from agent.identity.svid import DEV_MIN_TTL_SECONDS, MIN_TTL_SECONDS
from agent.mounts import CGROUP_ROOT_AUTO


def validate(config: Config) -> Config:
    """``config`` if it is sound; else every problem at once, as a validator reports them (agent.errors.refused:
    one alone is a plain ConfigError, several a ConfigErrors), in the order of the checks below."""
    problems = list(_problems(config))
    if problems:
        raise refused(problems)
    return config


def _problems(config: Config) -> Iterator[ConfigError]:
    """Each problem of ``config`` once: a check that cannot be judged because of another problem is skipped."""
    try:
        validate_trust_domain(config.trust_domain)
    except SpiffeIdError as exc:
        yield ConfigError("trust_domain", config.trust_domain, str(exc))
    if not config.node.name:
        yield ConfigError("node.name", config.node.name, "is required", "set it to this node's name in the registry")
    yield from _ipv4("node.address", config.node.address, required=True)
    yield from _ipv4("proxy.bind_address", config.proxy.bind_address, required=True)
    yield from _ipv4("admin.address", config.admin.address, required=True)
    for name, port in (("proxy.outbound_port", config.proxy.outbound_port),
                       ("proxy.inbound_port", config.proxy.inbound_port), ("admin.port", config.admin.port)):
        if not 1 <= port <= 65535:
            yield ConfigError(name, port, "must be a TCP port between 1 and 65535")
    if len({config.proxy.outbound_port, config.proxy.inbound_port, config.admin.port}) != 3:
        yield ConfigError("proxy.outbound_port", config.proxy.outbound_port,
                          "outbound, inbound and admin ports must differ")
    if config.capture.mode not in CAPTURE_MODES:
        yield ConfigError("capture.mode", config.capture.mode, "unknown capture mode",
                          f"choose one of {', '.join(CAPTURE_MODES)}")
    if config.capture.mode in ("auto", "ebpf-connect"):  # ebpf-tc and iptables deliver in place
        yield from _ipv4("capture.redirect_address", config.capture.redirect_address, required=True)
    yield from _capture_paths(config.capture)
    yield from _identity(config.identity)
    if config.registry.source not in REGISTRY_SOURCES:
        yield ConfigError("registry.source", config.registry.source, "unknown registry source",
                          f"choose one of {', '.join(REGISTRY_SOURCES)}")
    if not 0.1 <= config.registry.poll_seconds <= 3600:
        yield ConfigError("registry.poll_seconds", config.registry.poll_seconds, "out of range",
                          "use a value between 0.1 and 3600 seconds")
    for name, value in (("policy.default_action", config.policy.default_action),
                        ("policy.outbound_passthrough", config.policy.outbound_passthrough)):
        if value not in ("ALLOW", "DENY"):
            yield ConfigError(name, value, "must be ALLOW or DENY")
    if not 0.1 <= config.policy.poll_seconds <= 3600:
        yield ConfigError("policy.poll_seconds", config.policy.poll_seconds, "out of range",
                          "use a value between 0.1 and 3600 seconds")
    if config.proxy.source_address not in SOURCE_ADDRESS_CHOICES:
        yield ConfigError("proxy.source_address", config.proxy.source_address, "unknown source address mode",
                          "use auto, pod (servers see the client pod's address) or node (the node's address)")
    if config.proxy.same_node not in SAME_NODE_CHOICES:
        yield ConfigError("proxy.same_node", config.proxy.same_node, "unknown same-node path",
                          "use local (in process, no tunnel to the node itself) or tunnel (through the inbound proxy)")
    if config.proxy.kernel_tls not in KERNEL_TLS_CHOICES:
        yield ConfigError("proxy.kernel_tls", config.proxy.kernel_tls, "unknown TLS implementation for the tunnels",
                          "use auto (the kernel's TLS where the host can, else user space), on (the kernel's, or the "
                          "agent refuses to start) or off (user space)")
    if config.proxy.event_loop not in ("uvloop", "asyncio"):
        yield ConfigError("proxy.event_loop", config.proxy.event_loop, "unknown event loop", "use uvloop or asyncio")
    yield from _caught(admin_allowed_sources, config.admin)
    if not config.admin.socket.startswith("/"):
        yield ConfigError("admin.socket", config.admin.socket, "must be an absolute path",
                          f"for example {DEFAULT_ADMIN_SOCKET}")
    if config.proxy.connect_timeout_seconds <= 0:
        yield ConfigError("proxy.connect_timeout_seconds", config.proxy.connect_timeout_seconds, "must be positive")
    yield from _deadlines_and_caps(config.proxy)
    if not 0.1 <= config.telemetry.report_interval_seconds <= 60:
        yield ConfigError("telemetry.report_interval_seconds", config.telemetry.report_interval_seconds,
                          "out of range", "use a value between 0.1 and 60 seconds")
    if config.telemetry.tcp_stats not in ("auto", "on", "off"):
        yield ConfigError("telemetry.tcp_stats", config.telemetry.tcp_stats, "unknown setting", "use auto, on or off")
    if config.access_log.path not in ("-", "off") and not config.access_log.path.startswith("/"):
        yield ConfigError("access_log.path", config.access_log.path, "must be '-' (stdout), 'off' or an absolute "
                          "path", "for example /var/log/tcpmesh/access.log")
    yield from _access_log_key(config.access_log)
    if config.access_log.max_bytes < 4096:
        yield ConfigError("access_log.max_bytes", config.access_log.max_bytes, "is too small", "use at least 4096")
    if not 0 <= config.access_log.backups <= 1000:
        yield ConfigError("access_log.backups", config.access_log.backups, "out of range", "use 0 to 1000")
    if not 0.1 <= config.config_file.poll_seconds <= 3600:
        yield ConfigError("config_file.poll_seconds", config.config_file.poll_seconds, "out of range",
                          "use a value between 0.1 and 3600 seconds")
    if config.log_level not in ("debug", "info", "warning", "error"):
        yield ConfigError("log_level", config.log_level, "unknown level", "use debug, info, warning or error")


def admin_allowed_sources(admin: AdminConfig) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """The networks of ``admin.allowed_sources``; ConfigError naming the entry that is not one."""
    networks = []
    for entry in (part.strip() for part in admin.allowed_sources.split(",")):
        if not entry:
            continue
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            raise ConfigError("admin.allowed_sources", entry, "is not a network",
                              "give comma-separated CIDRs, e.g. 10.0.5.0/24,10.0.9.17/32") from None
    return tuple(networks)


def _caught(check: Callable[..., Any], *args: Any) -> Iterator[ConfigError]:
    """The ConfigError ``check(*args)`` raises, as a problem among the others."""
    try:
        check(*args)
    except ConfigError as exc:
        yield exc


def _access_log_key(settings: AccessLogConfig) -> Iterator[ConfigError]:
    if not settings.key.startswith("/"):
        yield ConfigError("access_log.key", settings.key, "must be an absolute path",
                          f"for example {DEFAULT_ACCESS_LOG_KEY}")
    if settings.path.startswith("/"):
        log_dir = os.path.dirname(os.path.normpath(settings.path))
        key = os.path.normpath(settings.key)
        if key == log_dir or key.startswith(log_dir.rstrip("/") + "/"):
            yield ConfigError("access_log.key", settings.key, f"is inside the access log's directory ({log_dir}): "
                              "whoever can write the log could replace the key",
                              f"put it in a root-only directory elsewhere, for example {DEFAULT_ACCESS_LOG_KEY}")


def _deadlines_and_caps(proxy: ProxyConfig) -> Iterator[ConfigError]:
    if not 0.1 <= proxy.handshake_timeout_seconds <= 300:
        yield ConfigError("proxy.handshake_timeout_seconds", proxy.handshake_timeout_seconds, "out of range",
                          "use a value between 0.1 and 300 seconds")
    if proxy.tunnel_timeout_seconds != 0 and not 2 <= proxy.tunnel_timeout_seconds <= 3600:
        yield ConfigError("proxy.tunnel_timeout_seconds", proxy.tunnel_timeout_seconds, "out of range",
                          "use 0 (the kernel's defaults) or a value between 2 and 3600 seconds")
    if proxy.inbound_tunnel_idle_seconds < proxy.tunnel_idle_seconds + INBOUND_IDLE_MARGIN_SECONDS:
        yield ConfigError("proxy.inbound_tunnel_idle_seconds", proxy.inbound_tunnel_idle_seconds,
                          f"must be at least proxy.tunnel_idle_seconds + {INBOUND_IDLE_MARGIN_SECONDS:g} "
                          f"({proxy.tunnel_idle_seconds + INBOUND_IDLE_MARGIN_SECONDS:g}), or the receiving side "
                          "may close a tunnel the dialling side is about to use",
                          f"for example {2 * proxy.tunnel_idle_seconds:g}")
    if proxy.revoked_tunnel_grace_seconds < 0:
        yield ConfigError("proxy.revoked_tunnel_grace_seconds", proxy.revoked_tunnel_grace_seconds,
                          "must not be negative", "use 0 to close such tunnels at once")
    if proxy.stream_idle_timeout_seconds < 0:
        yield ConfigError("proxy.stream_idle_timeout_seconds", proxy.stream_idle_timeout_seconds,
                          "must not be negative", "use 0 to never reset idle connections")
    if proxy.buffer_budget_bytes != 0 and proxy.buffer_budget_bytes < MIN_BUFFER_BUDGET_BYTES:
        yield ConfigError("proxy.buffer_budget_bytes", proxy.buffer_budget_bytes,
                          f"is below {MIN_BUFFER_BUDGET_BYTES} bytes (two stream windows)",
                          f"use 0 (a quarter of the agent's cgroup memory limit) or at least {MIN_BUFFER_BUDGET_BYTES}")
    if not 1 <= proxy.buffer_identity_shares <= 1024:
        yield ConfigError("proxy.buffer_identity_shares", proxy.buffer_identity_shares, "out of range",
                          "use a number of identities between 1 and 1024 (default "
                          f"{DEFAULT_BUFFER_IDENTITY_SHARES})")
    for total, per in (("max_connections", "max_connections_per_identity"),
                       ("max_handshakes", "max_handshakes_per_source")):
        for name in (total, per):
            if getattr(proxy, name) < 0:
                yield ConfigError(f"proxy.{name}", getattr(proxy, name), "must not be negative", "use 0 for no cap")
        if getattr(proxy, total) > 0 and getattr(proxy, per) > getattr(proxy, total):  # a negative cap: said above
            yield ConfigError(f"proxy.{per}", getattr(proxy, per), f"exceeds proxy.{total} ({getattr(proxy, total)})",
                              f"lower it, or raise proxy.{total}")


def _identity(identity: IdentityConfig) -> Iterator[ConfigError]:
    minimum = DEV_MIN_TTL_SECONDS if identity.dev_short_ttl else MIN_TTL_SECONDS
    if identity.svid_ttl_seconds < minimum:
        hint = "" if identity.dev_short_ttl else (" (tests and development may set identity.dev_short_ttl: true "
                                                   f"to go down to {DEV_MIN_TTL_SECONDS} seconds)")
        yield ConfigError("identity.svid_ttl_seconds", identity.svid_ttl_seconds, "is too short",
                          f"use at least {minimum} seconds{hint}")
    if identity.mode not in IDENTITY_MODES:
        yield ConfigError("identity.mode", identity.mode, "unknown mode",
                          "use issuer (the node holds no signing key) or node_ca (legacy node intermediate)")
    if not 0.1 <= identity.poll_seconds <= 3600:
        yield ConfigError("identity.poll_seconds", identity.poll_seconds, "out of range",
                          "use a value between 0.1 and 3600 seconds")
    if identity.mode not in IDENTITY_MODES:
        return  # neither mode's settings can be judged
    if identity.mode == "issuer":
        if identity.ca_dir:
            yield ConfigError("identity.ca_dir", identity.ca_dir, "signs SVIDs with the root CA on this node, which "
                              "only identity.mode: node_ca does (identity.mode is issuer, the default)",
                              "set identity.mode: node_ca (development only), or remove identity.ca_dir")
        yield from _identity_issuer(identity.issuer)
        return
    if not identity.node_ca_dir and not identity.ca_dir:
        yield ConfigError("identity.node_ca_dir", identity.node_ca_dir, "is required",
                          "point it at this node's directory from `tcpmesh ca issue-node <node> --ca <root> --out <dir>`")


def _identity_issuer(issuer: IdentityIssuerConfig) -> Iterator[ConfigError]:
    if not issuer.addresses:
        yield ConfigError("identity.issuer.addresses", issuer.addresses, "is required with identity.mode: issuer "
                          "(the default: this node holds no signing key, the issuer signs its SVIDs)",
                          "list the issuer's host:port in identity.issuer.addresses, e.g. [issuer.tcpmesh.svc:15012] "
                          "or [10.0.0.5:15012]; or set identity.mode: node_ca to keep this node's legacy "
                          "intermediate (identity.node_ca_dir; docs/identity.md \"Migrating to the issuer\")")
    for i, address in enumerate(issuer.addresses):
        host, _, port = str(address).rpartition(":")
        if not isinstance(address, str) or not host or not port.isdigit() or not 0 < int(port) < 65536:
            yield ConfigError(f"identity.issuer.addresses[{i}]", address, "is not host:port",
                              "write it as host:port, e.g. 10.0.0.5:15012")
    if issuer.service_account_token_file and issuer.bootstrap_token_file:
        yield ConfigError("identity.issuer.service_account_token_file", issuer.service_account_token_file,
                          "and bootstrap_token_file are both set", "set one: Kubernetes nodes attest with the "
                          "service-account token, other nodes join with a bootstrap token")
    if not issuer.credential_dir:
        yield ConfigError("identity.issuer.credential_dir", issuer.credential_dir, "is required",
                          "point it at a directory the agent may write (0700), e.g. /var/lib/tcpmesh/node-credential")
    if not 0.5 <= issuer.timeout_seconds <= 120:
        yield ConfigError("identity.issuer.timeout_seconds", issuer.timeout_seconds, "out of range",
                          "use 0.5 to 120 seconds")
    if not 0 <= issuer.first_svid_wait_seconds <= 600:
        yield ConfigError("identity.issuer.first_svid_wait_seconds", issuer.first_svid_wait_seconds, "out of range",
                          "use 0 to 600 seconds (0: ready without waiting for the first SVIDs)")


def _ipv4(name: str, value: str, required: bool) -> Iterator[ConfigError]:
    if not value and not required:
        return
    try:
        ipaddress.IPv4Address(value)
    except ValueError:
        yield ConfigError(name, value, "must be an IPv4 address", "for example 10.0.0.1")


def _capture_paths(capture: CaptureConfig) -> Iterator[ConfigError]:
    """cgroup_root is auto or absolute; pods_cgroup and cgroup_scope live below it (never the root itself) — checked
    once auto is resolved (load_config; pure callers: resolve_cgroup_root first); bpffs_dir is absolute."""
    if capture.cgroup_root != CGROUP_ROOT_AUTO and not os.path.isabs(capture.cgroup_root):
        yield ConfigError("capture.cgroup_root", capture.cgroup_root, "must be auto or an absolute path",
                          f"leave it out ({CGROUP_ROOT_AUTO}: the host's cgroup v2 mount), or give the mount's "
                          "path, e.g. /sys/fs/cgroup")
        return  # nothing can be judged against it
    root = os.path.normpath(capture.cgroup_root)
    for name in ("pods_cgroup", "cgroup_scope"):
        value = getattr(capture, name)
        if not value:
            continue
        if capture.cgroup_root == CGROUP_ROOT_AUTO:
            if not os.path.isabs(value):
                yield ConfigError(f"capture.{name}", value, "must be an absolute path",
                                  "give the absolute path of a cgroup v2 directory")
            continue
        path = os.path.normpath(value)
        if not os.path.isabs(value) or not (path == root or path.startswith(root.rstrip("/") + "/")):
            yield ConfigError(f"capture.{name}", value, f"must be a directory inside capture.cgroup_root ({root})",
                              "give the absolute path of a cgroup v2 directory")
        if name == "pods_cgroup" and path == root:
            yield ConfigError("capture.pods_cgroup", value, "is the root cgroup: the guard would refuse the agent's "
                              "own connections too", "give the cgroup that holds the pods, e.g. .../kubepods.slice")
    if capture.bpffs_dir and not os.path.isabs(capture.bpffs_dir):
        yield ConfigError("capture.bpffs_dir", capture.bpffs_dir, "must be an absolute path",
                          "e.g. /sys/fs/bpf/tcpmesh/<node name>")
