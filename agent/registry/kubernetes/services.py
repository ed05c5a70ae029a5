"""Service and EndpointSlice objects (dicts as the API server returns them) → registry ``Service``s. Pure.

What kube-proxy does with the same two kinds, restricted to what the mesh can tunnel to:

- a Service is its ``spec.clusterIPs`` (``spec.clusterIP`` on servers without it; IPv4 and IPv6),
  its ``spec.externalIPs`` and load-balancer ingress IPs (``ipMode: VIP``, the default: kube-proxy
  DNATs those for in-cluster clients too — left out they were a plaintext way past policy) and its
  TCP ports, and its ``nodePort``s at every address of every node (mapping.node_other_addresses; the
  same DNAT); headless (``clusterIP: None``) and ``ExternalName`` Services have no virtual address and are left out —
  their clients dial pod addresses, which are meshed already;
- its endpoints are the endpoints of every EndpointSlice labelled
  ``kubernetes.io/service-name: <name>`` in its namespace (``addressType`` IPv4 or IPv6; FQDN
  slices mean nothing to a proxy), matched to a workload by ``targetRef`` (a Pod) or else by address;
- **which endpoints take new connections** follows the API's conditions: ``ready`` (nil means
  true) endpoints do; when a Service has none, endpoints that are ``serving`` and ``terminating``
  do (kube-proxy's fallback for a Service whose every pod is shutting down); all others are kept
  as not ready — a connection already open to them is never cut;
- a Service port's target port is the number its EndpointSlices carry under the Service port's
  ``name`` (the endpoint controller resolves a named ``targetPort`` per pod); without slices, a
  numeric ``targetPort`` (default: ``port``). Endpoints whose slice gives a port another number than
  the one most ready endpoints use (a rollout that renumbers a named port) are kept not ready for the
  Service and reported: the mesh has one target port per Service port;
- a Service none of whose endpoints is a workload of the mesh is left out whole (reported): its
  clients keep reaching it through kube-proxy as before (the API server's ``default/kubernetes``,
  Services in front of hostNetwork pods or outside addresses) — capturing it could only refuse them.
  Endpoints outside the mesh of a Service that has mesh endpoints are left out (reported): the
  outbound proxy can only tunnel to a workload.

Imports no client library, no thread, no I/O.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from typing import Any, Iterable, Mapping

from agent.registry.model import Endpoint, Service, ServicePort, Workload

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
NO_CLUSTER_IP = ("", "None")


def build_services(services: Iterable[Mapping[str, Any]], slices: Iterable[Mapping[str, Any]],
                   workloads: Iterable[Workload]) -> tuple[tuple[Service, ...], tuple[tuple[str, str], ...]]:
    """The mesh's Services and ``(namespace/name, why)`` of what was left out (whole Services or parts)."""
    workloads = tuple(workloads)
    by_key = {w.key: w for w in workloads}
    by_address = {address: w for w in workloads for address in w.addresses}
    slices_of: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for eps in slices:
        meta = eps.get("metadata") or {}
        owner = (meta.get("labels") or {}).get(SERVICE_NAME_LABEL)
        if owner and eps.get("addressType") in ("IPv4", "IPv6"):
            slices_of.setdefault((meta.get("namespace", ""), owner), []).append(eps)
    built: list[Service] = []
    skipped: list[tuple[str, str]] = []
    for obj in services:
        meta, spec = obj.get("metadata") or {}, obj.get("spec") or {}
        key = f"{meta.get('namespace', '?')}/{meta.get('name', '?')}"
        service, notes = _service(meta, spec, slices_of.get((meta.get("namespace", ""), meta.get("name", ""))) or [],
                                  by_key, by_address, obj.get("status") or {})
        skipped += [(key, note) for note in notes]
        if service is not None:
            built.append(service)
    built.sort(key=lambda s: s.key)
    return tuple(built), tuple(skipped)


def _service(meta: Mapping[str, Any], spec: Mapping[str, Any], slices: list[Mapping[str, Any]],
             by_key: Mapping[str, Workload], by_address: Mapping[str, Workload],
             status: Mapping[str, Any]) -> tuple[Service | None, list[str]]:
    if not meta.get("name") or not meta.get("namespace"):
        return None, ["no name or namespace"]
    if spec.get("type") == "ExternalName":
        return None, ["type ExternalName: no virtual address"]
    addresses = _cluster_ips(spec)
    if not addresses:
        return None, ["headless (clusterIP None): clients dial pod addresses, which are meshed"]
    addresses = tuple(dict.fromkeys(addresses + _external_ips(spec, status)))
    tcp_ports = [p for p in spec.get("ports") or () if (p.get("protocol") or "TCP") == "TCP" and _port(p.get("port"))]
    if not tcp_ports:
        return None, ["no TCP port"]
    notes: list[str] = []
    # endpoint (workload key) → (ready, serving, terminating, {port name: number}) merged over the slices
    found: dict[str, list] = {}
    outside: set[str] = set()
    for eps in slices:
        slice_ports = {(p.get("name") or ""): p.get("port") for p in eps.get("ports") or ()
                       if (p.get("protocol") or "TCP") == "TCP" and _port(p.get("port"))}
        for endpoint in eps.get("endpoints") or ():
            workload = _workload_of(endpoint, meta["namespace"], by_key, by_address)
            if workload is None:
                outside.add(",".join(endpoint.get("addresses") or ()) or "?")
                continue
            ready, serving, terminating = _conditions(endpoint.get("conditions") or {})
            entry = found.setdefault(workload.key, [False, False, False, {}])
            entry[0] |= ready
            entry[1] |= serving
            entry[2] |= terminating
            entry[3].update(slice_ports)
    if not found:
        why = "no endpoint is a workload of the mesh" if slices else "no EndpointSlice with an endpoint yet"
        return None, [f"{why}: left to kube-proxy, not captured"]
    if outside:
        notes.append(f"endpoints {', '.join(sorted(outside))} are not workloads of the mesh: left out")
    takes_new = {k for k, e in found.items() if e[0]}
    if not takes_new:   # every endpoint is shutting down: the serving ones still take new connections
        takes_new = {k for k, e in found.items() if e[1] and e[2]}
    ports: list[ServicePort] = []
    node_ports: list[ServicePort] = []
    for p in tcp_ports:
        name = p.get("name") or ""
        numbers = Counter(e[3][name] for k, e in found.items() if k in takes_new and name in e[3])
        if not numbers:
            numbers = Counter(e[3][name] for e in found.values() if name in e[3])
        if numbers:
            target = sorted(numbers.items(), key=lambda item: (-item[1], item[0]))[0][0]
        else:
            target = p.get("targetPort") if _port(p.get("targetPort")) else p["port"]
        for k, e in found.items():
            if k in takes_new and name in e[3] and e[3][name] != target:
                takes_new.discard(k)
                notes.append(f"endpoint {k} serves port {name or p['port']} on {e[3][name]}, the others on "
                             f"{target}: not given new connections")
        ports.append(ServicePort(p["port"], target))
        if _port(p.get("nodePort")):   # NodePort and LoadBalancer Services: kube-proxy DNATs it on every node
            node_ports.append(ServicePort(p["nodePort"], target))
    if len({sp.port for sp in ports}) != len(ports):
        return None, ["two TCP ports with one number"]
    endpoints = tuple(Endpoint(k, k in takes_new) for k in sorted(found))
    return Service(meta["name"], meta["namespace"], addresses, tuple(ports), endpoints, tuple(node_ports)), notes


def _external_ips(spec: Mapping[str, Any], status: Mapping[str, Any]) -> tuple[str, ...]:
    """The other addresses kube-proxy sends to the endpoints, for in-cluster clients too: ``spec.externalIPs``
    and ``status.loadBalancer.ingress[].ip`` — except ``ipMode: Proxy`` ingresses (kube-proxy then sends
    traffic to the load balancer itself); hostname-only ingresses have no address. Canonical text."""
    raw = list(spec.get("externalIPs") or ())
    raw += [i.get("ip") for i in (status.get("loadBalancer") or {}).get("ingress") or ()
            if isinstance(i, Mapping) and i.get("ip") and i.get("ipMode", "VIP") != "Proxy"]
    addresses = []
    for text in raw:
        try:
            addresses.append(str(ipaddress.ip_address(text)))
        except (TypeError, ValueError):
            continue
    return tuple(addresses)


def _cluster_ips(spec: Mapping[str, Any]) -> tuple[str, ...]:
    """``spec.clusterIPs`` (dual stack, primary first), else ``spec.clusterIP``; canonical text."""
    raw = spec.get("clusterIPs") or ([spec["clusterIP"]] if spec.get("clusterIP") else [])
    addresses = []
    for text in raw:
        if text in NO_CLUSTER_IP:
            return ()
        try:
            addresses.append(str(ipaddress.ip_address(text)))
        except ValueError:
            continue
    return tuple(dict.fromkeys(addresses))


def _workload_of(endpoint: Mapping[str, Any], namespace: str, by_key: Mapping[str, Workload],
                 by_address: Mapping[str, Workload]) -> Workload | None:
    ref = endpoint.get("targetRef") or {}
    if ref.get("kind") == "Pod" and ref.get("name"):
        return by_key.get(f"{ref.get('namespace') or namespace}/{ref['name']}")
    for address in (endpoint.get("addresses") or ())[:1]:   # kube-proxy reads the first address only
        try:
            return by_address.get(str(ipaddress.ip_address(address)))
        except ValueError:
            return None
    return None


def _conditions(conditions: Mapping[str, Any]) -> tuple[bool, bool, bool]:
    """(ready, serving, terminating) as the API defines them: ready nil → true; serving nil → ready;
    terminating nil → false."""
    ready = conditions.get("ready")
    ready = True if ready is None else bool(ready)
    serving = conditions.get("serving")
    serving = ready if serving is None else bool(serving)
    return ready, serving, bool(conditions.get("terminating"))


def _port(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 65535
