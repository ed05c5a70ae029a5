"""The benchmark's pure parts: medians, ratios, best peer, targets, derived figures, peer configs, the
Markdown section. No timing, no privileges."""

from __future__ import annotations

from pathlib import Path

from bench import figures, peers, report


def test_summarize_is_median_min_max_and_skips_missing():
    assert figures.summarize([3.0, None, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    assert figures.summarize([]) is None


def _summary(**medians):
    return {path: {key: ({"median": v, "min": v, "max": v, "n": 1} if v is not None else None)
                   for key, v in values.items()} for path, values in medians.items()}


def test_best_peer_follows_the_direction_of_the_figure():
    summary = _summary(direct={"bulk1_gbps": 10.0, "rr_p50_us": 20.0},
                       tcpmesh={"bulk1_gbps": 3.0, "rr_p50_us": 90.0},
                       stunnel={"bulk1_gbps": 2.0, "rr_p50_us": 70.0},
                       haproxy={"bulk1_gbps": 2.5, "rr_p50_us": 80.0})
    ratios = figures.ratios(summary, ["stunnel", "haproxy"])
    assert ratios["tcpmesh"]["bulk1_gbps"]["best_peer"] == "haproxy"
    assert ratios["tcpmesh"]["bulk1_gbps"]["vs_best_peer"] == 3.0 / 2.5
    assert ratios["tcpmesh"]["bulk1_gbps"]["vs_direct"] == 0.3
    assert ratios["tcpmesh"]["rr_p50_us"]["best_peer"] == "stunnel"
    assert ratios["tcpmesh"]["rr_p50_us"]["vs_best_peer"] == 90.0 / 70.0


def test_figures_without_a_direct_counterpart_have_no_direct_ratio():
    summary = _summary(direct={"rss_held_mib": None}, tcpmesh={"rss_held_mib": 50.0},
                       stunnel={"rss_held_mib": 40.0}, haproxy={"rss_held_mib": 45.0})
    ratio = figures.ratios(summary, ["stunnel", "haproxy"])["tcpmesh"]["rss_held_mib"]
    assert ratio["vs_direct"] is None and ratio["vs_best_peer"] == 50.0 / 40.0


def test_targets_read_ratios_absolute_values_and_capture():
    summary = _summary(tcpmesh={"rss_held_mib": 90.0, "bulk1_gbps": 3.0}, stunnel={"bulk1_gbps": 2.0},
                       haproxy={"bulk1_gbps": 2.5})
    ratios = figures.ratios(summary, ["stunnel", "haproxy"])
    capture = {"overhead_pct": {"median": 7.0, "min": 7.0, "max": 7.0, "n": 1}}
    by_key = {t["key"]: t for t in figures.check_targets(summary, ratios, capture, 1000)}
    assert by_key["bulk1"]["met"] is True          # 3.0 / 2.5 = 1.2
    assert by_key["memory"]["met"] is True and by_key["memory"]["note"] == ""
    assert by_key["capture"]["met"] is False
    assert by_key["connrate"]["met"] is None        # not measured
    assert next(t for t in figures.check_targets(summary, ratios, None, 20) if t["key"] == "memory")["note"]


def test_derive_computes_added_latency_and_cpu_per_gigabyte():
    raw = {"rr": {"rtt_us": {"p50": 100.0, "p99": 300.0}},
           "crr": {"per_second": 500.0, "latency_us": {"p50": 2000.0}, "completed_all": 1000, "datapath_cpu_s": 0.5},
           "bulk1": {"gbps": 2.0, "bytes": 1e9, "generator_cpu_s": 0.5, "datapath_cpu_s": 1.5},
           "bulk8": {"gbps": 2.0, "bytes": 1e9, "generator_cpu_s": 0.5, "datapath_cpu_s": 1.5},
           "idle": {"rss_kib": 10240}, "hold": {"memory": {"rss_kib": 20480}}}
    out = figures.derive(raw, {"rr": {"rtt_us": {"p50": 40.0}}}, has_datapath=True)
    assert out["rr_added_p50_us"] == 60.0
    assert out["cpu_s_per_gb"] == 2.0 and out["datapath_cpu_s_per_gb"] == 1.5
    assert out["datapath_cpu_ms_per_conn"] == 0.5 and out["crr_p50_ms"] == 2.0
    assert out["rss_idle_mib"] == 10.0 and out["rss_held_mib"] == 20.0
    assert "rss_idle_mib" not in figures.derive(raw, None, has_datapath=False)


def _layout():
    services = peers.layout_services("haproxy", "10.77.2.11", 7001, 5201)
    files = {n: f"/x/{n}" for n in ("node1", "node2")}
    return peers.PeerLayout("10.76.0.2", services, "/x/ca.crt", files, files, files, files)


def test_peer_configs_require_tls13_and_client_certificates_on_both_hops():
    layout = _layout()
    node1, node2 = peers.haproxy_config(layout, "node1"), peers.haproxy_config(layout, "node2")
    assert "server node2 10.76.0.2:22011 ssl crt" in node1 and "verify required" in node1
    assert "bind 10.76.0.2:22011 ssl crt" in node2 and "verify required ssl-min-ver TLSv1.3" in node2
    assert "server app 10.77.2.11:7001" in node2
    stunnel = peers.stunnel_config(layout, "node2")
    assert "requireCert = yes" in stunnel and "sslVersionMin = TLSv1.3" in stunnel
    assert "connect = 10.77.2.11:5201" in stunnel
    assert "client = yes" in peers.stunnel_config(layout, "node1")


def test_append_adds_the_method_intro_once_and_keeps_other_sections(tmp_path):
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\n## Real workloads\n\nkept\n")
    report.append_to(docs, "### Run A\n")
    report.append_to(docs, "### Run B\n")
    text = docs.read_text()
    assert text.startswith("# Benchmarks\n\n## Real workloads\n\nkept\n")
    assert text.count(report.INTRO_MARKER) == 1
    assert text.index("### Run A") < text.index("### Run B")


def test_markdown_names_machine_command_and_every_path():
    paths = ["direct", "tcpmesh", "stunnel", "haproxy"]
    summary = {p: {f.key: {"median": 1.0, "min": 1.0, "max": 2.0, "n": 3} for f in figures.FIGURES} for p in paths}
    results = {
        "paths": paths, "peers": ["stunnel", "haproxy"], "summary": summary,
        "ratios": figures.ratios(summary, ["stunnel", "haproxy"]), "date": "2026-01-01T00:00:00+00:00",
        "settings": {"repetitions": 3, "idle_connections": 1000}, "command": "make bench", "elapsed_s": 60,
        "machine": {"commit": "abc", "nproc": 2, "cpu": "cpu", "memory_gib": 4, "kernel": "6.1", "python": "3.11",
                    "openssl": "OpenSSL 3", "stunnel": "stunnel 5", "haproxy": "HAProxy 2.6", "iperf3": "iperf 3",
                    "loadavg_start": [1.0], "loadavg_end": [1.0]},
        "targets": figures.check_targets(summary, figures.ratios(summary, ["stunnel", "haproxy"]), None, 1000),
    }
    text = report.markdown(results, json_path=Path("/r/bench/results/x.json"), chart_path="/r/docs/x.png",
                           docs_path=Path("/r/docs/benchmarks.md"))
    assert "`make bench`" in text and "2 cores" in text and "kernel 6.1" in text
    assert "| figure | direct | tcpmesh | stunnel | haproxy |" in text
    assert "1.00 (1.00–2.00)" in text and "](x.png)" in text and "](../bench/results/x.json)" in text


def test_same_node_figures_are_ratios_to_the_same_node_direct_path_of_each_repetition():
    def rep(direct_p50, mesh_p50, direct_gbps, mesh_gbps):
        def tests(p50, gbps):
            bulk = {"gbps": gbps, "bytes": 1e9, "datapath_cpu_s": 1.0, "generator_cpu_s": 1.0}
            return {"rr": {"rtt_us": {"p50": p50, "p99": p50 * 2}}, "bulk1": bulk, "bulk8": bulk}
        return {"direct": tests(direct_p50, direct_gbps), "tcpmesh": tests(mesh_p50, mesh_gbps)}

    same = figures.same_node([rep(30.0, 38.0, 10.0, 9.0), rep(50.0, 70.0, 8.0, 4.0), rep(40.0, 49.0, 9.0, 7.2)])
    # added latency per repetition against that repetition's direct p50: 8, 20, 9 -> median 9
    assert same["summary"]["tcpmesh"]["rr_added_p50_us"]["median"] == 9.0
    assert same["vs_direct"]["bulk1_gbps"] == 7.2 / 9.0
    targets = {t["key"]: t for t in same["targets"]}
    assert targets["same_node_latency"]["met"] is True and targets["same_node_bulk1"]["met"] is True
    assert figures.same_node([rep(30.0, 45.0, 10.0, 5.0)])["targets"][0]["met"] is False


def test_latency_under_load_is_offered_half_the_slowest_tunnels_rate_to_every_path():
    def loadmax(rate):
        return {"loadmax": {"per_second": rate}}

    rep = {"direct": loadmax(20000.0), "tcpmesh": loadmax(3000.0), "stunnel": loadmax(5000.0), "haproxy": {}}
    assert figures.half_rate(rep) == 1500.0  # the direct path never sets the load
    assert figures.half_rate({"direct": loadmax(20000.0)}) is None
    derived = figures.derive({**loadmax(3000.0), "loadhalf": {"rtt_us": {"p50": 120.0, "p99": 900.0}}}, None, True)
    assert (derived["load_max_per_s"], derived["load_p50_us"], derived["load_p99_us"]) == (3000.0, 120.0, 900.0)


def _db_rep(tps: float, set8: float, get8: float, processed: int = 100, datapath: float = 0.5) -> dict:
    return {"pgbench": {"tps": tps, "latency_ms": 8000 / tps, "processed": processed, "datapath_cpu_s": datapath,
                        "client_cpu_s": 0.1, "server_cpu_s": 0.4},
            "redis": {"8": {"clients": 8, "rps": {"SET": set8, "GET": get8}}}}


def test_database_figures_ratios_and_targets():
    from bench import dbfigures

    raw = {"direct": [_db_rep(1000, 40000, 40000), _db_rep(1200, 40000, 40000)],
           "tcpmesh": [_db_rep(500, 10000, 40000), _db_rep(700, 10000, 40000)],
           "stunnel": [_db_rep(800, 20000, 20000)]}
    db = dbfigures.analyse(raw, ["direct", "tcpmesh", "stunnel"], ["stunnel"], 8, (8,))
    assert db["summary"]["tcpmesh"]["pgbench_tps"]["median"] == 600
    assert db["ratios"]["tcpmesh"]["pgbench_tps"]["vs_direct"] == 600 / 1100
    assert db["ratios"]["tcpmesh"]["pgbench_tps"]["vs_best_peer"] == 600 / 800
    assert db["summary"]["tcpmesh"]["pgbench_datapath_ms_per_tx"]["median"] == 5.0
    assert db["summary"]["direct"]["pgbench_datapath_ms_per_tx"] is None  # no data path on the direct path
    assert db["ratios"]["tcpmesh"]["pgbench_cpu_ms_per_tx"]["vs_direct"] == 2.0  # (0.1 + 0.4 + 0.5) / (0.1 + 0.4)
    assert abs(db["redis_geomean_vs_direct"]["tcpmesh"] - 0.5) < 1e-9  # sqrt(0.25 * 1.0)
    targets = {t["key"]: t for t in db["targets"]}
    assert targets["databases_pgbench"]["met"] is False and targets["databases_redis"]["met"] is False
    assert "pgbench (TPC-B, 8 clients) ≥ 0.6 × direct" == targets["databases_pgbench"]["text"]
    missing = dbfigures.analyse({"direct": [_db_rep(1000, 1, 1)], "tcpmesh": [{}]}, ["direct", "tcpmesh"], [], 8, (8,))
    assert {t["met"] for t in missing["targets"]} == {None}


def test_database_section_has_a_row_per_figure_and_the_targets():
    from bench import dbfigures

    raw = {"direct": [_db_rep(1000, 40000, 40000)], "tcpmesh": [_db_rep(700, 30000, 30000)]}
    results = {"paths": ["direct", "tcpmesh"], "settings": {"pgbench_clients": 8, "redis_clients": [8],
                                                            "pgbench_seconds": 5, "redis_requests": 1000,
                                                            "idle_connections": 1000},
               "databases": dbfigures.analyse(raw, ["direct", "tcpmesh"], [], 8, (8,))}
    text = "\n".join(report.databases_markdown(results))
    assert "| pgbench TPC-B, 8 clients (tps) | 1,000 | 700 | ×0.70 | — (—) |" in text
    assert "| redis-benchmark SET, 8 clients (req/s) | 40,000 | 30,000 | ×0.75 |" in text
    assert "| pgbench (TPC-B, 8 clients) ≥ 0.6 × direct | ×0.70 | yes |" in text
