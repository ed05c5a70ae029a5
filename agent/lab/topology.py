"""The plan of a lab: every name, address, cgroup and file of a namespace cluster, computed up front.

Pure: ``plan_lab`` turns (name, node count, pods per node, trust domain) into frozen dataclasses and
validates the input; nothing here touches the kernel or the file system. ``netns_plumbing``,
``cgroups`` and ``lab`` realise a plan; ``lab down`` and ``lab status`` read the same names back.
The layout is documented in docs/lab.md.

    wire netns  tcpmesh-<lab>-wire   bridge tmbr0, one port tm<node> per node
    node netns  tcpmesh-<lab>-node<i>  tmwire 10.76.0.<i>/24 and fd00:76::<i>/64 (admin :15020),
                                        forwarding on for both families,
                                        tm<pod> 169.254.1.1/32 and fe80::1/64 + routes to the pod's
                                        <ip>/32 and <ip6>/128 per pod,
                                        routes 10.77.<k>.0/24 via 10.76.0.<k> and fd00:77:<k>::/64
                                        via fd00:76::<k> per other node
    pod netns   tcpmesh-<lab>-n<i>p<j>  eth0 10.77.<i>.<10+j>/32 and fd00:77:<i>::<10+j>/128 (dual
                                        stack, ULA), 169.254.1.1 scope link, default via it;
                                        default6 via fe80::1

    cgroups     <cgroup root>/tcpmesh-lab-<lab>/node<i>/agent          the agent (outside the pods cgroup)
                <cgroup root>/tcpmesh-lab-<lab>/node<i>/pods           the node guard's cgroup
                <cgroup root>/tcpmesh-lab-<lab>/node<i>/pods/n<i>p<j>  one per pod (the registry's cgroup)
                .../pods/n<i>p<j>/{pause,app}  its containers, as the kubelet makes them: the pod's
                                               processes run in app/, none in the pod cgroup itself
                                               (--flat-pods: no containers, processes in the pod cgroup)
    pins        /sys/fs/bpf/tcpmesh-lab-<lab>/node<i>                  the agent's capture.bpffs_dir

Must not import pyroute2, socket, subprocess or anything else that does I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

from agent.errors import ConfigError
from agent.mounts import UNIFIED_MOUNT
from agent.identity.spiffe import SpiffeId, SpiffeIdError, validate_namespace, validate_service_account, \
    validate_trust_domain

DEFAULT_TRUST_DOMAIN = "lab.tcpmesh"
DEFAULT_NAMESPACE = "lab"
DEFAULT_LAB_NAME = "lab"
# `export TCPMESH_LAB=NAME` names the lab once: `tcpmesh lab --name` and `--node` of the commands that
# ask an agent (agent/control/target.py) default to it.
LAB_NAME_ENV = "TCPMESH_LAB"
# pure plans only (unit tests, docs/lab.md's example: a stock Debian 12 node's mount): `tcpmesh lab up` plans
# with the host's cgroup v2 mount (agent.mounts, as capture.cgroup_root auto) and writes it into each agent's config
DEFAULT_CGROUP_ROOT = UNIFIED_MOUNT
DEFAULT_STATE_ROOT = "/run/tcpmesh-lab"
ADMIN_PORT = 15020
NETNS_PREFIX = "tcpmesh-"          # netns: tcpmesh-<lab>-<role>
CGROUP_PREFIX = "tcpmesh-lab-"     # cgroup: <cgroup root>/tcpmesh-lab-<lab>/<node>/{agent,pods/<pod>}
BPFFS_ROOT = "/sys/fs/bpf"         # pins: <bpffs root>/tcpmesh-lab-<lab>/<node>
VETH_PREFIX = "tm"                 # every veth/bridge the lab creates (pod side is always eth0)
WIRE_SUBNET_PREFIX = "10.76.0"     # node i: 10.76.0.<i>/24
WIRE_PREFIXLEN = 24
POD_SUBNET_PREFIX = "10.77"        # pods of node i: 10.77.<i>.0/24, pod j: 10.77.<i>.<10+j>
POD_FIRST_HOST = 10
POD_GATEWAY = "169.254.1.1"        # Calico-style link-local gateway on every node-side pod veth
POD_GATEWAY6 = "fe80::1"           # its IPv6 counterpart (link-local, on every node-side pod veth)
WIRE6_PREFIX = "fd00:76::"         # node i: fd00:76::<i>/64 (ULA)
WIRE6_PREFIXLEN = 64
POD6_PREFIX = "fd00:77"            # pods of node i: fd00:77:<i>::/64, pod j: fd00:77:<i>::<10+j>
BRIDGE_IFNAME = "tmbr0"
NODE_WIRE_IFNAME = "tmwire"
POD_IFNAME = "eth0"
AGENT_CGROUP_LEAF = "agent"
PODS_CGROUP_LEAF = "pods"
CONTAINER_LEAVES = ("pause", "app")  # one child cgroup per container; lab exec runs in the last
IFNAME_MAX = 15
MAX_NODES = 254
MAX_PODS_PER_NODE = 254 - POD_FIRST_HOST
# A lab name ends up in netns names, cgroup and directory names; keep it short and shell-safe.
_LAB_NAME = re.compile(r"^[a-z][a-z0-9-]{0,19}$")
_ROLE = re.compile(r"^(wire|issuer|node[0-9]+|n[0-9]+p[0-9]+)$")


@dataclass(frozen=True)
class PodPlan:
    name: str            # n<i>p<j>
    node: str            # node<i>
    netns: str
    ip: str              # 10.77.<i>.<10+j>, a /32 on eth0 in the pod netns
    ip6: str             # fd00:77:<i>::<10+j>, a /128 on eth0 (dual stack)
    ifname: str          # pod side of the veth (eth0)
    node_ifname: str     # node side of the veth (tm<pod>), carries POD_GATEWAY/32
    cgroup: str          # absolute cgroup v2 directory of the pod (the registry's; capture attaches here)
    namespace: str
    service_account: str
    spiffe_id: str
    containers: tuple[str, ...] = ()  # child cgroups, one per container (empty: a flat pod)

    @property
    def exec_cgroup(self) -> str:
        """Where the pod's processes run: its last container's cgroup, or the pod cgroup when flat."""
        return self.containers[-1] if self.containers else self.cgroup


@dataclass(frozen=True)
class NodePlan:
    index: int
    name: str             # node<i>
    netns: str
    wire_address: str     # 10.76.0.<i>
    wire_address6: str    # fd00:76::<i>
    wire_ifname: str      # in the node netns
    bridge_port: str      # peer of wire_ifname, in the wire netns, enslaved to the bridge
    pod_cidr: str         # 10.77.<i>.0/24
    admin_address: str    # <wire_address>:15020
    cgroup: str           # <lab cgroup>/<node>
    agent_cgroup: str     # <lab cgroup>/<node>/agent; never inside the pods cgroup
    pods_cgroup: str      # <lab cgroup>/<node>/pods: parent of the node's pod cgroups, the guard's place
    bpffs_dir: str        # <lab bpffs dir>/<node>: where the node's agent pins its programs and maps
    state_dir: str        # the agent's state_dir
    config_file: str
    log_file: str
    pods: tuple[PodPlan, ...]
    routes: tuple[tuple[str, str], ...]   # (other node's pod cidr, its wire address)
    routes6: tuple[tuple[str, str], ...] = ()  # (other node's IPv6 pod prefix, its IPv6 wire address)


@dataclass(frozen=True)
class LabPlan:
    name: str
    trust_domain: str
    namespace: str
    wire_netns: str
    bridge: str
    wire_subnet: str
    pod_gateway: str
    cgroup_root: str      # the cgroup v2 mount
    cgroup: str           # <cgroup root>/tcpmesh-lab-<name>
    bpffs_dir: str        # /sys/fs/bpf/tcpmesh-lab-<name>: every node's pins below it
    state_dir: str        # <state root>/<name>
    ca_dir: str
    registry_file: str
    state_file: str
    nodes: tuple[NodePlan, ...]

    @property
    def pods(self) -> tuple[PodPlan, ...]:
        return tuple(pod for node in self.nodes for pod in node.pods)

    @property
    def netns_names(self) -> tuple[str, ...]:
        """Every namespace of the lab, pods first, the wire last (the order ``lab down`` removes them)."""
        return tuple(p.netns for p in self.pods) + tuple(n.netns for n in self.nodes) + (self.wire_netns,)

    def node(self, name: str) -> NodePlan:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)

    def pod(self, name: str) -> PodPlan:
        for pod in self.pods:
            if pod.name == name:
                return pod
        raise KeyError(name)


def validate_lab_name(name: str) -> str:
    if not isinstance(name, str) or not _LAB_NAME.match(name) or name.endswith("-"):
        raise ConfigError("--name", name, "is not a valid lab name",
                          "use 1-20 lower-case letters, digits and '-', starting with a letter (e.g. 'demo')")
    return name


def netns_prefix(lab: str) -> str:
    return f"{NETNS_PREFIX}{lab}-"


def lab_netns_name(lab: str, role: str) -> str:
    return f"{netns_prefix(lab)}{role}"


def is_lab_netns(lab: str, netns: str) -> bool:
    """True when ``netns`` is one this lab creates: ``tcpmesh-<lab>-`` followed by exactly one role.

    The role must match in full, so lab ``a`` never claims the namespaces of lab ``a-b``.
    """
    prefix = netns_prefix(lab)
    return netns.startswith(prefix) and bool(_ROLE.match(netns[len(prefix):]))


def lab_cgroup(cgroup_root: str, lab: str) -> str:
    return f"{cgroup_root.rstrip('/')}/{CGROUP_PREFIX}{lab}"


def lab_bpffs_dir(lab: str, bpffs_root: str = BPFFS_ROOT) -> str:
    return f"{bpffs_root.rstrip('/')}/{CGROUP_PREFIX}{lab}"


def lab_state_dir(state_root: str, lab: str) -> str:
    return f"{state_root.rstrip('/')}/{lab}"


def plan_lab(name: str, nodes: int, pods_per_node: int, trust_domain: str = DEFAULT_TRUST_DOMAIN, *,
             namespace: str = DEFAULT_NAMESPACE, service_accounts: Mapping[str, str] | None = None,
             cgroup_root: str = DEFAULT_CGROUP_ROOT, state_root: str = DEFAULT_STATE_ROOT,
             flat_pods: bool = False) -> LabPlan:
    """Compute the whole lab. ``service_accounts`` maps pod name → service account (default: the pod name).
    Pods have one child cgroup per container (``CONTAINER_LEAVES``) unless ``flat_pods``."""
    validate_lab_name(name)
    _check_count("--nodes", nodes, 1, MAX_NODES)
    _check_count("--pods-per-node", pods_per_node, 0, MAX_PODS_PER_NODE)
    _check_identity_part("--trust-domain", trust_domain, validate_trust_domain)
    _check_identity_part("--namespace", namespace, validate_namespace)
    service_accounts = dict(service_accounts or {})
    known_pods = {f"n{i}p{j}" for i in range(1, nodes + 1) for j in range(1, pods_per_node + 1)}
    for pod, account in service_accounts.items():
        if pod not in known_pods:
            raise ConfigError("--service-account", f"{pod}={account}", "names no pod of this lab",
                              f"pods are n1p1 … n{nodes}p{pods_per_node}")
        _check_identity_part("--service-account", account, validate_service_account)
    if not cgroup_root.startswith("/"):
        raise ConfigError("cgroup_root", cgroup_root, "must be an absolute path", "pass the cgroup v2 mount")
    state_dir = lab_state_dir(state_root, name)
    cgroup = lab_cgroup(cgroup_root, name)
    bpffs_dir = lab_bpffs_dir(name)
    node_plans = tuple(
        _plan_node(name, i, nodes, pods_per_node, trust_domain, namespace, service_accounts, cgroup, state_dir,
                   bpffs_dir, () if flat_pods else CONTAINER_LEAVES)
        for i in range(1, nodes + 1)
    )
    return LabPlan(
        name=name, trust_domain=trust_domain, namespace=namespace,
        wire_netns=lab_netns_name(name, "wire"), bridge=BRIDGE_IFNAME,
        wire_subnet=f"{WIRE_SUBNET_PREFIX}.0/{WIRE_PREFIXLEN}", pod_gateway=POD_GATEWAY,
        cgroup_root=cgroup_root.rstrip("/") or "/", cgroup=cgroup, bpffs_dir=bpffs_dir, state_dir=state_dir,
        ca_dir=f"{state_dir}/ca", registry_file=f"{state_dir}/workloads.yaml",
        state_file=f"{state_dir}/state.json", nodes=node_plans,
    )


def _plan_node(lab: str, i: int, nodes: int, pods_per_node: int, trust_domain: str, namespace: str,
               service_accounts: Mapping[str, str], lab_cg: str, state_dir: str, lab_bpffs: str,
               container_leaves: tuple[str, ...]) -> NodePlan:
    node = f"node{i}"
    wire_address = f"{WIRE_SUBNET_PREFIX}.{i}"
    pods = []
    for j in range(1, pods_per_node + 1):
        pod = f"n{i}p{j}"
        account = service_accounts.get(pod, pod)
        pod_cgroup = f"{lab_cg}/{node}/{PODS_CGROUP_LEAF}/{pod}"
        pods.append(PodPlan(
            name=pod, node=node, netns=lab_netns_name(lab, pod), ip=f"{POD_SUBNET_PREFIX}.{i}.{POD_FIRST_HOST + j}",
            ip6=f"{POD6_PREFIX}:{i}::{POD_FIRST_HOST + j}",  # decimal digits read as hex: mirrors the IPv4 address
            ifname=POD_IFNAME, node_ifname=f"{VETH_PREFIX}{pod}", cgroup=pod_cgroup,
            namespace=namespace, service_account=account,
            spiffe_id=SpiffeId(trust_domain, namespace, account).uri,
            containers=tuple(f"{pod_cgroup}/{leaf}" for leaf in container_leaves),
        ))
    routes = tuple((f"{POD_SUBNET_PREFIX}.{k}.0/24", f"{WIRE_SUBNET_PREFIX}.{k}")
                   for k in range(1, nodes + 1) if k != i)
    routes6 = tuple((f"{POD6_PREFIX}:{k}::/64", f"{WIRE6_PREFIX}{k}") for k in range(1, nodes + 1) if k != i)
    return NodePlan(
        index=i, name=node, netns=lab_netns_name(lab, node), wire_address=wire_address,
        wire_address6=f"{WIRE6_PREFIX}{i}",
        wire_ifname=NODE_WIRE_IFNAME, bridge_port=f"{VETH_PREFIX}{node}",
        pod_cidr=f"{POD_SUBNET_PREFIX}.{i}.0/24", admin_address=f"{wire_address}:{ADMIN_PORT}",
        cgroup=f"{lab_cg}/{node}", agent_cgroup=f"{lab_cg}/{node}/{AGENT_CGROUP_LEAF}",
        pods_cgroup=f"{lab_cg}/{node}/{PODS_CGROUP_LEAF}", bpffs_dir=f"{lab_bpffs}/{node}",
        state_dir=f"{state_dir}/nodes/{node}", config_file=f"{state_dir}/nodes/{node}/config.yaml",
        log_file=f"{state_dir}/logs/{node}.log", pods=tuple(pods), routes=routes, routes6=routes6,
    )


def _check_count(option: str, value: int, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ConfigError(option, value, f"must be a whole number from {low} to {high}",
                          "the lab's address plan (10.76.0.<node>, 10.77.<node>.<10+pod>) allows no more")


def _check_identity_part(option: str, value: str, check) -> None:
    try:
        check(value)
    except SpiffeIdError as exc:
        raise ConfigError(option, value, str(exc)) from exc


def interface_names(plan: LabPlan) -> tuple[str, ...]:
    """Every interface name the plan creates (for the length check and for tests)."""
    names = [plan.bridge]
    for node in plan.nodes:
        names += [node.wire_ifname, node.bridge_port]
        for pod in node.pods:
            names += [pod.ifname, pod.node_ifname]
    return tuple(names)
