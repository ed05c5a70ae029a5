"""``tcpmesh demo``: a 2-node lab, a server pod on node 2, two client pods on node 1, and what the
mesh saw: a flow table (who, which process, to whom, bytes, mTLS) and the Prometheus lines.

``format_flow_table`` and ``metric_lines`` are pure; ``run_demo`` drives the lab.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Iterable

import click

from agent.lab import lab as labops
from agent.lab.nsenter import http_get_in_netns

DEMO_LAB = "demo"
DEMO_TRUST_DOMAIN = "demo.tcpmesh"
DEMO_SERVICE_ACCOUNTS = {"n1p1": "web", "n1p2": "batch", "n2p1": "db", "n2p2": "cache"}
SERVER_POD, SERVER_PORT = "n2p1", 7000
CLIENTS = (("n1p1", "web-frontend", 256 * 1024), ("n1p2", "nightly-batch", 64 * 1024))
FLOW_COLUMNS = (("SOURCE", "source"), ("PID", "pid"), ("COMMAND", "comm"), ("DESTINATION", "destination"),
                ("PORT", "destination_port"), ("SENT", "bytes_received"), ("RECEIVED", "bytes_sent"),
                ("SECURITY", "security"), ("FLAGS", "response_flags"))


def format_flow_table(source_flows: Iterable[dict], destination_flows: Iterable[dict]) -> str:
    """One row per connection, joined across the two reporters by flow id."""
    by_id = {f["flow_id"]: f for f in destination_flows}
    rows = []
    for flow in source_flows:
        dst = by_id.get(flow["flow_id"], {})
        rows.append({
            "source": f"{flow['source_namespace']}/{flow['source_workload']}\n  {flow['source_principal']}",
            "pid": str(flow.get("pid") or "-"),
            "comm": flow.get("comm") or "-",
            "destination": f"{flow['destination_namespace']}/{flow['destination_workload']}\n  "
                           f"{dst.get('destination_principal', flow['destination_principal'])}",
            "destination_port": str(flow["destination_port"]),
            "bytes_received": str(flow["bytes_received"]),  # client → server
            "bytes_sent": str(flow["bytes_sent"]),
            "security": flow["security"] if not dst else f"{flow['security']}",
            "response_flags": flow["response_flags"],
        })
    first_lines = [[row[key].split("\n")[0] for _, key in FLOW_COLUMNS] for row in rows]
    widths = [max([len(title)] + [len(line[i]) for line in first_lines]) for i, (title, _) in enumerate(FLOW_COLUMNS)]
    out = ["  ".join(title.ljust(widths[i]) for i, (title, _) in enumerate(FLOW_COLUMNS))]
    for row, line in zip(rows, first_lines):
        out.append("  ".join(value.ljust(widths[i]) for i, value in enumerate(line)))
        out.append("  " + row["source"].split("\n")[1].strip() + "  ->  " + row["destination"].split("\n")[1].strip())
    return "\n".join(out)


def metric_lines(exposition: str, prefix: str = "tcpmesh_tcp_") -> list[str]:
    """The sample lines of ``prefix`` metrics (no HELP/TYPE, no _created samples)."""
    return [line for line in exposition.splitlines()
            if line.startswith(prefix) and "_created{" not in line]


def _agent_get(plan, node, path: str) -> bytes:
    status, body = http_get_in_netns(node.netns, f"http://{node.admin_address}{path}")
    if status != 200:
        raise click.ClickException(f"{node.name} admin {path} answered HTTP {status}")
    return body


def _closed_flows(plan, node) -> list[dict]:
    return [f for f in json.loads(_agent_get(plan, node, "/debug/flows"))["flows"] if f["end_time"] is not None]


def run_demo(keep: bool, echo=click.echo) -> None:
    echo("tcpmesh demo: building a lab of 2 nodes x 2 pods (network namespaces + cgroups), one agent per node ...")
    plan = labops.lab_up(DEMO_LAB, 2, 2, DEMO_TRUST_DOMAIN, service_accounts=DEMO_SERVICE_ACCOUNTS)
    started: list[subprocess.Popen] = []
    try:
        server_ip = plan.pod(SERVER_POD).ip
        server = labops.lab_exec(DEMO_LAB, SERVER_POD, [sys.executable, "-m", "agent.sampleapps", "server",
                                                        "--port", str(SERVER_PORT), "--mode", "digest",
                                                        "--name", "demo-db"],
                                 stdout=subprocess.PIPE, text=True)
        started.append(server)
        server.stdout.readline()  # {"listening": ...}
        echo(f"server: pod {SERVER_POD} on node2 ({server_ip}:{SERVER_PORT}), "
             f"identity {plan.pod(SERVER_POD).spiffe_id}")
        for pod, comm, size in CLIENTS:
            result = labops.lab_exec(DEMO_LAB, pod, [sys.executable, "-m", "agent.sampleapps", "client",
                                                     "--connect", f"{server_ip}:{SERVER_PORT}", "--bytes", str(size),
                                                     "--mode", "digest", "--name", comm],
                                     stdout=subprocess.PIPE, text=True)
            out, _ = result.communicate(timeout=30)
            answer = json.loads(out.strip().splitlines()[-1]) if out.strip() else {"error": "no output"}
            if "error" in answer:
                raise click.ClickException(f"client in {pod} failed: {answer['error']}")
            echo(f"client: pod {pod} on node1 sent {answer['sent']} bytes to {server_ip}:{SERVER_PORT}, "
                 f"half-closed, server answered sha256 {answer['reply'].split()[0][:16]}... "
                 f"(its getpeername() says {answer['peer'][0]}:{answer['peer'][1]})")
        node1, node2 = plan.nodes[0], plan.nodes[1]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            src, dst = _closed_flows(plan, node1), _closed_flows(plan, node2)
            if len(src) >= len(CLIENTS) and len(dst) >= len(CLIENTS):
                break
            time.sleep(0.1)
        echo("\nFlows seen by the mesh (node1 reports the source side, node2 the destination side):\n")
        echo(format_flow_table(src, dst))
        echo("\nPrometheus metrics, node1 (reporter=source) and node2 (reporter=destination):\n")
        for node in (node1, node2):
            for line in metric_lines(_agent_get(plan, node, "/metrics").decode()):
                echo(line)
    finally:
        for proc in started:
            proc.terminate()
            proc.wait(timeout=5)
        if keep:
            echo(f"\nThe lab is still running. Try:\n"
                 f"  tcpmesh lab status --name {DEMO_LAB}\n"
                 f"  tcpmesh lab exec --name {DEMO_LAB} n1p1 -- python3 -m agent.sampleapps client "
                 f"--connect {plan.pod(SERVER_POD).ip}:{SERVER_PORT}   (start a server first)\n"
                 f"  ip netns exec {plan.nodes[0].netns} curl -s http://{plan.nodes[0].admin_address}/metrics\n"
                 f"  tcpmesh lab down --name {DEMO_LAB}")
        else:
            labops.lab_down(DEMO_LAB)
            echo("\nlab removed: no namespace, veth, cgroup, BPF program or agent left behind.")


@click.command()
@click.option("--keep", is_flag=True, help="Leave the lab running afterwards and print how to explore it.")
def demo(keep: bool) -> None:
    """Run tcpmesh on a built-in 2-node lab and show intercepted mTLS flows."""
    run_demo(keep)
