"""Pod and Node objects (dicts as the API server returns them) → one ``Registry`` snapshot. Pure.

Every pod with an IPv4 address that is not ``hostNetwork`` and not finished becomes a
workload: name, namespace, ``spec.serviceAccountName`` (identity ``ns/<ns>/sa/<sa>``), IP, and node
``spec.nodeName`` — a resolvable destination whose tunnel address is its node's ``InternalIP``; on a
dual-stack cluster the IPv6 entry of ``status.podIPs`` becomes the workload's ``ip6``. The IPv4
address is ``status.podIP``, or — on a cluster whose primary family is IPv6, where ``podIP`` is
the IPv6 one — the IPv4 entry of ``status.podIPs``. A pod with no IPv4 address at all (an
IPv6-only cluster) is left out with ``IPV6_ONLY`` as the reason: the mesh needs an IPv4 address
per workload (docs/install-kubernetes.md, "The Kubernetes registry source", dual stack). Pods of
this node get their pod cgroup from the ``cgroup_of`` the caller passes (``cgroups.find_pod_cgroup``),
so they are captured. Two pods with one IP: the newer wins, the older is reported as left out.
Services and their EndpointSlices become the registry's Services (``services.build_services``).
Imports no client library, no thread, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

from agent.identity.spiffe import SpiffeIdError, validate_namespace, validate_service_account
from agent.registry.kubernetes.services import build_services
from agent.registry.model import Node, Registry, ServicePort, Workload, ipv6_text, is_ipv4

FINISHED_PHASES = ("Succeeded", "Failed")
IPV6_ONLY = "IPv6-only"  # the start of the reason a pod without an IPv4 address is left out (the source warns)


def node_internal_ip(node: Mapping[str, Any]) -> str | None:
    """The node's first IPv4 ``InternalIP`` (where its agent's :15008 is reached), or None."""
    for address in (node.get("status") or {}).get("addresses") or ():
        if address.get("type") == "InternalIP" and is_ipv4(address.get("address", "")):
            return address["address"]
    return None


NODE_PORT_ADDRESS_TYPES = ("InternalIP", "ExternalIP")  # Hostname, InternalDNS, ExternalDNS are names


def node_other_addresses(node: Mapping[str, Any], primary: str) -> tuple[str, ...]:
    """The node's ``status.addresses`` of type InternalIP or ExternalIP, either family, other than ``primary``
    (canonical text): kube-proxy answers nodePorts there too."""
    found = []
    for address in (node.get("status") or {}).get("addresses") or ():
        text = str(address.get("address", ""))
        if address.get("type") not in NODE_PORT_ADDRESS_TYPES:
            continue
        canonical = text if is_ipv4(text) else ipv6_text(text)
        if canonical and canonical != primary:
            found.append(canonical)
    return tuple(dict.fromkeys(found))


def pod_host_ports(spec: Mapping[str, Any]) -> tuple[ServicePort, ...]:
    """(hostPort, containerPort) of every TCP container port with a hostPort: the CNI portmap plugin DNATs
    ``<node address>:<hostPort>`` to the pod, a frontend like a nodePort on the pod's own node."""
    found = []
    for container in list(spec.get("containers") or ()) + list(spec.get("initContainers") or ()):
        for port in container.get("ports") or ():
            host, target = port.get("hostPort"), port.get("containerPort")
            if isinstance(host, int) and isinstance(target, int) and (port.get("protocol") or "TCP") == "TCP":
                found.append(ServicePort(host, target))
    return tuple(dict.fromkeys(found))


@dataclass(frozen=True)
class BuildResult:
    registry: Registry
    skipped: tuple[tuple[str, str], ...] = ()       # (namespace/name, why) of pods left out
    missing_cgroups: tuple[str, ...] = ()            # local pods whose cgroup is not there yet
    services_skipped: tuple[tuple[str, str], ...] = ()  # (namespace/name, why) of Services or their parts left out


def build_registry(trust_domain: str, local_node: str, pods: Iterable[Mapping[str, Any]],
                   nodes: Iterable[Mapping[str, Any]],
                   cgroup_of: Callable[[Mapping[str, Any]], str | None],
                   services: Iterable[Mapping[str, Any]] = (),
                   endpoint_slices: Iterable[Mapping[str, Any]] = ()) -> BuildResult:
    """One registry snapshot from Pod, Node, Service and EndpointSlice objects (dicts as the API
    returns them); Services are mapped by ``services.build_services``."""
    node_list = []
    for node in nodes:
        name = (node.get("metadata") or {}).get("name", "")
        address = node_internal_ip(node)
        if name and address:
            node_list.append(Node(name, address, node_other_addresses(node, address)))
    known = {n.name for n in node_list}
    chosen: dict[str, tuple[Workload, str]] = {}   # ip → (workload, creationTimestamp)
    skipped: list[tuple[str, str]] = []
    missing: list[str] = []
    for pod in pods:
        meta, spec, status = pod.get("metadata") or {}, pod.get("spec") or {}, pod.get("status") or {}
        key = f"{meta.get('namespace', '?')}/{meta.get('name', '?')}"
        why = _skip_reason(meta, spec, status, known)
        if why:
            skipped.append((key, why))
            continue
        cgroup = None
        if spec["nodeName"] == local_node:
            cgroup = cgroup_of(pod)
            if cgroup is None:
                missing.append(key)
        workload = Workload(meta["name"], meta["namespace"], spec.get("serviceAccountName") or "default",
                            _pod_ip4(status), spec["nodeName"], cgroup, trust_domain, _pod_ip6(status),
                            pod_host_ports(spec))
        created = meta.get("creationTimestamp") or ""
        other = chosen.get(workload.ip)
        if other is not None:
            older, newer = sorted([other, (workload, created)], key=lambda wc: (wc[1], wc[0].key))
            skipped.append((older[0].key, f"IP {workload.ip} is also the IP of the newer pod {newer[0].key}"))
            chosen[workload.ip] = newer
        else:
            chosen[workload.ip] = (workload, created)
    workloads = sorted((w for w, _ in chosen.values()), key=lambda w: w.key)
    mesh_services, services_skipped = build_services(services, endpoint_slices, workloads)
    registry = Registry.build(trust_domain, sorted(node_list, key=lambda n: n.name), workloads, mesh_services)
    return BuildResult(registry, tuple(skipped), tuple(missing), services_skipped)


def _pod_ip4(status: Mapping[str, Any]) -> str | None:
    """The pod's IPv4 address: ``status.podIP`` (the primary family's), else the IPv4 entry of
    ``status.podIPs`` (a dual-stack cluster whose primary family is IPv6), or None."""
    if is_ipv4(status.get("podIP") or ""):
        return status["podIP"]
    for entry in status.get("podIPs") or ():
        if isinstance(entry, Mapping) and is_ipv4(entry.get("ip") or ""):
            return entry["ip"]
    return None


def _pod_ip6(status: Mapping[str, Any]) -> str | None:
    """The pod's IPv6 address on a dual-stack cluster (status.podIPs), canonical text, or None."""
    for entry in status.get("podIPs") or ():
        found = ipv6_text(entry.get("ip", "")) if isinstance(entry, Mapping) else None
        if found:
            return found
    return None


def _skip_reason(meta: Mapping[str, Any], spec: Mapping[str, Any], status: Mapping[str, Any],
                 known_nodes: set[str]) -> str:
    if not meta.get("name") or not meta.get("namespace"):
        return "no name or namespace"
    if spec.get("hostNetwork"):
        return "hostNetwork: it shares its node's IP"
    if status.get("phase") in FINISHED_PHASES:
        return f"phase {status['phase']}"
    ip = status.get("podIP") or ""
    if not ip:
        return "no pod IP yet"
    if _pod_ip4(status) is None:
        return (f"{IPV6_ONLY} pod (status.podIPs has no IPv4 address, podIP {ip}): tcpmesh meshes only pods "
                "with an IPv4 address, so this pod is outside the mesh; give the cluster an IPv4 pod range "
                "(dual stack) to mesh it")
    node = spec.get("nodeName") or ""
    if not node:
        return "not scheduled"
    if node not in known_nodes:
        return f"node {node} is unknown or has no InternalIP"
    try:
        validate_namespace(meta["namespace"])
        validate_service_account(spec.get("serviceAccountName") or "default")
    except SpiffeIdError as exc:
        return str(exc)
    return ""
