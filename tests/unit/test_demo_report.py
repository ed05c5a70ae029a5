"""What `tcpmesh demo` prints after the lab ran: the per-identity-pair summary from both agents'
/metrics text, the quantile it estimates from the kernel's RTT buckets, and where to look next."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from agent.demo.run import format_pair_table, histogram_quantile, next_steps, pair_summary

REPO = Path(__file__).resolve().parents[1].parent
WEB, BATCH, DB = ("spiffe://demo.tcpmesh/ns/lab/sa/web", "spiffe://demo.tcpmesh/ns/lab/sa/batch",
                  "spiffe://demo.tcpmesh/ns/lab/sa/db")


def flow_labels(reporter: str, source: str, flags: str = "-") -> str:
    return (f'connection_security_policy="mutual_tls",destination_principal="{DB}",reporter="{reporter}",'
            f'response_flags="{flags}",source_principal="{source}"')


def stats_labels(reporter: str, leg: str, source: str) -> str:
    return f'destination_principal="{DB}",leg="{leg}",reporter="{reporter}",source_principal="{source}"'


def exposition(reporter: str) -> str:
    lines = [
        "# TYPE tcpmesh_tcp_connections_opened_total counter",
        f"tcpmesh_tcp_connections_opened_total{{{flow_labels(reporter, WEB)}}} 3.0",
        f"tcpmesh_tcp_connections_opened_total{{{flow_labels(reporter, BATCH)}}} 1.0",
        "# TYPE tcpmesh_tcp_connections_failed_total counter",
        f"tcpmesh_tcp_connections_failed_total{{{flow_labels(reporter, WEB, 'DC')}}} 1.0",
        "# TYPE tcpmesh_tcp_received_bytes_total counter",
        f"tcpmesh_tcp_received_bytes_total{{{flow_labels(reporter, WEB)}}} 262144.0",
        "# TYPE tcpmesh_tcp_sent_bytes_total counter",
        f"tcpmesh_tcp_sent_bytes_total{{{flow_labels(reporter, WEB)}}} 72.0",
        "# TYPE tcpmesh_tcp_retransmits_total counter",
        f"tcpmesh_tcp_retransmits_total{{{stats_labels(reporter, 'app', WEB)}}} 1.0",
        f"tcpmesh_tcp_retransmits_total{{{stats_labels(reporter, 'tunnel', WEB)}}} 2.0",
        "# TYPE tcpmesh_tcp_rtt_seconds histogram",
    ]
    # source side, tunnel leg: 2 samples <= 0.0001 s, 2 more <= 0.0002 s; other legs/sides must not count
    buckets = {"0.0001": 2.0, "0.0002": 4.0, "+Inf": 4.0} if reporter == "source" else {"0.0001": 0.0, "+Inf": 9.0}
    for leg in ("tunnel", "app"):
        for le, count in buckets.items():
            value = count if leg == "tunnel" else 0.0
            lines.append(f'tcpmesh_tcp_rtt_seconds_bucket{{{stats_labels(reporter, leg, WEB)},le="{le}"}} {value}')
    lines.append('# TYPE tcpmesh_tcp_stats_series gauge\ntcpmesh_tcp_stats_series 4.0')
    return "\n".join(lines) + "\n"


def test_pairs_count_connections_and_bytes_once_and_retransmits_of_every_leg():
    rows = {(r.source, r.destination): r for r in pair_summary([exposition("source"), exposition("destination")])}
    assert set(rows) == {(WEB, DB), (BATCH, DB)}
    web = rows[(WEB, DB)]
    assert (web.connections, web.failed, web.sent, web.received) == (3, 1, 262144, 72)  # the source side's count
    assert web.retransmits == 6                   # 1 + 2 on each of the two sides
    assert web.security == {"mutual_tls"}
    assert abs(web.rtt_p50_seconds() - 0.0001) < 1e-12   # the source side's tunnel leg only
    assert rows[(BATCH, DB)].rtt_p50_seconds() is None


def test_histogram_quantile_interpolates_like_prometheus():
    buckets = {0.001: 10.0, 0.002: 30.0, float("inf"): 40.0}
    assert histogram_quantile(0.5, buckets) == 0.0015       # rank 20 is halfway through the 10..30 bucket
    assert histogram_quantile(0.375, buckets) == 0.00125  # rank 15
    assert histogram_quantile(0.99, buckets) == 0.002       # in +Inf: the last finite bound
    assert histogram_quantile(0.5, {float("inf"): 0.0}) is None


def test_the_pair_table_is_short_and_names_identities_without_the_trust_domain():
    table = format_pair_table(pair_summary([exposition("source"), exposition("destination")]))
    lines = table.splitlines()
    assert len(lines) == 3 and all(len(line) <= 100 for line in lines)
    web = next(line for line in lines if line.startswith("ns/lab/sa/web "))
    assert web.split() == ["ns/lab/sa/web", "ns/lab/sa/db", "3", "1", "256", "KiB", "72", "B", "0.10", "ms", "6",
                           "mutual_tls"]


def test_next_steps_name_real_commands_and_files():
    node = SimpleNamespace(name="node1", state_dir="/run/tcpmesh-lab/demo/nodes/node1", netns="tcpmesh-demo-node1",
                           admin_address="10.76.0.1:15020")
    text = next_steps("demo", [node], keep=False)
    assert "tcpmesh flows --socket /run/tcpmesh-lab/demo/nodes/node1/agent.sock" in text
    assert "ip netns exec tcpmesh-demo-node1 curl -s http://10.76.0.1:15020/metrics" in text
    assert "tcpmesh demo --keep" in text
    assert "tcpmesh_tcp_* Prometheus lines both agents exported: tcpmesh demo --metrics" in text  # not 'every line'
    assert "deploy/grafana/tcpmesh.json" in text and (REPO / "deploy/grafana/tcpmesh.json").is_file()
    assert "tcpmesh demo --keep" not in next_steps("demo", [node], keep=True)
