"""The agent's configuration as typed, frozen values: every default a named constant, one dataclass per section of
the config file (docs/config.md). Data only — agent.config.mapping builds it from YAML, agent.config.environment
overrides it, agent.config.validation judges it, agent.config.load does all three in order.

Imports nothing of agent/ but agent.mounts (``capture.cgroup_root: auto``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from agent.mounts import CGROUP_ROOT_AUTO

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
SAME_NODE_CHOICES = ("local", "tunnel")
KERNEL_TLS_CHOICES = ("auto", "on", "off")  # agent.proxy.kernel_tls_probe  # agent.proxy.local; docs/performance-latency.md "Same-node connections"


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
    # Who seals and opens the tunnels' TLS records (docs/performance-latency.md "Kernel TLS in the agent"): auto —
    # the kernel (kernel TLS, both directions) when the start-up probe passes, else user space with one log line
    # saying why; on — the kernel, or the agent refuses to start; off — user space (OpenSSL), as before.
    kernel_tls: str = "auto"


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
