"""The agent's configuration: typed, frozen, loaded once (file, environment, host defaults), validated in one place.

Every default is a named constant below. Every error names the field, the value and the fix.
Reads one file, the environment and, for ``capture.cgroup_root: auto``, the mount table (agent.mounts);
imports nothing else from the outside world.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import yaml

from agent.errors import ConfigError, invalid_yaml, problems_of, refused
from agent.filetrust import UntrustedFileError, check_trusted_file
from agent.identity.spiffe import SpiffeIdError, validate_trust_domain
from agent.identity.svid import DEV_MIN_TTL_SECONDS, MIN_TTL_SECONDS
from agent.mounts import CGROUP_ROOT_AUTO, MOUNTS_FILE, Cgroup2, cgroup_root_path, host_cgroup2

DEFAULT_CONFIG_PATH = "/etc/tcpmesh/config.yaml"
DEFAULT_OUTBOUND_PORT = 15001
DEFAULT_INBOUND_PORT = 15008
DEFAULT_ADMIN_PORT = 15020
DEFAULT_ADMIN_ADDRESS = "127.0.0.1"
# capture.cgroup_root: the host's cgroup v2 mount (agent.mounts; none mounted: where doctor's fix mounts it)
DEFAULT_CGROUP_ROOT = CGROUP_ROOT_AUTO
DEFAULT_STATE_DIR = "/run/tcpmesh"
DEFAULT_SVID_TTL_SECONDS = 3600
DEFAULT_NODE_CA_DIR = "/etc/tcpmesh/node-ca"
DEFAULT_IDENTITY_POLL_SECONDS = 5.0
DEFAULT_FIRST_SVID_WAIT_SECONDS = 30.0  # well inside the unit's TimeoutStartSec=120s
DEFAULT_CONNECT_TIMEOUT_SECONDS = 5.0
DEFAULT_DRAIN_SECONDS = 5.0
DEFAULT_TUNNEL_IDLE_SECONDS = 60.0
# docs/reliability.md: deadlines and caps against silent, vanished or hostile peers
DEFAULT_HANDSHAKE_TIMEOUT_SECONDS = 5.0
DEFAULT_TUNNEL_TIMEOUT_SECONDS = 30.0
DEFAULT_INBOUND_TUNNEL_IDLE_SECONDS = 2 * DEFAULT_TUNNEL_IDLE_SECONDS
INBOUND_IDLE_MARGIN_SECONDS = 10.0  # over tunnel_idle_seconds: the outbound pool reaps every 5 s
DEFAULT_STREAM_IDLE_TIMEOUT_SECONDS = 3600.0  # Envoy's tcp_proxy default
DEFAULT_MAX_CONNECTIONS = 32768
DEFAULT_MAX_CONNECTIONS_PER_IDENTITY = 16384
DEFAULT_REVOKED_TUNNEL_GRACE_SECONDS = 600.0
DEFAULT_MAX_HANDSHAKES = 2048  # unauthenticated TLS handshakes on the inbound port, at once
DEFAULT_MAX_HANDSHAKES_PER_SOURCE = 256  # the same, per source address
DEFAULT_BUFFER_IDENTITY_SHARES = 8  # identities sure of their share of the buffer budget at once
MIN_BUFFER_BUDGET_BYTES = 8 * 1024 * 1024  # agent.proxy.budget.MIN_BUDGET: two 4 MiB windows
DEFAULT_REGISTRY_POLL_SECONDS = 2.0
DEFAULT_POLICY_POLL_SECONDS = 2.0
DEFAULT_CONFIG_WATCH_POLL_SECONDS = 2.0  # kubelet swaps a ConfigMap's ..data within ~a minute; this adds ≤ 2 s
DEFAULT_ADMIN_SOCKET = "/run/tcpmesh/agent.sock"
DEFAULT_REPORT_INTERVAL_SECONDS = 2.0
DEFAULT_ACCESS_LOG = "-"  # stdout
DEFAULT_ACCESS_LOG_MAX_BYTES = 100 * 1024 * 1024
DEFAULT_ACCESS_LOG_BACKUPS = 5
DEFAULT_ACCESS_LOG_KEY = "/var/lib/tcpmesh/audit.key"  # outside the log's directory, root only
CAPTURE_MODES = ("auto", "ebpf-connect", "ebpf-tc", "iptables", "none")
REGISTRY_SOURCES = ("file", "kubernetes")
IDENTITY_MODES = ("node_ca", "issuer")
ENV_PREFIX = "TCPMESH_"
_INTEGER = re.compile(r"[+-]?[0-9]+")


@dataclass(frozen=True)
class NodeConfig:
    name: str = ""
    address: str = ""  # this node's address on the inter-node network (where peers dial 15008)


@dataclass(frozen=True)
class IdentityIssuerConfig:
    # identity.mode issuer (docs/identity.md "The agent and the issuer"): where the issuer listens
    # (host:port, tried in turn), and this node's credential directory (credential.crt, credential.key,
    # bundle.pem: `tcpmesh ca issue-node-credential`, or written at join with the bootstrap token).
    addresses: list = field(default_factory=list)
    credential_dir: str = "/var/lib/tcpmesh/node-credential"
    ca_bundle: str = ""              # the trust bundle (root ca.crt); empty: <credential_dir>/bundle.pem
    bootstrap_token_file: str = ""   # a one-time token (`tcpmesh issuer token <node>`), used when no credential
    # Kubernetes: the agent pod's projected service-account token (audience tcpmesh-issuer); set, every
    # node SVID (join and renewal) is obtained by attestation with the token as the kubelet last wrote it
    service_account_token_file: str = ""
    timeout_seconds: float = 10.0
    # At start the agent reports ready (systemd READY=1, /readyz) once every local identity has its first
    # SVID, or after this many seconds: then ready with an error naming the identities still waiting (one
    # refused identity must not hold the node "activating"). Not joined yet: not ready, however long.
    first_svid_wait_seconds: float = DEFAULT_FIRST_SVID_WAIT_SECONDS


@dataclass(frozen=True)
class IdentityConfig:
    # "issuer" (the default: this node holds a node credential only; the issuer signs its workloads'
    # SVIDs for the identities the registry places here; identity.issuer.addresses is required) or
    # "node_ca" (legacy, named explicitly: this node holds a node intermediate that can sign any identity
    # of the trust domain). docs/identity.md "Migrating to the issuer".
    mode: str = "issuer"
    issuer: IdentityIssuerConfig = field(default_factory=IdentityIssuerConfig)
    # The node CA directory of `tcpmesh ca issue-node` (node.crt, node.key, bundle.pem): the agent
    # signs its own workloads' SVIDs with this node intermediate and never holds the root key.
    node_ca_dir: str = DEFAULT_NODE_CA_DIR
    # Development only: sign SVIDs with the root CA in this directory (`tcpmesh ca init`) instead of a
    # node intermediate; the agent then holds the root key and says so in its log. Empty: not used.
    ca_dir: str = ""
    svid_ttl_seconds: int = DEFAULT_SVID_TTL_SECONDS
    # Tests and development only: allow svid_ttl_seconds down to 2 s (instead of 60), to watch SVIDs
    # renew within seconds. Each renewal costs a key pair, a signature and two TLS contexts.
    dev_short_ttl: bool = False
    # How often node_ca_dir is checked for replaced files (a re-issued intermediate, a rotated root).
    poll_seconds: float = DEFAULT_IDENTITY_POLL_SECONDS


@dataclass(frozen=True)
class RegistryConfig:
    # "file": the static file below (systemd, Vagrant); "kubernetes": pods and nodes from the API
    # server (list + watch; agent/registry/kubernetes/, docs/install-kubernetes.md).
    source: str = "file"
    file: str = "/etc/tcpmesh/workloads.yaml"
    poll_seconds: float = DEFAULT_REGISTRY_POLL_SECONDS  # how often the file is checked for changes
    # source kubernetes: a kubeconfig file; empty: the pod's service account (in-cluster config).
    kubeconfig: str = ""


@dataclass(frozen=True)
class CaptureConfig:
    # "auto": the best mode this host supports, by probe (ebpf-connect > ebpf-tc > iptables;
    #   `tcpmesh doctor` shows which and why).
    # "ebpf-connect": cgroup connect4 + sockops + getsockopt + getpeername4 (docs/capture-connect.md).
    # "ebpf-tc": tc sk_assign on the pods' node-side veths onto an IP_TRANSPARENT listener.
    # "iptables": netfilter TPROXY (nft, iptables-nft or iptables-legacy) in the node netns.
    # "none": no capture at all (a laptop switch: the proxies run, nothing is steered to them).
    mode: str = "auto"
    # Address the connect4 hook rewrites captured destinations to: local to the node and reachable
    # from every pod (the pods' gateway address, or the node address).
    redirect_address: str = ""
    # The cgroup v2 mount: where the agent's own cgroup, pods_cgroup, cgroup_scope and (Kubernetes) the pods'
    # cgroups are found. "auto" (the default): the host's, found in /proc/self/mounts as `tcpmesh doctor` finds
    # it — /sys/fs/cgroup on a unified host (Debian 11+, Ubuntu 21.10+), /sys/fs/cgroup/unified on a hybrid
    # one, and where `tcpmesh doctor` says to mount it when none is. load_config resolves it, so every reader
    # sees a path. A path: used as written; `tcpmesh run` refuses one that is not the host's cgroup v2 mount.
    cgroup_root: str = DEFAULT_CGROUP_ROOT
    # Cgroup v2 directory the proxy's own sockets live in (the getsockopt hook goes there).
    # Empty: the agent's own cgroup, read from /proc/self/cgroup.
    proxy_cgroup: str = ""
    # ebpf-connect: the cgroup v2 directory that contains every pod (kubepods.slice on Kubernetes).
    # The node guard goes there: TCP connects of pods below it that are not captured (yet) are
    # refused. Must not contain the agent's own cgroup, unless guard_exempt_host_network. Empty: no
    # guard (docs/capture-restart.md).
    pods_cgroup: str = ""
    # ebpf-connect: the guard lets TCP connects from sockets of the agent's own network namespace
    # through — on Kubernetes the hostNetwork pods (the agent itself, kube-proxy, the CNI) sit below
    # kubepods too and are never meshed. Only where no workload shares the agent's netns (the
    # DaemonSet turns it on; docs/install-kubernetes.md). Linux 5.14+ (SO_NETNS_COOKIE).
    guard_exempt_host_network: bool = False
    # ebpf-connect: where programs and maps are pinned in bpffs. Empty: /sys/fs/bpf/tcpmesh/<node.name>.
    bpffs_dir: str = ""
    # The part of the cgroup tree `tcpmesh cleanup` searches for tcpmesh programs. Empty: cgroup_root
    # (the whole node); the lab sets its node's subtree so labs on one host stay apart.
    cgroup_scope: str = ""
    # ebpf-connect: mesh IPv6 (dual stack). false: a TCP connect to a workload's IPv6 address fails
    # with EPERM at connect() — never plaintext (docs/capture-connect.md, "Dual stack").
    ipv6: bool = True


SOURCE_ADDRESS_CHOICES = ("auto", "pod", "node")
SAME_NODE_CHOICES = ("local", "tunnel")  # agent.proxy.local; docs/performance-latency.md "Same-node connections"


@dataclass(frozen=True)
class ProxyConfig:
    bind_address: str = "0.0.0.0"
    outbound_port: int = DEFAULT_OUTBOUND_PORT
    inbound_port: int = DEFAULT_INBOUND_PORT
    connect_timeout_seconds: float = DEFAULT_CONNECT_TIMEOUT_SECONDS
    drain_seconds: float = DEFAULT_DRAIN_SECONDS
    tunnel_idle_seconds: float = DEFAULT_TUNNEL_IDLE_SECONDS  # an idle pooled tunnel is closed after this
    # Inbound: TCP accept → TLS established → first complete OPEN, or the tunnel is refused.
    handshake_timeout_seconds: float = DEFAULT_HANDSHAKE_TIMEOUT_SECONDS
    # A tunnel whose peer acknowledges nothing (data or keepalive probes) this long is lost and its
    # streams are reset (TCP keepalive + TCP_USER_TIMEOUT on both ends). 0: the kernel's defaults.
    tunnel_timeout_seconds: float = DEFAULT_TUNNEL_TIMEOUT_SECONDS
    # An inbound tunnel that carried no stream this long is closed (GOAWAY); above tunnel_idle_seconds,
    # so the dialling side always closes an idle tunnel first.
    inbound_tunnel_idle_seconds: float = DEFAULT_INBOUND_TUNNEL_IDLE_SECONDS
    # Inbound: once a tunnel's client chain expired or its root left the trust bundle, new streams are
    # refused (IDENTITY_ERROR) and the tunnel closes when its last stream ends — or this long after,
    # resetting the streams still open. 0: at once.
    revoked_tunnel_grace_seconds: float = DEFAULT_REVOKED_TUNNEL_GRACE_SECONDS
    # A connection that moved no byte either way this long is reset on both sides (flag SI). 0: never.
    stream_idle_timeout_seconds: float = DEFAULT_STREAM_IDLE_TIMEOUT_SECONDS
    # Concurrent connections per side (outbound: from local pods; inbound: streams from other nodes),
    # overall and per source identity; refusals count in tcpmesh_connection_limit_hits_total. 0: no cap.
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_connections_per_identity: int = DEFAULT_MAX_CONNECTIONS_PER_IDENTITY
    # Inbound TLS handshakes not yet authenticated (accept → verified client certificate), at once,
    # overall and per source address; the excess is reset at accept and counted in
    # tcpmesh_inbound_handshakes_refused_total. 0: no cap.
    max_handshakes: int = DEFAULT_MAX_HANDSHAKES
    max_handshakes_per_source: int = DEFAULT_MAX_HANDSHAKES_PER_SOURCE
    # Bytes held node-wide for workloads that do not read what they are sent (agent.proxy.budget): an
    # identity past its share has its tunnels paused, windows shrink as the budget fills. 0: a quarter of
    # the agent's cgroup memory limit (256 MiB without one). Half of it is split into this many
    # guaranteed shares; the other half is a pool.
    buffer_budget_bytes: int = 0
    buffer_identity_shares: int = DEFAULT_BUFFER_IDENTITY_SHARES
    event_loop: str = "uvloop"  # uvloop (faster data path) | asyncio (the standard library's loop)
    # The source address a pod sees on meshed connections (docs/capture-source-address.md):
    # pod — the client pod's own address (IP_TRANSPARENT leg + tc return path), the agent refuses to
    # start without it; node — the node's own address (the fallback: no transparent socket, no tc
    # program); auto — pod where the kernel allows it, else node with a warning (`tcpmesh doctor`).
    source_address: str = "auto"
    # A connection between two pods of this node (docs/performance-latency.md "Same-node connections"):
    # local — authorized and recorded in process, exactly as through the tunnel, then relayed straight to
    # the workload (its bytes never leave the host, so no TLS); tunnel — the mTLS tunnel to the node itself
    # and the inbound proxy, as between nodes (the fallback).
    same_node: str = "local"


@dataclass(frozen=True)
class PolicyConfig:
    dir: str = "/etc/tcpmesh/policies"  # AuthorizationPolicy / PeerAuthentication YAML files
    default_action: str = "ALLOW"  # for destinations no AuthorizationPolicy selects: ALLOW | DENY
    root_namespace: str = "tcpmesh-system"  # policies in this namespace apply to every workload
    poll_seconds: float = DEFAULT_POLICY_POLL_SECONDS
    outbound_passthrough: str = "ALLOW"  # outside the mesh: ALLOW (leaves from the pod itself) | DENY (EPERM)


@dataclass(frozen=True)
class AdminConfig:
    address: str = DEFAULT_ADMIN_ADDRESS
    port: int = DEFAULT_ADMIN_PORT
    socket: str = DEFAULT_ADMIN_SOCKET  # unix socket for `tcpmesh workload add|del|list`
    # Comma-separated networks (CIDR) besides the node itself that may connect to the admin port —
    # your Prometheus. Everyone else (pods included) is refused at accept and counted. Never list the
    # pods' networks: /metrics names every identity pair of the node.
    allowed_sources: str = ""


@dataclass(frozen=True)
class TelemetryConfig:
    # How often open connections' bytes reach the counters, /debug/flows and `tcpmesh flows`.
    report_interval_seconds: float = DEFAULT_REPORT_INTERVAL_SECONDS
    # Kernel TCP stats (RTT, retransmits) of the proxy's connections from sockops (bpf/tcp_stats.c):
    # "auto": on with an eBPF-capable capture mode, a failure only logged; "on": required; "off".
    tcp_stats: str = "auto"


@dataclass(frozen=True)
class AccessLogConfig:
    # "-": stdout; an absolute path: a file rotated by size (path.1 … path.<backups>); "off": none.
    path: str = DEFAULT_ACCESS_LOG
    max_bytes: int = DEFAULT_ACCESS_LOG_MAX_BYTES
    backups: int = DEFAULT_ACCESS_LOG_BACKUPS
    log_open: bool = False  # also write a record when a connection opens (always one at close)
    # The HMAC keys the records are chained with (agent/audit/keys.py): created 0600 at first start,
    # rotated with `tcpmesh audit rotate-key`. Must not be inside the log's directory.
    key: str = DEFAULT_ACCESS_LOG_KEY


@dataclass(frozen=True)
class ConfigFileConfig:
    # watch: the agent applies its own config file when it changes (the file's inode, size and mtime
    # after following symlinks, so a kubelet ConfigMap update — the ..data symlink swap — counts), as
    # `tcpmesh identity reload` would: what can change at runtime does, fields that need a restart are
    # named, a file that does not validate is refused and the last good config keeps running
    # (docs/identity.md "Reloading the config"). Off by default: on a VM the operator reloads
    # explicitly (`systemctl reload tcpmesh-agent`), so a half-saved edit is never applied; the
    # DaemonSet's ConfigMap turns it on (a ConfigMap edit cannot run a command in every agent pod).
    watch: bool = False
    poll_seconds: float = DEFAULT_CONFIG_WATCH_POLL_SECONDS


@dataclass(frozen=True)
class Config:
    trust_domain: str = "cluster.local"
    state_dir: str = DEFAULT_STATE_DIR
    log_level: str = "info"
    node: NodeConfig = field(default_factory=NodeConfig)
    identity: IdentityConfig = field(default_factory=IdentityConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    capture: CaptureConfig = field(default_factory=CaptureConfig)
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    access_log: AccessLogConfig = field(default_factory=AccessLogConfig)
    config_file: ConfigFileConfig = field(default_factory=ConfigFileConfig)


def load_agent_config(path: str | Path, environ: Mapping[str, str] | None = None, *,
                      mounts_file: str = MOUNTS_FILE) -> Config:
    """``load_config`` for the agent itself (start and reload): the file, and every directory above it, must be
    changeable by root or the agent's user only (``agent.filetrust``) — whoever can write it decides where the
    policies and the registry come from and what is captured. And an explicit ``capture.cgroup_root`` must be the
    host's cgroup v2 mount (``check_cgroup_root``). Other commands read it with ``load_config``."""
    try:
        check_trusted_file(path, "--config", decides="where the agent's policies, registry and identities come from",
                           process="the agent")
    except UntrustedFileError as exc:
        raise ConfigError(f"{path}: --config", str(path), exc.problem) from exc
    cgroup2 = host_cgroup2(mounts_file)  # one read of the mount table: resolves auto, checks an explicit root
    config = load_config(path, environ, cgroup2=cgroup2)
    try:
        return check_cgroup_root(config, cgroup2.mount)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc.field}", exc.value, exc.problem, exc.fix) from None


def check_cgroup_root(config: Config, mount: str | None) -> Config:
    """Pure: ``config`` unless its ``capture.cgroup_root`` is not ``mount``, the host's cgroup v2 mount (None: the
    host has none, left to the ebpf-connect check and `tcpmesh doctor`). Capture mode none captures nothing and
    keeps any root (laptop runs, in-process tests). Without this, ``capture.mode: auto`` judged ebpf-connect
    unusable and ran in ebpf-tc, and the Kubernetes source found no pod's cgroup — with no word of the cause."""
    root = config.capture.cgroup_root
    if mount is None or config.capture.mode == "none" or os.path.realpath(root) == os.path.realpath(mount):
        return config
    raise ConfigError("capture.cgroup_root", root, f"is not this host's cgroup v2 mount, {mount}: the agent would "
                      "not find its own cgroup nor the pods' there (and capture.mode auto would rule ebpf-connect "
                      "out)", f"set capture.cgroup_root to {mount}, or to {CGROUP_ROOT_AUTO} (the default: the "
                      "host's mount, as `tcpmesh doctor` finds it)")


def resolve_cgroup_root(config: Config, cgroup2: Cgroup2) -> Config:
    """Pure: ``capture.cgroup_root: auto`` made ``cgroup2.place`` (the host's cgroup v2 mount; not mounted: where
    this host's layout puts it, as doctor's fix says); any other value is kept as written."""
    if config.capture.cgroup_root != CGROUP_ROOT_AUTO:
        return config
    return replace(config, capture=replace(config.capture, cgroup_root=cgroup_root_path(CGROUP_ROOT_AUTO, cgroup2)))


def load_config(path: str | Path, environ: Mapping[str, str] | None = None, *,
                mounts_file: str = MOUNTS_FILE, cgroup2: Cgroup2 | None = None) -> Config:
    """Read ``path`` (YAML), apply ``TCPMESH_<SECTION>_<FIELD>`` environment overrides, resolve
    ``capture.cgroup_root: auto`` with the host's cgroup v2 (``cgroup2``, else read from ``mounts_file`` — only
    when the root is auto), validate."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError("--config", str(path), f"cannot read the config file: {exc.strerror}",
                          "pass --config with the path of an existing YAML file") from exc
    try:
        doc = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise invalid_yaml(path, text, exc) from None
    try:
        environ = os.environ if environ is None else environ
        check_environment(environ)
        config = apply_environment(config_from_mapping(doc, source=str(path)), environ)
        if config.capture.cgroup_root == CGROUP_ROOT_AUTO:
            config = resolve_cgroup_root(config, cgroup2 or host_cgroup2(mounts_file))
        return validate(config)
    except ConfigError as exc:  # say which file (or which environment variable) holds each wrong value
        raise refused([_located(error, path) for error in problems_of(exc)], where=str(path)) from None


def _located(error: ConfigError, path: Path) -> ConfigError:
    where = (f"{error.field} (environment, overrides {path})" if error.field.startswith(ENV_PREFIX)
             else error.field if error.field == str(path) else f"{path}: {error.field}")
    return ConfigError(where, error.value, error.problem, error.fix)


def config_from_mapping(doc: Any, source: str = "config") -> Config:
    if not isinstance(doc, dict):
        raise ConfigError(source, type(doc).__name__, "the config must be a YAML mapping")
    return _build(Config, doc, prefix="")


def _build(cls: type, doc: Mapping[str, Any], prefix: str) -> Any:
    """``cls`` from the mapping ``doc``, or every unknown key and wrongly typed value of it at once (refused)."""
    errors: list[ConfigError] = []
    built = _build_into(cls, doc, prefix, errors)
    if errors:
        raise refused(errors)
    return built


def _build_into(cls: type, doc: Mapping[str, Any], prefix: str, errors: list[ConfigError]) -> Any:
    known = {f.name: f for f in fields(cls)}
    values: dict[str, Any] = {}
    for key, value in doc.items():
        name = f"{prefix}{key}" if isinstance(key, str) and key else f"{prefix}{key!r}"  # '' or 1 as a key: say so
        if key not in known:
            errors.append(ConfigError(name, value, "unknown setting", f"known settings here: {', '.join(sorted(known))}"))
            continue
        default = getattr(cls(), key)
        if is_dataclass(default) and not isinstance(value, dict):
            errors.append(ConfigError(name, value, "must be a mapping"))
        elif is_dataclass(default):
            values[key] = _build_into(type(default), value, f"{name}.", errors)
        else:
            try:
                values[key] = _coerce(name, value, type(default))
            except ConfigError as exc:
                errors.append(exc)
    return cls(**values)


def _coerce(name: str, value: Any, kind: type) -> Any:
    if kind is bool and isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.lower() in ("true", "1", "yes")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value) if abs(value) < 2 ** 1023 else float("inf")  # float() raises OverflowError beyond
    if kind is int and isinstance(value, str) and _INTEGER.fullmatch(value.strip()):
        return int(value)  # ASCII digits only: "--5" or "²" passed isdigit() and crashed int() (fuzzing found it)
    if kind is float and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if kind is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(name, value, "must be a finite number")  # NaN slipped through every range check
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(name, value, f"must be of type {kind.__name__}", _TYPE_FIXES.get(kind, ""))
    return value


_TYPE_FIXES = {  # how to write each kind of value in YAML (or in a TCPMESH_* variable, for scalars)
    list: "write a YAML list, e.g. [a, b], or one '- item' per line below the key",
    int: "write a whole number without quotes or units, e.g. 15001",
    float: "write a number of seconds (or of the field's unit), e.g. 5 or 0.5",
    bool: "write true or false",
    str: "write a single value (quote it if it contains ': ' or starts with '[', '{' or '*'), not a list or mapping",
}


def admin_socket_setting(doc: Any, environ: Mapping[str, str]) -> str:
    """admin.socket from a config file's raw YAML ``doc`` that may not validate as a whole (pure): the
    ``TCPMESH_ADMIN_SOCKET`` override, else a non-empty string at ``admin.socket``, else the default."""
    override = environ.get(f"{ENV_PREFIX}ADMIN_SOCKET".upper())
    if override:
        return override
    admin = doc.get("admin") if isinstance(doc, dict) else None
    value = admin.get("socket") if isinstance(admin, dict) else None
    return value if isinstance(value, str) and value else DEFAULT_ADMIN_SOCKET


def environment_fields() -> dict[str, str]:
    """``TCPMESH_<SECTION>_<FIELD>`` (``TCPMESH_<FIELD>`` at the top level) → the field it sets, e.g.
    ``TCPMESH_PROXY_SOURCE_ADDRESS`` → ``proxy.source_address``: every field but those of a section's own sections
    (identity.issuer.*, set in the file only)."""
    names: dict[str, str] = {}
    defaults = Config()
    for top in fields(Config):
        default = getattr(defaults, top.name)
        if not is_dataclass(default):
            names[f"{ENV_PREFIX}{top.name}".upper()] = top.name
            continue
        for sub in fields(default):
            if not is_dataclass(getattr(default, sub.name)):
                names[f"{ENV_PREFIX}{top.name}_{sub.name}".upper()] = f"{top.name}.{sub.name}"
    return names


def apply_environment(config: Config, environ: Mapping[str, str]) -> Config:
    """``TCPMESH_NODE_NAME=node1`` sets node.name; ``TCPMESH_TRUST_DOMAIN`` sets trust_domain (``environment_fields``)."""
    for env_name, path in environment_fields().items():
        if env_name not in environ:
            continue
        section, _, leaf = path.rpartition(".")
        if not section:
            config = replace(config, **{leaf: _coerce(env_name, environ[env_name], type(getattr(config, leaf)))})
            continue
        current = getattr(config, section)
        value = _coerce(env_name, environ[env_name], type(getattr(current, leaf)))
        config = replace(config, **{section: replace(current, **{leaf: value})})
    return config


# TCPMESH_* variables that are no config field, and who reads them: the check below lets them be. A new one
# goes here (tests/unit/test_config_environment.py finds every TCPMESH_ name of the repository).
NON_CONFIG_ENV: dict[str, str] = {
    "TCPMESH_CONFIG_FILE": "systemd/tcpmesh-agent.service: the --config path of ExecStart (/etc/default/tcpmesh)",
    "TCPMESH_ISSUER_CONFIG": "systemd/tcpmesh-issuer.service: the issuer's --config path",
    "TCPMESH_LAB": "the lab `tcpmesh lab` and --node default to (agent/lab/topology.py)",
    "TCPMESH_LAB_OWNER_PID": "the process that owns a lab (agent/lab/owner.py)",
    "TCPMESH_LAB_ARCHIVE_DIR": "where `tcpmesh lab down` keeps logs (agent/lab/cli.py)",
    "TCPMESH_SOCKET": "the admin socket the operator commands ask (agent/control/target.py)",
    "TCPMESH_DOCTOR_DISABLE": "checks `tcpmesh doctor` treats as missing (agent/host/doctor.py)",
    "TCPMESH_HOTPATH": "the tunnel data path, compiled or python (agent/proxy/hotpath.py)",
    "TCPMESH_DEMO_ENV": "the Vagrant demo's environment file (vagrant/demo_node.py)",
    "TCPMESH_ROOT": "the prefix of every path vagrant/provision.sh writes",
    "TCPMESH_BOX": "vagrant/Vagrantfile: the box", "TCPMESH_SUBNET": "vagrant/Vagrantfile: the host-only subnet",
    "TCPMESH_CPUS": "vagrant/Vagrantfile: CPUs per VM", "TCPMESH_MEMORY": "vagrant/Vagrantfile: memory per VM",
    "TCPMESH_REQUIRE_PRIVILEGED": "tests: every capability skip is a failure (.ci/run)",
    "TCPMESH_TEST_TIME_SCALE": "tests: multiplies their time bounds (VM guests)",
    "TCPMESH_VM_CACHE": "tests/vm: the image cache", "TCPMESH_VM_MIRROR": "tests/vm: the Debian mirror",
    "TCPMESH_VM_ACCEL": "tests/vm: tcg or kvm", "TCPMESH_VM_LOGS": "tests/vm: where the guests' outputs go",
    "TCPMESH_RELIABILITY_FIGURES": "tests/e2e: where the reliability figures go",
    "TCPMESH_LOAD_FULL": "tests/e2e: the full-size load test", "TCPMESH_INTERRUPT_READY": "tests/e2e: interrupt_target",
    "TCPMESH_BENCH_REPORT": "tests/e2e: where test_real_workloads writes its report",
}
_SERVICE_LINK = re.compile(r"_(SERVICE_HOST|SERVICE_PORT(_[A-Z0-9_]+)?|PORT|PORT_[0-9]+_(TCP|UDP|SCTP)"
                           r"(_PROTO|_PORT|_ADDR)?)$")


def check_environment(environ: Mapping[str, str]) -> None:
    """Pure: refuse every ``TCPMESH_*`` variable that is neither a config field (``environment_fields``), nor in
    ``NON_CONFIG_ENV``, nor one of the Kubernetes service links of a Service named tcpmesh-*, each with the closest
    known name. Refused rather than warned about, as an unknown key of the file is: a misspelled override would
    otherwise run the node on the default it meant to change (docs/config.md "Environment")."""
    known = environment_fields()
    nested = _nested_sections()
    candidates = {name[len(ENV_PREFIX):]: name for name in [*known, *NON_CONFIG_ENV]}
    errors = []
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or name in known or name in NON_CONFIG_ENV \
                or _kubernetes_service_link(name, environ[name]):
            continue
        section = next((path for path in nested if name.startswith(_env_name(path) + "_")), None)
        if section:
            errors.append(ConfigError(name, environ[name], f"sets a field of {section}, which only the config file "
                                      "can set", f"write it under {section} in the config file and remove the "
                                      "variable (docs/config.md)"))
            continue
        close = [candidates[c] for c in difflib.get_close_matches(name[len(ENV_PREFIX):], candidates, n=1, cutoff=0.75)]
        hint = f"did you mean {close[0]}{f' ({known[close[0]]})' if close[0] in known else ''}? " if close else ""
        errors.append(ConfigError(name, environ[name], "is not a tcpmesh setting: the agent would run as if it were "
                                  "not set", f"{hint}a config field is TCPMESH_<SECTION>_<FIELD> (docs/config.md "
                                  "\"Environment\"); rename or remove the variable"))
    if errors:
        raise refused(errors)


def _env_name(path: str) -> str:
    return f"{ENV_PREFIX}{path.replace('.', '_')}".upper()


def _nested_sections() -> list[str]:
    """Sections of a section (identity.issuer): their fields are set in the file only."""
    config = Config()
    return [f"{top.name}.{sub.name}" for top in fields(config) if is_dataclass(section := getattr(config, top.name))
            for sub in fields(section) if is_dataclass(getattr(section, sub.name))]


def _kubernetes_service_link(name: str, value: str) -> bool:
    """The kubelet's variables for a Service (``<NAME>_SERVICE_HOST``, ``<NAME>_PORT=tcp://…``, …), by name and
    value: a Service named tcpmesh-issuer in the agent's namespace gives each of its pods eight of them."""
    found = _SERVICE_LINK.search(name)
    if found is None:
        return False
    kind = found.group(1)
    if kind.endswith(("SERVICE_HOST", "_ADDR")):
        try:
            ipaddress.ip_address(value)
        except ValueError:
            return False
        return True
    if kind.startswith("SERVICE_PORT") or kind.endswith("_PORT"):
        return value.isdigit()
    if kind.endswith("_PROTO"):
        return value in ("tcp", "udp", "sctp")
    return re.fullmatch(r"(tcp|udp|sctp)://\S+:[0-9]+", value) is not None  # <NAME>_PORT, <NAME>_PORT_<n>_<PROTO>


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
        if getattr(proxy, total) and getattr(proxy, per) > getattr(proxy, total):
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


build_dataclass = _build  # the issuer's config (agent/issuer/config.py) is read the same way
