"""Attack: a dual-stack Service — its IPv6 virtual address — around the mesh.

Kubernetes dual-stack clusters give a Service an IPv6 ClusterIP beside the IPv4 one (``clusterIPs``,
``ipFamilies``), and kube-proxy DNATs each family to the endpoints of that family. The lab's Services
were IPv4 until this file; its kube-proxy stand-in now DNATs IPv6 virtual addresses to the
endpoints' IPv6 addresses, as a real dual-stack node does. Against that node, from a meshed pod and
from a process outside the mesh:

- a meshed pod's connect to ``[v6 VIP]:port`` is meshed (mTLS on the wire, both identities, the
  Service on the flow), to an endpoint on another node and on its own node;
- a pod a DENY policy names cannot reach the backend through the IPv6 VIP, the IPv4 VIP, the
  v4-mapped ``::ffff:a.b.c.d`` form of the IPv4 VIP (a dual-stack socket), for either endpoint;
- a port of the VIP the Service does not list is not the Service: the agent never dials it, and
  under ``outbound_passthrough: DENY`` it fails at connect() — for both families;
- a Service with no ready endpoint refuses at the agent (``UH``), over IPv6 too, never handing the
  connect to kube-proxy;
- a STRICT endpoint drops plaintext that kube-proxy DNATs to it from the IPv6 VIP.

Every one of these held on the code of session 6 (kept as guards). The Kubernetes source's JSON is
attacked without a lab (the mapping is pure): a dual-stack Service and EndpointSlices of both address
types must make both virtual addresses mesh destinations. That one was seen failing on a cluster
whose primary family is IPv6 (``podIP`` and ``clusterIP`` IPv6): every pod was left out as "not
IPv4" at debug level, so the Service was left to kube-proxy — plaintext, no policy.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Sequence

import pytest
import yaml

from agent.lab import lab as labops
from agent.lab.nsenter import socket_in_netns
from agent.lab.services import lab_service_set, service_document
from agent.lab.sniff import PacketCapture
from agent.telemetry.egress import ALLOWED_DETAIL
from tests.e2e.conftest import Lab

PORT = 7413
OTHER_PORT = 7414       # served by the backends too, but not a port of any Service
RELOAD = 15.0
VAULT = ("10.96.0.40", "fd00:96::40")   # -> n2p1 (the client's other node)
NEAR = ("10.96.0.41", "fd00:96::41")    # -> n1p3 (the client's own node)
EMPTY = ("10.96.0.42", "fd00:96::42")   # -> n2p1, not ready
OUTSIDE6 = "fd00:99::1"                  # in no registry

# dual-stack server: answers "secret for <peer> <what the client sent>"
SERVER = r"""
import socket, sys, threading
def serve(port):
    s = socket.socket(socket.AF_INET6)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", port)); s.listen(64)
    while True:
        c, peer = s.accept()
        with c:
            c.settimeout(2)
            try:
                got = c.recv(200).decode(errors="replace")
            except OSError:
                got = ""
            try:
                c.sendall(f"secret for {peer[0]} {got}\n".encode())
            except OSError:
                pass
for port in sys.argv[1:]:
    threading.Thread(target=serve, args=(int(port),), daemon=True).start()
print("listening", flush=True)
threading.Event().wait()
"""
# connect (AF_INET6 for any address with a colon: a v4-mapped one is a dual-stack socket's dial)
CLIENT = r"""
import json, socket, sys
address, port, marker, bind = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
s = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET); s.settimeout(5)
try:
    if bind:
        s.bind((bind, 0))
    s.connect(socket.getaddrinfo(address, port, s.family)[0][4]); s.sendall(marker.encode())  # fe80::1%eth0 too
    got = b""
    while not got.endswith(b"\n"):
        chunk = s.recv(200)
        if not chunk:
            break
        got += chunk
    print(json.dumps({"got": got.decode()}))
except OSError as exc:
    print(json.dumps({"errno": exc.errno, "error": type(exc).__name__}))
"""
DENY_INTRUDER = """\
kind: AuthorizationPolicy
metadata: {{name: deny-intruder, namespace: {ns}}}
spec:
  action: DENY
  rules:
    - from: [{{principals: ["{principal}"]}}]
"""
STRICT = """\
kind: PeerAuthentication
metadata: {{name: vault-strict, namespace: {ns}}}
spec:
  selector: {{workload: n2p1}}
  mtls: {{mode: STRICT}}
"""


def write_policy(lab: Lab, name: str, text: str) -> str:
    path = f"{lab.plan.state_dir}/policies/{name}.yaml"
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.chmod(path + ".tmp", 0o644)
    os.replace(path + ".tmp", path)
    return path


@pytest.fixture(scope="module")
def v6svc_lab(bpf_capable):
    name = f"h6{uuid.uuid4().hex[:6]}"
    lab = None
    try:
        lab = Lab(name, labops.lab_up(name, 2, 3, "h6.tcpmesh", service_accounts={
            "n1p1": "web", "n1p2": "intruder", "n1p3": "near", "n2p1": "vault"}))
        for pod in ("n2p1", "n1p3"):
            server = labops.lab_exec(name, pod, [sys.executable, "-c", SERVER, str(PORT), str(OTHER_PORT)],
                                     stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
            lab.apps.append(server)
            assert "listening" in server.stdout.readline()
        lab_service_set(lab.plan, service_document(lab.plan, "vault", VAULT, [(PORT, PORT)], [("n2p1", True)]))
        lab_service_set(lab.plan, service_document(lab.plan, "near", NEAR, [(PORT, PORT)], [("n1p3", True)]))
        lab_service_set(lab.plan, service_document(lab.plan, "empty", EMPTY, [(PORT, PORT)], [("n2p1", False)]))
        os.makedirs(f"{lab.plan.state_dir}/policies", exist_ok=True)
        write_policy(lab, "deny-intruder", DENY_INTRUDER.format(ns=lab.plan.namespace,
                                                                principal=lab.pod("n1p2").spiffe_id))
        # the agents have the Services and the policy once the permitted pod reaches both over IPv6 through the
        # mesh (a reply alone proves nothing: the node's DNAT answers too) and the intruder is denied a pod address
        started = time.time()
        for vip, service in ((VAULT[1], "vault"), (NEAR[1], "near")):
            eventually(lambda: "secret" in dial(lab, "n1p1", vip).get("got", "") and any(
                f["destination_service_name"] == service for f in lab.flows(1) if f["start_time"] >= started),
                f"control: n1p1 never reached Service {service} at [{vip}] through the mesh")
        # on both nodes: each agent reads the policy on its own poll, and "near" is checked by node1's agent
        for endpoint in ("n2p1", "n1p3"):
            eventually(lambda: not dial(lab, "n1p2", lab.pod(endpoint).ip).get("got"),
                       f"the DENY never applied on {endpoint}'s node")
        yield lab
    finally:
        if lab is not None:
            lab.stop_apps()
            labops.lab_down(name)


def dial(lab: Lab, pod: str, address: str, port: int = PORT, marker: str = "hello", bind: str = "") -> dict:
    """From ``pod`` (bound to ``bind``, if given): {"got": the reply} or {"error": ..., "errno": ...}."""
    proc = labops.lab_exec(lab.name, pod, [sys.executable, "-c", CLIENT, address, str(port), marker, bind],
                           stdout=subprocess.PIPE, text=True)
    return json.loads(proc.communicate(timeout=30)[0].strip().splitlines()[-1])


@contextlib.contextmanager
def vault_lab(prefix: str, trust_domain: str, capture_mode: str, port: int, vault: Sequence[str],
              node_port: int | None = None):
    """2 nodes x 2 pods, torn down afterwards: n1p1 (web), n1p2 (intruder, denied by name) and SERVER on ``port``
    in n2p1 behind Service ``vault`` at ``vault`` (and ``node_port``); yields once n1p1 reached n2p1 through the
    mesh (a flow says so) and the DENY applies."""
    name = f"{prefix}{uuid.uuid4().hex[:6]}"
    lab = None
    try:
        lab = Lab(name, labops.lab_up(name, 2, 2, trust_domain, capture_mode=capture_mode,
                                      service_accounts={"n1p1": "web", "n1p2": "intruder", "n2p1": "vault"}),
                  capture_mode)
        server = labops.lab_exec(name, "n2p1", [sys.executable, "-c", SERVER, str(port)],
                                 stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        lab.apps.append(server)
        assert "listening" in server.stdout.readline()
        lab_service_set(lab.plan, service_document(lab.plan, "vault", vault, [(port, port)], [("n2p1", True)],
                                                   node_ports=[node_port]))
        os.makedirs(f"{lab.plan.state_dir}/policies", exist_ok=True)
        write_policy(lab, "deny-intruder", DENY_INTRUDER.format(ns=lab.plan.namespace,
                                                                principal=lab.pod("n1p2").spiffe_id))
        started = time.time()
        eventually(lambda: "secret" in dial(lab, "n1p1", lab.pod("n2p1").ip, port=port).get("got", "") and any(
            f["destination_workload"] == "n2p1" for f in lab.flows(1) if f["start_time"] >= started),
            "control: n1p1 never reached n2p1's IPv4 address through the mesh")
        eventually(lambda: not dial(lab, "n1p2", lab.pod("n2p1").ip, port=port).get("got"),
                   "control: the DENY never applied over IPv4")
        yield lab
    finally:
        if lab is not None:
            lab.stop_apps()
            labops.lab_down(name)


def eventually(check, message: str, timeout: float = RELOAD) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, message
        time.sleep(0.5)


def flows_since(lab: Lab, node: int, since: float, **fields) -> list[dict]:
    return [f for f in lab.flows(node) if f["start_time"] >= since
            and all(f.get(k) == v for k, v in fields.items())]


def plaintext6(netns: str, address: str, port: int = PORT) -> str:
    """From ``netns`` outside every pod cgroup (not meshed): the reply, or the error's name."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket_in_netns(netns, family)
    try:
        sock.settimeout(1.5)
        sock.connect((address, port))
        sock.sendall(b"plain")
        return sock.recv(200).decode() or "closed"
    except OSError as exc:
        return type(exc).__name__
    finally:
        sock.close()


def test_a_connect_to_the_ipv6_service_address_is_meshed_across_nodes(v6svc_lab):
    lab = v6svc_lab
    node1 = lab.node(1)
    marker = f"V6-VIP-PLAINTEXT-{uuid.uuid4().hex}"
    since = time.time()
    with PacketCapture(node1.netns, node1.wire_ifname) as wire:
        result = dial(lab, "n1p1", VAULT[1], marker=marker)
        time.sleep(0.3)
    assert marker in result.get("got", ""), result
    assert not any(marker.encode() in frame for frame in wire.frames), "the IPv6 VIP's payload crossed the wire in plaintext"
    source = lab.wait_flow(1, lambda f: f["start_time"] >= since and f["source_workload"] == "n1p1"
                           and f["destination_service_name"] == "vault")
    assert (source["destination_workload"], source["security"], source["response_flags"]) == \
        ("n2p1", "mutual_tls", "-"), source
    destination = lab.wait_flow(2, lambda f: f["flow_id"] == source["flow_id"] and f["reporter"] == "destination")
    assert destination["source_principal"] == lab.pod("n1p1").spiffe_id


def test_a_connect_to_the_ipv6_service_address_of_a_same_node_endpoint_is_meshed(v6svc_lab):
    lab = v6svc_lab
    since = time.time()
    result = dial(lab, "n1p1", NEAR[1], marker="near-v6")
    assert "near-v6" in result.get("got", ""), result
    flow = lab.wait_flow(1, lambda f: f["start_time"] >= since and f["source_workload"] == "n1p1"
                         and f["destination_service_name"] == "near" and f["reporter"] == "source")
    assert flow["destination_workload"] == "n1p3" and flow["response_flags"] == "-", flow


@pytest.mark.parametrize("service", ["vault", "near"])
@pytest.mark.parametrize("form", ["ipv6", "ipv4", "v4-mapped"])
def test_a_denied_pod_cannot_reach_the_backend_through_any_form_of_the_service_address(v6svc_lab, service, form):
    lab = v6svc_lab
    v4, v6 = {"vault": VAULT, "near": NEAR}[service]
    address = {"ipv6": v6, "ipv4": v4, "v4-mapped": f"::ffff:{v4}"}[form]
    since = time.time()
    attack = dial(lab, "n1p2", address, marker="let-me-in")
    assert "secret" not in attack.get("got", ""), f"the intruder read the backend through {address}: {attack}"
    endpoint_node = 2 if service == "vault" else 1
    eventually(lambda: flows_since(lab, endpoint_node, since, response_flags="DENY", source_workload="n1p2",
                                   reporter="destination"),
               f"no DENY recorded for the intruder's connect to {address}", timeout=10)
    source = flows_since(lab, 1, since, source_workload="n1p2", reporter="source")
    assert source and source[-1]["destination_service_name"] == service, source


@pytest.mark.parametrize("family", [0, 1], ids=["ipv4", "ipv6"])
def test_a_port_the_service_does_not_list_is_not_dialled_by_the_agent(v6svc_lab, family):
    lab = v6svc_lab
    since = time.time()
    attack = dial(lab, "n1p2", VAULT[family], port=OTHER_PORT, marker="other-port")
    assert "secret" not in attack.get("got", ""), attack
    eventually(lambda: [f for f in flows_since(lab, 1, since, source_workload="n1p2") if f["destination_port"] == OTHER_PORT],
               "the kernel never reported the connect outside the mesh", timeout=10)
    carried = [f for f in flows_since(lab, 1, since, source_workload="n1p2")
               if f["destination_port"] == OTHER_PORT and f["detail"] != ALLOWED_DETAIL]
    assert not carried, f"the agent carried a port the Service does not list: {carried}"


@pytest.mark.parametrize("family", [0, 1], ids=["ipv4", "ipv6"])
def test_a_service_with_no_ready_endpoint_is_refused_by_the_agent_not_passed_to_kube_proxy(v6svc_lab, family):
    lab = v6svc_lab
    since = time.time()
    result = dial(lab, "n1p1", EMPTY[family], marker="anyone?")
    assert "secret" not in result.get("got", ""), result
    flow = lab.wait_flow(1, lambda f: f["start_time"] >= since and f["destination_service_name"] == "empty")
    assert flow["response_flags"] == "UH" and flow["source_workload"] == "n1p1", flow


def test_plaintext_through_the_ipv6_service_address_into_a_strict_endpoint_is_dropped(v6svc_lab):
    lab = v6svc_lab
    outsider = lab.pod("n1p2").netns  # the intruder's netns, outside its cgroup: not meshed, kube-proxy DNATs it
    assert "secret" in plaintext6(outsider, VAULT[1]), "control: kube-proxy's IPv6 DNAT does not reach n2p1"
    path = write_policy(lab, "vault-strict", STRICT.format(ns=lab.plan.namespace))
    try:
        eventually(lambda: plaintext6(outsider, VAULT[1]) in ("TimeoutError", "timeout"),
                   "STRICT never dropped plaintext DNATed from the IPv6 Service address")
        assert plaintext6(outsider, VAULT[0]) in ("TimeoutError", "timeout")
        meshed = dial(lab, "n1p1", VAULT[1], marker="still-meshed")
        assert "still-meshed" in meshed.get("got", ""), meshed
    finally:
        os.unlink(path)


def test_passthrough_deny_refuses_unlisted_ports_and_unknown_ipv6_and_keeps_the_service(v6svc_lab):
    lab = v6svc_lab
    node = lab.node(1)
    original = Path(node.config_file).read_text()
    config = yaml.safe_load(original)
    config.setdefault("policy", {})["outbound_passthrough"] = "DENY"
    Path(node.config_file).write_text(yaml.safe_dump(config, sort_keys=False))
    try:
        labops.lab_restart_agent(lab.name, node.name)
        for address, port in ((VAULT[1], OTHER_PORT), (VAULT[0], OTHER_PORT), (OUTSIDE6, PORT)):
            result = dial(lab, "n1p1", address, port=port)
            assert result.get("errno") == errno.EPERM, (address, port, result)
        for address in VAULT:
            meshed = dial(lab, "n1p1", address, marker="deny-mode")
            assert "deny-mode" in meshed.get("got", ""), (address, meshed)
    finally:
        Path(node.config_file).write_text(original)
        labops.lab_restart_agent(lab.name, node.name)


# ---- the Kubernetes source's JSON (pure: no lab) ----------------------------------------------------------------

def _pod(name: str, node: str, ips: list[str], sa: str = "default") -> dict:
    return {"metadata": {"name": name, "namespace": "shop", "uid": f"uid-{name}", "creationTimestamp": "2026-12-06T00:00:00Z"},
            "spec": {"nodeName": node, "serviceAccountName": sa},
            "status": {"phase": "Running", "podIP": ips[0], "podIPs": [{"ip": ip} for ip in ips]}}


def _node(name: str, ip: str) -> dict:
    return {"metadata": {"name": name}, "status": {"addresses": [{"type": "InternalIP", "address": ip}]}}


def _dual_stack_service(cluster_ips: list[str]) -> dict:
    return {"metadata": {"name": "db", "namespace": "shop"},
            "spec": {"clusterIP": cluster_ips[0], "clusterIPs": cluster_ips,
                     "ipFamilies": ["IPv6" if ":" in ip else "IPv4" for ip in cluster_ips],
                     "ipFamilyPolicy": "RequireDualStack", "ports": [{"name": "pg", "port": 5432, "protocol": "TCP"}]}}


def _slice(address_type: str, address: str, pod: str) -> dict:
    return {"metadata": {"name": f"db-{address_type.lower()}", "namespace": "shop",
                         "labels": {"kubernetes.io/service-name": "db"}},
            "addressType": address_type, "ports": [{"name": "pg", "port": 5432, "protocol": "TCP"}],
            "endpoints": [{"addresses": [address], "conditions": {"ready": True},
                           "targetRef": {"kind": "Pod", "namespace": "shop", "name": pod}}]}


@pytest.mark.parametrize("primary", ["IPv4", "IPv6"])
def test_a_dual_stack_service_from_the_kubernetes_api_is_a_mesh_destination_on_both_addresses(primary):
    """clusterIPs of both families (either primary, as ipFamilies orders them) and one EndpointSlice per family:
    both virtual addresses resolve to the pod, so both are captured and meshed — none is left to kube-proxy."""
    from agent.capture.meshdsts import mesh_entries, service_destinations, lookup
    from agent.capture import abi
    from agent.registry.kubernetes.mapping import build_registry

    v4, v6 = "10.96.0.10", "fd00:96::10"
    pod_ips = ["10.244.1.5", "fd00:244:1::5"]
    cluster_ips = [v4, v6]
    if primary == "IPv6":
        pod_ips.reverse()
        cluster_ips.reverse()
    result = build_registry("k.tcpmesh", "n1", [_pod("db-0", "n1", pod_ips, "db")], [_node("n1", "192.168.0.1")],
                            lambda pod: "/sys/fs/cgroup/kubepods/pod-db-0",
                            [_dual_stack_service(cluster_ips)],
                            [_slice("IPv4", "10.244.1.5", "db-0"), _slice("IPv6", "fd00:244:1::5", "db-0")])
    registry = result.registry
    assert [w.key for w in registry.workloads] == ["shop/db-0"], result.skipped
    for vip in (v4, v6):
        frontend = registry.service_at(vip, 5432)
        assert frontend is not None, f"{vip}:5432 is not a mesh destination: {result.services_skipped}"
        assert [w.key for w in frontend[2]] == ["shop/db-0"]
    entries = mesh_entries(service_destinations(registry.service_frontends()))
    assert lookup(entries, v6, 5432) == abi.DST_SERVICE and lookup(entries, v4, 5432) == abi.DST_SERVICE
    assert lookup(entries, v6, 5433) is None  # another port of the VIP is not the Service


@pytest.mark.parametrize("field", ["externalIPs", "loadBalancer"])
def test_a_services_external_and_load_balancer_addresses_are_mesh_destinations(field):
    """kube-proxy DNATs a Service's ``spec.externalIPs`` and ``status.loadBalancer.ingress[].ip`` (ipMode VIP, the
    default) to its endpoints for in-cluster clients too, just like the ClusterIP — so a pod a DENY names would
    reach the backend in plaintext through them unless they are mesh destinations like the ClusterIP."""
    from agent.registry.kubernetes.mapping import build_registry

    service = _dual_stack_service(["10.96.0.10", "fd00:96::10"])
    service["spec"]["type"] = "LoadBalancer"
    if field == "externalIPs":
        service["spec"]["externalIPs"] = ["192.0.2.10", "2001:db8::10"]
        extra = ["192.0.2.10", "2001:db8::10"]
    else:
        service["status"] = {"loadBalancer": {"ingress": [{"ip": "198.51.100.7"}, {"ip": "2001:db8::7", "ipMode": "VIP"},
                                                          {"ip": "198.51.100.8", "ipMode": "Proxy"},
                                                          {"hostname": "lb.example.com"}]}}
        extra = ["198.51.100.7", "2001:db8::7"]
    result = build_registry("k.tcpmesh", "n1", [_pod("db-0", "n1", ["10.244.1.5", "fd00:244:1::5"], "db")],
                            [_node("n1", "192.168.0.1")], lambda pod: "/sys/fs/cgroup/kubepods/pod-db-0", [service],
                            [_slice("IPv4", "10.244.1.5", "db-0")])
    for address in extra:
        assert result.registry.service_at(address, 5432) is not None, \
            f"{field} {address}:5432 is not a mesh destination: a denied pod reaches db-0 through it in plaintext"
    # ipMode Proxy: kube-proxy sends in-cluster traffic to the load balancer itself (its PROXY protocol, its
    # policies), so the mesh leaves that address alone, as kube-proxy does
    assert result.registry.service_at("198.51.100.8", 5432) is None
