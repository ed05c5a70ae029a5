"""The lab's Services: virtual addresses in front of lab pods, as in a cluster.

``lab_service_set`` / ``lab_service_del`` / ``lab_services`` keep the lab's Services in
``<state_dir>/services.json`` and write them into the registry file's ``services:`` section (the
agents poll it), after checking the whole new registry with the agent's own parser (a bad Service is
refused naming the field; nothing is half-applied). Every node netns also gets kube-proxy-like
nftables rules (tables ``ip`` and ``ip6 tcpmesh_services``, replaced whole): DNAT from each virtual address and
port to the ready endpoints, so pods that are not meshed still reach a Service; a Service with no
ready endpoint is answered with a TCP reset. Meshed pods never hit these rules: their connect is
captured before a packet leaves. Both families: an IPv6 virtual address is DNATed to the endpoints'
IPv6 addresses (every lab pod is dual stack).

Imports the lab's plan and files, the registry parser and nsenter; runs `nft` in node netns only.
"""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any, Sequence

import yaml

from agent.lab import files
from agent.lab.errors import LabError
from agent.lab.topology import LabPlan
from agent.registry.static_file import parse_registry

SERVICES_FILE = "services.json"
NFT_TABLE = "tcpmesh_services"


def services_path(plan: LabPlan) -> str:
    return os.path.join(plan.state_dir, SERVICES_FILE)


def read_services(plan: LabPlan) -> list[dict[str, Any]]:
    try:
        with open(services_path(plan)) as f:
            return json.load(f)
    except FileNotFoundError:
        return []


def service_document(plan: LabPlan, name: str, addresses: Sequence[str], ports: Sequence[tuple[int, int]],
                     endpoints: Sequence[tuple[str, bool]], namespace: str | None = None,
                     node_ports: Sequence[int | None] = ()) -> dict[str, Any]:
    """A registry ``services:`` entry from lab pod names (n1p2) and (port, target port) pairs; ``node_ports``
    (one per port, None for none) makes it a NodePort Service, DNATed on every local address of every node."""
    workloads = []
    for pod_name, ready in endpoints:
        try:
            pod = plan.pod(pod_name)
        except (KeyError, LabError) as exc:
            raise LabError(f"service {name}: endpoint {pod_name!r} is not a pod of lab {plan.name} "
                           f"(pods: {', '.join(p.name for p in plan.pods)})") from exc
        workloads.append({"workload": f"{pod.namespace}/{pod.name}", "ready": ready})
    with_node = list(node_ports) + [None] * (len(ports) - len(node_ports))
    return {"name": name, "namespace": namespace or plan.namespace, "addresses": list(addresses),
            "ports": [{"port": p, "target_port": t, **({"node_port": n} if n else {})}
                      for (p, t), n in zip(ports, with_node)], "endpoints": workloads}


def lab_service_set(plan: LabPlan, service: dict[str, Any]) -> None:
    """Add ``service`` or replace the one of the same namespace/name (e.g. to turn an endpoint not ready)."""
    key = (service["namespace"], service["name"])
    others = [s for s in read_services(plan) if (s["namespace"], s["name"]) != key]
    _apply(plan, others + [service])


def lab_service_del(plan: LabPlan, name: str, namespace: str | None = None) -> None:
    key = (namespace or plan.namespace, name)
    current = read_services(plan)
    kept = [s for s in current if (s["namespace"], s["name"]) != key]
    if len(kept) == len(current):
        raise LabError(f"lab {plan.name} has no service {key[0]}/{key[1]} (see `tcpmesh lab service list`)")
    _apply(plan, kept)


def registry_with_services(plan: LabPlan, services: list[dict[str, Any]]) -> dict[str, Any]:
    doc = files.registry_document(plan)
    if services:
        doc["services"] = services
    return doc


def nft_ruleset(plan: LabPlan, services: list[dict[str, Any]]) -> str:
    """The node netns' kube-proxy stand-in, replacing the previous one in one nft transaction (pure):
    table ``ip tcpmesh_services`` for IPv4 virtual addresses (DNAT to the endpoints' IPv4 addresses) and
    ``ip6 tcpmesh_services`` for IPv6 ones (to their IPv6 addresses), as kube-proxy on a dual-stack
    cluster sends each family of a Service to the EndpointSlices of that family; a ``node_port`` is DNATed
    on every local address of every node, both families — kube-proxy's iptables mode with
    ``nodePortAddresses`` unset (``-m addrtype --dst-type LOCAL``): the wire addresses, and also the pods'
    gateway on each node's veths."""
    pods = {f"{p.namespace}/{p.name}": p for p in plan.pods}
    rules: dict[str, list[str]] = {"ip": [], "ip6": []}
    for service in services:
        ready = [pods[e["workload"]] for e in service["endpoints"] if e.get("ready", True)]
        frontends = [("ip6" if ":" in address else "ip", f"daddr {address} tcp dport {port['port']}",
                      port["target_port"]) for address in service["addresses"] for port in service["ports"]]
        frontends += [(family, f"fib daddr type local tcp dport {port['node_port']}", port["target_port"])
                      for port in service["ports"] if port.get("node_port") for family in ("ip", "ip6")]
        for family, where, target_port in frontends:
            targets = [p.ip6 if family == "ip6" else p.ip for p in ready]
            match = where if where.startswith("fib") else f"{family} {where}"
            if not targets:
                rules[family].append(f"    {match} reject with tcp reset")
                continue
            entries = ", ".join(f"{i} : {ip}" for i, ip in enumerate(targets))
            rules[family].append(f"    {match} dnat to numgen inc mod {len(targets)} map {{ {entries} }} : "
                                 f"{target_port}")
    return "".join(f"table {family} {NFT_TABLE}\ndelete table {family} {NFT_TABLE}\n"
                   f"table {family} {NFT_TABLE} {{\n  chain prerouting {{\n"
                   f"    type nat hook prerouting priority dstnat; policy accept;\n" + "\n".join(lines) + "\n  }\n}\n"
                   for family, lines in rules.items())


def _apply(plan: LabPlan, services: list[dict[str, Any]]) -> None:
    doc = registry_with_services(plan, services)
    parse_registry(doc, plan.trust_domain, source=f"lab {plan.name} services")  # ConfigError names the field
    ruleset = nft_ruleset(plan, services)
    for node in plan.nodes:
        done = subprocess.run(["ip", "netns", "exec", node.netns, "nft", "-f", "-"], input=ruleset, text=True,
                              capture_output=True, timeout=30)
        if done.returncode != 0:
            raise LabError(f"nft in {node.netns} refused the service rules: {done.stderr.strip()}")
    _write(services_path(plan), json.dumps(services, indent=2) + "\n")
    _write(plan.registry_file, yaml.safe_dump(doc, sort_keys=False))


def _write(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)   # whatever the umask: the issuer refuses a registry others may write (agent/filetrust.py)
    os.replace(tmp, path)
