"""``tcpmesh demo``: a 2-node lab, a server pod on node 2, two client pods on node 1, and what the
mesh saw, on one screen: a flow table (who, which process, to whom, bytes, mTLS), a summary per
identity pair from both agents' /metrics (connections, bytes, tunnel RTT p50, retransmits, security),
and where to look next. ``--metrics`` adds the raw Prometheus lines.

``format_flow_table``, ``pair_summary``, ``format_pair_table``, ``next_steps`` and ``metric_lines`` are
pure; ``run_demo`` drives the lab.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Iterable

import click
from prometheus_client.parser import text_string_to_metric_families

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


@dataclass
class PairSummary:
    """What both agents' /metrics say about one (source identity, destination identity) pair."""
    source: str
    destination: str
    connections: int = 0       # opened, as the source side counted them
    failed: int = 0
    sent: int = 0              # client → server bytes
    received: int = 0
    retransmits: int = 0       # both legs, both sides
    security: set[str] = field(default_factory=set)
    rtt_buckets: dict[float, float] = field(default_factory=dict)  # le → cumulative count, tunnel leg, source side

    def rtt_p50_seconds(self) -> float | None:
        return histogram_quantile(0.5, self.rtt_buckets)


def histogram_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus' histogram_quantile over cumulative ``buckets`` (le → count): linear within a bucket."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    rank = q * buckets[bounds[-1]]
    lower, below = 0.0, 0.0
    for le in bounds:
        count = buckets[le]
        if count >= rank:
            if le == float("inf"):
                return lower
            return lower + (le - lower) * ((rank - below) / (count - below) if count > below else 1.0)
        lower, below = le, count
    return None


def pair_summary(expositions: Iterable[str]) -> list[PairSummary]:
    """One row per identity pair from the /metrics text of the agents (source and destination side)."""
    pairs: dict[tuple[str, str], PairSummary] = {}
    for text in expositions:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = sample.labels
                if "source_principal" not in labels or "destination_principal" not in labels:
                    continue
                key = (labels["source_principal"], labels["destination_principal"])
                row = pairs.setdefault(key, PairSummary(*key))
                value, source_side = sample.value, labels.get("reporter") == "source"
                if sample.name == "tcpmesh_tcp_retransmits_total":
                    row.retransmits += int(value)
                elif sample.name == "tcpmesh_tcp_rtt_seconds_bucket":
                    if source_side and labels.get("leg") == "tunnel":
                        le = float(labels["le"])
                        row.rtt_buckets[le] = row.rtt_buckets.get(le, 0.0) + value
                elif not source_side:
                    continue
                elif sample.name == "tcpmesh_tcp_connections_opened_total":
                    row.connections += int(value)
                    if value:
                        row.security.add(labels.get("connection_security_policy", "?"))
                elif sample.name == "tcpmesh_tcp_connections_failed_total":
                    row.failed += int(value)
                elif sample.name == "tcpmesh_tcp_received_bytes_total":
                    row.sent += int(value)
                elif sample.name == "tcpmesh_tcp_sent_bytes_total":
                    row.received += int(value)
    return [pairs[key] for key in sorted(pairs)]


def _short_identity(spiffe_id: str) -> str:
    """``ns/NS/sa/SA`` of a SPIFFE ID (the trust domain is said once, above the table)."""
    head, sep, path = spiffe_id.removeprefix("spiffe://").partition("/")
    return path if sep else head


def _bytes(n: int) -> str:
    return f"{n / 1024:.0f} KiB" if n >= 10 * 1024 else f"{n} B"


def format_pair_table(rows: Iterable[PairSummary]) -> str:
    header = ("SOURCE", "DESTINATION", "CONNS", "FAILED", "SENT", "RECEIVED", "RTT p50", "RETRANS", "SECURITY")
    lines = [header]
    for row in rows:
        p50 = row.rtt_p50_seconds()
        lines.append((_short_identity(row.source), _short_identity(row.destination), str(row.connections),
                      str(row.failed), _bytes(row.sent), _bytes(row.received),
                      "-" if p50 is None else f"{p50 * 1000:.2f} ms", str(row.retransmits),
                      ",".join(sorted(row.security)) or "-"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(line)).rstrip() for line in lines)


def next_steps(lab: str, nodes: Iterable, keep: bool) -> str:
    """Where to look next: the commands, the /metrics URLs and the dashboard, for this lab's nodes."""
    out = ["Where to look next" + ("" if keep else " (run `tcpmesh demo --keep` to keep the lab up for these)") + ":"]
    for node in nodes:
        out.append(f"  {node.name}: tcpmesh flows --socket {node.state_dir}/agent.sock   # flows, with pid/command")
        out.append(f"  {node.name}: ip netns exec {node.netns} curl -s http://{node.admin_address}/metrics")
    out.append("  Grafana: import deploy/grafana/tcpmesh.json; Prometheus: deploy/prometheus/ (docs/telemetry.md)")
    out.append("  the raw tcpmesh_tcp_* Prometheus lines both agents exported: tcpmesh demo --metrics")
    if keep:
        out.append(f"  tcpmesh lab status --name {lab}   ...   tcpmesh lab down --name {lab}")
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


def run_demo(keep: bool, show_metrics: bool = False, echo=click.echo) -> None:
    echo("tcpmesh demo: building a lab of 2 nodes x 2 pods (network namespaces + cgroups), one agent per node ...")
    # --keep: the lab outlives the demo (no owner, `tcpmesh lab down` removes it); else the demo owns it
    plan = labops.lab_up(DEMO_LAB, 2, 2, DEMO_TRUST_DOMAIN, service_accounts=DEMO_SERVICE_ACCOUNTS,
                         owner_pid=None if keep else labops.OWNER_SELF)
    started: list[subprocess.Popen] = []
    try:
        server_ip = plan.pod(SERVER_POD).ip
        server = labops.lab_exec(DEMO_LAB, SERVER_POD, [sys.executable, "-m", "agent.demo.sampleapps", "server",
                                                        "--port", str(SERVER_PORT), "--mode", "digest",
                                                        "--name", "demo-db"],
                                 stdout=subprocess.PIPE, text=True)
        started.append(server)
        server.stdout.readline()  # {"listening": ...}
        echo(f"server: pod {SERVER_POD} on node2 ({server_ip}:{SERVER_PORT}), "
             f"identity {plan.pod(SERVER_POD).spiffe_id}")
        for pod, comm, size in CLIENTS:
            result = labops.lab_exec(DEMO_LAB, pod, [sys.executable, "-m", "agent.demo.sampleapps", "client",
                                                     "--connect", f"{server_ip}:{SERVER_PORT}", "--bytes", str(size),
                                                     "--mode", "digest", "--name", comm],
                                     stdout=subprocess.PIPE, text=True)
            out, _ = result.communicate(timeout=30)
            answer = json.loads(out.strip().splitlines()[-1]) if out.strip() else {"error": "no output"}
            if "error" in answer:
                raise click.ClickException(f"client in {pod} failed: {answer['error']}")
            echo(f"client: pod {pod} on node1 ({comm}) sent {answer['sent']} bytes, half-closed; the server "
                 f"answered sha256 {answer['reply'].split()[0][:12]}...; getpeername() says "
                 f"{answer['peer'][0]}:{answer['peer'][1]}")
        node1, node2 = plan.nodes[0], plan.nodes[1]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            src, dst = _closed_flows(plan, node1), _closed_flows(plan, node2)
            if len(src) >= len(CLIENTS) and len(dst) >= len(CLIENTS):
                break
            time.sleep(0.1)
        expositions = [_agent_get(plan, node, "/metrics").decode() for node in (node1, node2)]
        echo("\nFlows seen by the mesh (node1 reports the source side, node2 the destination side):\n")
        echo(format_flow_table(src, dst))
        echo(f"\nPer identity pair (trust domain {DEMO_TRUST_DOMAIN}), from both agents' /metrics; RTT p50 of the\n"
             f"node-to-node tunnel as node1's kernel measured it, retransmits of every leg:\n")
        echo(format_pair_table(pair_summary(expositions)))
        if show_metrics:
            echo("\nPrometheus metrics, node1 (reporter=source) and node2 (reporter=destination):\n")
            for text in expositions:
                for line in metric_lines(text):
                    echo(line)
        echo("\n" + next_steps(DEMO_LAB, plan.nodes, keep))
    finally:
        for proc in started:
            proc.terminate()
            proc.wait(timeout=5)
        if keep:
            echo(f"\nThe lab is still running; to open a connection yourself, start a server first, then:\n"
                 f"  tcpmesh lab exec --name {DEMO_LAB} n1p1 -- python3 -m agent.demo.sampleapps client "
                 f"--connect {plan.pod(SERVER_POD).ip}:{SERVER_PORT}")
        else:
            labops.lab_down(DEMO_LAB)
            echo("\nlab removed: no namespace, veth, cgroup, BPF program or agent left behind.")


@click.command()
@click.option("--keep", is_flag=True, help="Leave the lab running afterwards and print how to explore it.")
@click.option("--metrics", "show_metrics", is_flag=True,
              help="Also print every tcpmesh_tcp_* Prometheus line both agents exported.")
def demo(keep: bool, show_metrics: bool) -> None:
    """Run tcpmesh on a built-in 2-node lab and show intercepted mTLS flows.

    Ctrl-C, SIGTERM or SIGHUP (also while the lab is being built) remove the lab before the demo exits."""
    from agent.lab.interrupt import interrupt_tears_down

    with interrupt_tears_down():
        run_demo(keep, show_metrics)
