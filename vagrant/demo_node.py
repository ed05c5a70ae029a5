"""tcpmesh-demo: the node side of vagrant/e2e.sh (installed by vagrant/provision.sh as
/usr/local/sbin/tcpmesh-demo, run as root with the agent's Python).

Runs demo applications in the demo pods (network namespace + cgroup, made by provision.sh) and
checks, on this node, what tests/e2e checks on the lab: bytes arrive intact, the wire carries TLS
and never the plaintext, both agents count the flow under the pods' identities, and a DENY policy
refuses a connection fast. Each check prints one line and exits 1 on failure.

    tcpmesh-demo pod POD CMD...                    run CMD in a pod
    tcpmesh-demo pod-ip POD
    tcpmesh-demo serve POD PORT MODE               start a sampleapps server in a pod (background)
    tcpmesh-demo stop-servers
    tcpmesh-demo echo-check POD IP PORT BYTES
    tcpmesh-demo wire-check POD IP PORT
    tcpmesh-demo metrics-check REPORTER SRC_POD DST_POD
    tcpmesh-demo deny-check POD IP PORT
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

INBOUND_PORT = 15008
TLS_APPLICATION_DATA = b"\x17\x03\x03"


class Node:
    def __init__(self, env_file: str) -> None:
        values = dict(line.split("=", 1) for line in Path(env_file).read_text().splitlines()
                      if line and not line.startswith("#"))
        self.name = values["NODE_NAME"]
        self.netns_prefix = values["NETNS_PREFIX"]
        self.pods_cgroup = values["PODS_CGROUP"]
        self.state_dir = Path(values["DEMO_STATE_DIR"])
        self.admin = values["ADMIN_URL"]
        self.wire_ifname = values["WIRE_IFNAME"]
        self.trust_domain = values["TRUST_DOMAIN"]
        self.namespace = values["POD_NAMESPACE"]
        self.pod_subnet = values["POD_SUBNET_PREFIX"]   # "10.77"

    def pod_argv(self, pod: str, argv: list[str]) -> list[str]:
        cgroup = f"{self.pods_cgroup}/{pod}"
        # join the pod's cgroup first (cgroup hooks bind at socket creation), then its netns
        return ["sh", "-c", f'echo $$ > "{cgroup}/cgroup.procs" && exec ip netns exec "{self.netns_prefix}{pod}" "$@"',
                "tcpmesh-pod", *argv]

    def pod_ip(self, pod: str) -> str:
        node_index, pod_index = pod[1:].split("p")
        return f"{self.pod_subnet}.{int(node_index)}.{10 + int(pod_index)}"

    def principal(self, pod: str) -> str:
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/{pod}"


def sampleapp(*args: str) -> list[str]:
    return [sys.executable, "-m", "agent.demo.sampleapps", *args]


def client(node: Node, pod: str, ip: str, port: str, size: int, mode: str, marker: str = "",
           name: str = "e2e-client") -> dict:
    done = subprocess.run(node.pod_argv(pod, sampleapp("client", "--connect", f"{ip}:{port}", "--bytes", str(size),
                                                       "--mode", mode, "--marker", marker, "--name", name,
                                                       "--timeout", "20")),
                          capture_output=True, text=True, timeout=60)
    lines = done.stdout.strip().splitlines()
    if not lines:
        fail(f"client in {pod} printed nothing (exit {done.returncode}): {done.stderr.strip()}")
    return json.loads(lines[-1])


def fail(message: str) -> None:
    print(f"FAIL {message}")
    sys.exit(1)


def ok(message: str) -> None:
    print(f"ok   {message}")


def serve(node: Node, pod: str, port: str, mode: str) -> None:
    node.state_dir.mkdir(parents=True, exist_ok=True)
    log = node.state_dir / f"server-{pod}-{port}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(node.pod_argv(pod, sampleapp("server", "--port", port, "--mode", mode)),
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    (node.state_dir / f"server-{pod}-{port}.pid").write_text(str(proc.pid))
    deadline = time.monotonic() + 20
    while b"listening" not in log.read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            fail(f"server in {pod}:{port} did not start: {log.read_text()[-500:]}")
        time.sleep(0.05)
    ok(f"server {mode} in {pod} on :{port} (pid {proc.pid})")


def stop_servers(node: Node) -> None:
    for pid_file in node.state_dir.glob("server-*.pid"):
        pid = int(pid_file.read_text())
        try:
            os.killpg(pid, signal.SIGTERM)   # its own session: the sh wrapper exec'd into the server
        except ProcessLookupError:
            pass
        pid_file.unlink()
    ok("servers stopped")


def echo_check(node: Node, pod: str, ip: str, port: str, size: str) -> None:
    result = client(node, pod, ip, port, int(size), "echo")
    if result.get("error") or not result.get("complete"):
        fail(f"{pod} → {ip}:{port}: {result}")
    if not (result["sent"] == result["received"] == int(size) and result["sent_sha256"] == result["received_sha256"]):
        fail(f"{pod} → {ip}:{port}: bytes differ: {result}")
    if result.get("peer") != [ip, int(port)]:
        fail(f"{pod} → {ip}:{port}: the application saw peer {result.get('peer')}")
    ok(f"{size} bytes from {pod} to {ip}:{port} came back intact (sha256 {result['sent_sha256'][:16]}…)")


def wire_check(node: Node, pod: str, ip: str, port: str) -> None:
    from agent.lab.sniff import PacketCapture

    marker = f"PLAINTEXT-MARKER-{uuid.uuid4().hex}"
    with PacketCapture("/proc/self/ns/net", node.wire_ifname) as capture:
        result = client(node, pod, ip, port, 65536, "echo", marker=marker)
        time.sleep(0.2)
    if not result.get("complete"):
        fail(f"{pod} → {ip}:{port}: {result}")
    segments = capture.tcp_segments()
    to_tunnel = b"".join(s.payload for s in segments if s.dport == INBOUND_PORT)
    if TLS_APPLICATION_DATA not in to_tunnel:
        fail(f"no TLS application data to :{INBOUND_PORT} on {node.wire_ifname}")
    if marker.encode() in b"".join(s.payload for s in segments):
        fail(f"the plaintext marker crossed {node.wire_ifname}")
    if any(int(port) in (s.sport, s.dport) for s in segments):
        fail(f"plaintext port {port} seen on {node.wire_ifname}")
    ok(f"{node.wire_ifname} carried TLS to :{INBOUND_PORT}, never the plaintext or port {port}")


def metrics_check(node: Node, reporter: str, source: str, destination: str) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"{node.admin}/metrics", timeout=5).read().decode()
    wanted = {"reporter": reporter, "source_principal": node.principal(source),
              "destination_principal": node.principal(destination), "connection_security_policy": "mutual_tls"}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "tcpmesh_tcp_connections_opened_total" and sample.value > 0 and \
                    all(sample.labels.get(k) == v for k, v in wanted.items()):
                ok(f"{node.name} counts {source} → {destination} as {reporter}, mutual_tls, by identity")
                return
    fail(f"{node.name}: no tcpmesh_tcp_connections_opened_total with {wanted}")


def deny_check(node: Node, pod: str, ip: str, port: str) -> None:
    started = time.monotonic()
    result = client(node, pod, ip, port, 2000, "digest", name="e2e-denied")
    took = time.monotonic() - started
    if result.get("complete"):
        fail(f"{pod} → {ip}:{port} was allowed: {result}")
    flows = json.loads(urllib.request.urlopen(f"{node.admin}/debug/flows", timeout=5).read())["flows"]
    denied = [f for f in flows if f["destination_port"] == int(port) and f["response_flags"] == "DENY"]
    if not denied:
        fail(f"no DENY flow to :{port} on {node.name}: {flows[-3:]}")
    if took > 10:
        fail(f"the denied client took {took:.1f}s: it must fail fast")
    ok(f"{pod} → {ip}:{port} denied by policy {denied[-1].get('policy') or ''} in {took:.2f}s")


def main(argv: list[str]) -> None:
    env_file = os.environ.get("TCPMESH_DEMO_ENV", "/etc/tcpmesh/demo.env")
    node = Node(env_file)
    command, args = argv[0], argv[1:]
    if command == "pod":
        os.execvp("sh", node.pod_argv(args[0], args[1:]))
    elif command == "pod-ip":
        print(node.pod_ip(args[0]))
    elif command == "serve":
        serve(node, *args)
    elif command == "stop-servers":
        stop_servers(node)
    elif command == "echo-check":
        echo_check(node, *args)
    elif command == "wire-check":
        wire_check(node, *args)
    elif command == "metrics-check":
        metrics_check(node, *args)
    elif command == "deny-check":
        deny_check(node, *args)
    else:
        print(__doc__, file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main(sys.argv[1:])
