"""Load a static workload registry file (YAML or JSON) into a ``Registry`` snapshot.

Format (docs/registry.md says what each field means)::

    trust_domain: lab.tcpmesh            # optional; defaults to the agent's trust domain
    nodes:
      - {name: node1, address: 10.76.0.1,     # address: where other nodes reach its agent (:15008)
         other_addresses: ["203.0.113.7"]}   # optional: ExternalIP, IPv6...: its nodePorts answer there too
    workloads:
      - {name: web-1, namespace: shop, service_account: web, ip: 10.77.1.10, node: node1,
         ip6: "fd00:77:1::10",                  # optional: the workload's IPv6 address (dual stack)
         cgroup: /sys/fs/cgroup/tcpmesh/shop/web-1,
         host_ports: [{port: 8443, target_port: 443}]}  # optional: its node's addresses:8443 DNAT to it
    services:                            # optional; virtual addresses in front of workloads
      - {name: web, namespace: shop, addresses: [10.96.0.10], ports: [{port: 80, target_port: 8080}],
         endpoints: [{workload: shop/web-1, ready: true}]}

Every error names the file, the entry and the field. A file that someone other than root (or this process's
user) could change is refused (``agent.filetrust``): whoever can write it decides which workload gets which
identity. Reads a file; no other I/O.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import yaml

from agent.errors import ConfigError, invalid_yaml
from agent.filetrust import UntrustedFileError, check_trusted_file
from agent.identity.spiffe import SpiffeIdError, validate_namespace, validate_service_account, validate_trust_domain
from agent.registry.model import Endpoint, Node, Registry, Service, ServicePort, Workload, ipv6_text, is_ipv4

_NAME_FIELDS = ("name", "namespace", "service_account", "ip", "node")


def load_registry_file(path: str | Path, default_trust_domain: str) -> Registry:
    path = Path(path)
    try:
        check_trusted_file(path, "registry.file", decides="which workload gets which identity",
                           process="tcpmesh")
    except UntrustedFileError as exc:
        raise ConfigError("registry.file", str(path), exc.problem) from exc
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError("registry.file", str(path), f"cannot read the registry file: {exc.strerror}",
                          "point registry.file at an existing YAML file") from exc
    try:
        doc = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise invalid_yaml(path, text, exc) from None
    return parse_registry(doc, default_trust_domain, source=str(path))


def load_registry_for_node(path: str | Path, default_trust_domain: str, node_name: str) -> Registry:
    """``load_registry_file`` and the check the agent makes at start: ``node_name`` is one of its nodes."""
    registry = load_registry_file(path, default_trust_domain)
    if node_name not in registry.nodes:
        raise ConfigError("node.name", node_name, f"is not a node of the registry {path}",
                          f"known nodes: {', '.join(sorted(registry.nodes)) or 'none'}; add it under nodes "
                          "or fix node.name")
    return registry


def parse_registry(doc: Any, default_trust_domain: str, source: str = "registry") -> Registry:
    if not isinstance(doc, dict):
        raise ConfigError(source, type(doc).__name__, "the registry must be a mapping with 'nodes' and 'workloads'")
    unknown = set(doc) - {"trust_domain", "nodes", "workloads", "services"}
    if unknown:
        raise ConfigError(f"{source}: {sorted(unknown)[0]}", doc[sorted(unknown)[0]], "unknown top-level key",
                          "allowed keys are trust_domain, nodes, workloads, services")
    trust_domain = doc.get("trust_domain") or default_trust_domain
    try:
        validate_trust_domain(trust_domain)
    except SpiffeIdError as exc:
        raise ConfigError(f"{source}: trust_domain", trust_domain, str(exc)) from exc
    nodes = [_parse_node(entry, f"{source}: nodes[{i}]") for i, entry in enumerate(_list(doc, "nodes", source))]
    node_names = [n.name for n in nodes]
    _no_duplicates(node_names, f"{source}: nodes", "name")
    workloads = [
        parse_workload(entry, f"{source}: workloads[{i}]", trust_domain, set(node_names))
        for i, entry in enumerate(_list(doc, "workloads", source))
    ]
    _no_duplicate_entries([(ip, f"{source}: workloads[{i}].{'ip' if ip == w.ip else 'ip6'}", w.key)
                           for i, w in enumerate(workloads) for ip in w.addresses], "ip", "workloads")
    _no_duplicate_entries([(w.key, f"{source}: workloads[{i}]", w.key) for i, w in enumerate(workloads)],
                          "namespace/name", "workloads")
    workload_keys = {w.key for w in workloads}
    services = [parse_service(entry, f"{source}: services[{i}]", workload_keys, {w.ip for w in workloads})
                for i, entry in enumerate(_list(doc, "services", source))]
    _no_duplicates([s.key for s in services], f"{source}: services", "namespace/name")
    _no_duplicates([a for s in services for a in s.addresses], f"{source}: services", "address")
    _no_duplicates([str(p.port) for s in services for p in s.node_ports], f"{source}: services", "node_port")
    return Registry.build(trust_domain, nodes, workloads, services)


def _list(doc: dict, key: str, source: str) -> list:
    value = doc.get(key) or []
    if not isinstance(value, list):
        raise ConfigError(f"{source}: {key}", value, "must be a list")
    return value


def _parse_node(entry: Any, where: str) -> Node:
    if not isinstance(entry, dict):
        raise ConfigError(where, entry, "a node must be a mapping with name and address")
    unknown = set(entry) - {"name", "address", "other_addresses"}
    if unknown:
        key = sorted(unknown, key=str)[0]
        raise ConfigError(f"{where}.{key}", entry[key], "unknown field",
                          "allowed fields are name, address, other_addresses")
    for key in ("name", "address"):
        if not isinstance(entry.get(key), str) or not entry[key]:
            raise ConfigError(f"{where}.{key}", entry.get(key), "is required and must be a string")
    if not is_ipv4(entry["address"]):
        raise ConfigError(f"{where}.address", entry["address"], "must be an IPv4 address")
    others = entry.get("other_addresses", [])
    if not isinstance(others, list):
        raise ConfigError(f"{where}.other_addresses", others, "must be a list of IP addresses",
                          "list the node's other addresses (ExternalIP, IPv6), where its nodePorts answer too")
    canonical = []
    for i, text in enumerate(others):
        address = text if isinstance(text, str) and is_ipv4(text) else ipv6_text(text)
        if address is None:
            raise ConfigError(f"{where}.other_addresses[{i}]", text, "must be an IPv4 or IPv6 address")
        canonical.append(address)
    return Node(entry["name"], entry["address"], tuple(canonical))


def parse_workload(entry: Any, where: str, trust_domain: str, node_names: set[str]) -> Workload:
    if not isinstance(entry, dict):
        raise ConfigError(where, entry, "a workload must be a mapping")
    unknown = set(entry) - set(_NAME_FIELDS) - {"cgroup", "ip6", "host_ports"}
    if unknown:
        key = sorted(unknown)[0]
        raise ConfigError(f"{where}.{key}", entry[key], "unknown field",
                          f"allowed fields are {', '.join(_NAME_FIELDS)}, ip6, cgroup, host_ports")
    for key in _NAME_FIELDS:
        if not isinstance(entry.get(key), str) or not entry[key]:
            raise ConfigError(f"{where}.{key}", entry.get(key), "is required and must be a string")
    if not is_ipv4(entry["ip"]):
        raise ConfigError(f"{where}.ip", entry["ip"], "must be an IPv4 address")
    if entry["node"] not in node_names:
        raise ConfigError(f"{where}.node", entry["node"], "names no node of the registry",
                          f"known nodes: {', '.join(sorted(node_names)) or 'none'}")
    for key, check in (("namespace", validate_namespace), ("service_account", validate_service_account)):
        try:
            check(entry[key])
        except SpiffeIdError as exc:
            raise ConfigError(f"{where}.{key}", entry[key], str(exc)) from exc
    ip6 = entry.get("ip6")
    if ip6 is not None:
        ip6 = ipv6_text(ip6)
        if ip6 is None:
            raise ConfigError(f"{where}.ip6", entry["ip6"], "must be an IPv6 address",
                              "give the workload's IPv6 address (e.g. fd00:77:1::10), or leave ip6 out")
    cgroup = entry.get("cgroup")
    if cgroup is not None and (not isinstance(cgroup, str) or not cgroup.startswith("/")):
        raise ConfigError(f"{where}.cgroup", cgroup, "must be an absolute path to a cgroup v2 directory")
    return Workload(entry["name"], entry["namespace"], entry["service_account"], entry["ip"], entry["node"],
                    cgroup, trust_domain, ip6, _host_ports(entry.get("host_ports", []), f"{where}.host_ports"))


def _host_ports(value: Any, where: str) -> tuple[ServicePort, ...]:
    """``host_ports: [{port: <hostPort>, target_port: <container port>}]`` (target_port defaults to port)."""
    if not isinstance(value, list):
        raise ConfigError(where, value, "must be a list of {port, target_port}",
                          "e.g. [{port: 8443, target_port: 443}]")
    ports = []
    for i, item in enumerate(value):
        if not isinstance(item, dict) or set(item) - {"port", "target_port"}:
            raise ConfigError(f"{where}[{i}]", item, "must be a mapping with port and optionally target_port",
                              "e.g. {port: 8443, target_port: 443}")
        for key in ("port", "target_port"):
            number = item.get(key, item.get("port"))
            if isinstance(number, bool) or not isinstance(number, int) or not 1 <= number <= 65535:
                raise ConfigError(f"{where}[{i}].{key}", number, "must be a TCP port between 1 and 65535")
        ports.append(ServicePort(item["port"], item.get("target_port", item["port"])))
    return tuple(ports)


_SERVICE_FIELDS = ("name", "namespace", "addresses", "ports", "endpoints")


def parse_service(entry: Any, where: str, workload_keys: set[str], workload_ips: set[str]) -> Service:
    """One Service: virtual addresses (IPv4 or IPv6, none a workload's), ports with target ports,
    endpoints naming workloads of the same registry. Errors name the field and the fix."""
    if not isinstance(entry, dict):
        raise ConfigError(where, entry, "a service must be a mapping",
                          f"give {', '.join(_SERVICE_FIELDS)}")
    unknown = set(entry) - set(_SERVICE_FIELDS)
    if unknown:
        key = sorted(unknown)[0]
        raise ConfigError(f"{where}.{key}", entry[key], "unknown field", f"allowed fields are {', '.join(_SERVICE_FIELDS)}")
    for key in ("name", "namespace"):
        if not isinstance(entry.get(key), str) or not entry[key]:
            raise ConfigError(f"{where}.{key}", entry.get(key), "is required and must be a string")
    try:
        validate_namespace(entry["namespace"])
        validate_namespace(entry["name"])  # the same DNS-label rules as a namespace
    except SpiffeIdError as exc:
        raise ConfigError(f"{where}.name", f"{entry['namespace']}/{entry['name']}", str(exc)) from exc
    addresses = entry.get("addresses")
    if not isinstance(addresses, list) or not addresses:
        raise ConfigError(f"{where}.addresses", addresses, "is required: a list of virtual IP addresses",
                          "e.g. addresses: [10.96.0.10] (IPv4 and/or IPv6)")
    parsed_addresses = []
    for i, address in enumerate(addresses):
        try:
            parsed = ipaddress.ip_address(address)
        except (ValueError, TypeError):
            raise ConfigError(f"{where}.addresses[{i}]", address, "is not an IP address",
                              "give one IPv4 or IPv6 address per entry, no prefix") from None
        if str(parsed) in workload_ips:
            raise ConfigError(f"{where}.addresses[{i}]", address, "is a workload's IP",
                              "a Service needs its own virtual address (a ClusterIP), never a pod's")
        parsed_addresses.append(str(parsed))
    ports = entry.get("ports")
    if not isinstance(ports, list) or not ports:
        raise ConfigError(f"{where}.ports", ports, "is required: a list of {port, target_port}",
                          "e.g. ports: [{port: 5432, target_port: 5432}]")
    parsed_ports = []
    node_ports: list[ServicePort] = []
    for i, port in enumerate(ports):
        here = f"{where}.ports[{i}]"
        if not isinstance(port, dict) or set(port) - {"port", "target_port", "node_port"}:
            raise ConfigError(here, port, "must be a mapping with port and target_port (and optionally node_port)",
                              "e.g. {port: 80, target_port: 8080}")
        for key in ("port", "target_port", "node_port"):
            value = port.get(key, port.get("port") if key == "target_port" else None)
            if key == "node_port" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
                raise ConfigError(f"{here}.{key}", value, "must be a port number 1-65535",
                                  "target_port defaults to port; node_port is optional")
        parsed_ports.append(ServicePort(port["port"], port.get("target_port", port["port"])))
        if port.get("node_port") is not None:
            node_ports.append(ServicePort(port["node_port"], port.get("target_port", port["port"])))
    _no_duplicates([str(p.port) for p in parsed_ports], f"{where}.ports", "port")
    parsed_endpoints = []
    for i, endpoint in enumerate(entry.get("endpoints") or []):
        here = f"{where}.endpoints[{i}]"
        if isinstance(endpoint, str):
            endpoint = {"workload": endpoint}
        if not isinstance(endpoint, dict) or set(endpoint) - {"workload", "ready"}:
            raise ConfigError(here, endpoint, "must be a workload's namespace/name or {workload, ready}",
                              "e.g. {workload: shop/web-1, ready: true}")
        if endpoint.get("workload") not in workload_keys:
            raise ConfigError(f"{here}.workload", endpoint.get("workload"), "names no workload of the registry",
                              "give namespace/name of a workload listed under workloads")
        ready = endpoint.get("ready", True)
        if not isinstance(ready, bool):
            raise ConfigError(f"{here}.ready", ready, "must be true or false")
        parsed_endpoints.append(Endpoint(endpoint["workload"], ready))
    _no_duplicates([e.workload for e in parsed_endpoints], f"{where}.endpoints", "workload")
    return Service(entry["name"], entry["namespace"], tuple(parsed_addresses), tuple(parsed_ports),
                   tuple(parsed_endpoints), tuple(node_ports))


def _no_duplicates(values: list[str], where: str, what: str) -> None:
    seen: set[str] = set()
    for value in values:
        if value in seen:
            raise ConfigError(where, value, f"duplicate {what}", f"each {what} may appear only once")
        seen.add(value)


def _no_duplicate_entries(entries: list[tuple[str, str, str]], what: str, section: str) -> None:
    """``entries``: (value, where it is, the entry's name). The error names both entries, so the operator
    knows which of the two to change."""
    first: dict[str, tuple[str, str]] = {}
    for value, where, name in entries:
        if value in first:
            other_where, other_name = first[value]
            other = other_where.rsplit(": ", 1)[-1].split(".")[0]
            raise ConfigError(where, value, f"duplicate {what}: also {other} ({other_name})",
                              f"each {what} may appear only once in {section}: change or remove one of the two")
        first[value] = (where, name)
