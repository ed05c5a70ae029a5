"""The Markdown section a run appends to docs/benchmarks.md, and the table it prints.

Pure except ``append_to`` (which only ever appends, so other sections of the file stay as they are).
"""

from __future__ import annotations

import os
from pathlib import Path

from bench.figures import FIGURES, Figure

INTRO_MARKER = "<!-- bench: data-path benchmark intro -->"
INTRO = f"""{INTRO_MARKER}
## Data-path benchmark (`make bench`)

`make bench` (about 10 minutes; `make bench BENCH_QUICK=1` for a 1–2 minute look) builds a two-node
namespace lab and sends the same load from a client pod on node1 to a server pod on node2 through four
paths, interleaved, with the same lab CA and ECDSA P-256 certificates: **direct** (plaintext, routed
through both nodes, capture bypassed), **tcpmesh** (the client in its pod cgroup, captured by eBPF,
tunnelled by the agents), and two-hop TLS 1.3 mTLS tunnels through **stunnel** and **HAProxy** running in
the node namespaces (client pod → tunnel on node1 → TLS across the wire → tunnel on node2 → server
pod). Bulk is iperf3; ping-pong, connection rate and held connections are `bench/loadgen.c`; CPU comes
from the cgroups of each role, memory is the RSS of the data-path processes of both nodes. Everything
shares the machine's cores, so absolute figures are lower bounds: compare ratios. Method and caveats:
[bench/README.md](../bench/README.md). Each run below is one appended section.
"""


def _fmt(value: float | None, digits: int) -> str:
    if value is None:
        return "—"
    if abs(value) >= 1000 and digits <= 1:
        return f"{value:,.0f}"
    return f"{value:,.{digits}f}"


def _cell(summary: dict | None, figure: Figure) -> str:
    if not summary:
        return "n/a"
    med, lo, hi = summary["median"], summary["min"], summary["max"]
    if summary["n"] == 1 or lo == hi:
        return _fmt(med, figure.digits)
    return f"{_fmt(med, figure.digits)} ({_fmt(lo, figure.digits)}–{_fmt(hi, figure.digits)})"


def _ratio(value: float | None) -> str:
    return "—" if value is None else f"×{value:.2f}"


def _label(figure: Figure, results: dict) -> str:
    label = figure.label
    if figure.key == "rss_held_mib":
        label = f"data-path RSS, {results['settings']['idle_connections']:,} idle connections held"
    return f"{label} ({figure.unit})"


def _rel(path: str | os.PathLike, docs_path: Path) -> str:
    return os.path.relpath(Path(path).resolve(), docs_path.resolve().parent)


def markdown(results: dict, *, json_path: Path, chart_path: str | None, docs_path: Path) -> str:
    m = results["machine"]
    paths = results["paths"]
    peers = results["peers"]
    summary, ratios = results["summary"], results["ratios"]
    date = results["date"].replace("T", " ").replace("+00:00", " UTC")
    s = results["settings"]
    lines = [
        f"### Run {date}{' (quick)' if results.get('quick') else ''} — tcpmesh {m['commit']}",
        "",
        f"- Machine: {m['nproc']} cores ({m['cpu']}), {m['memory_gib']} GiB, kernel {m['kernel']}, "
        f"Python {m['python']}, {m['openssl']}{', uvloop ' + m['uvloop'] if m.get('uvloop') else ''}; "
        f"{m['stunnel']}; {m['haproxy']}; {m['iperf3']}.",
        f"- Command: `{results['command']}` — {s['repetitions']} repetition{'s' if s['repetitions'] != 1 else ''}, {results.get('elapsed_s', 0) / 60:.1f} "
        f"min; load average {m['loadavg_start'][0]:.2f} at the start, {m.get('loadavg_end', [0])[0]:.2f} at the end"
        + (f"; other processes on the machine kept {_cell(results['foreign_cores'], Figure('', '', '', False))} of "
           f"its {m['nproc']} cores busy during the tests (median, min–max)." if results.get("foreign_cores") else "."),
        f"- Results: [{json_path.name}]({_rel(json_path, docs_path)}). Cells: median (min–max) of the repetitions.",
        "",
    ]
    if chart_path:
        lines += [f"![tcpmesh vs direct, stunnel and HAProxy]({_rel(chart_path, docs_path)})", ""]
    lines += ["| figure | " + " | ".join(paths) + " |", "|---|" + "---|" * len(paths)]
    for figure in FIGURES:
        lines.append(f"| {_label(figure, results)} | " + " | ".join(_cell(summary[p].get(figure.key), figure)
                                                               for p in paths) + " |")
    lines += ["", "Ratios of medians (× direct: 1.0 is as fast as no proxy; × best peer: the better of "
              f"{' and '.join(peers) or 'the peers'} for that figure, so above 1 is better for throughput and "
              "connection rate, below 1 for latency, memory and CPU):", ""]
    header = [f"{p} × direct" for p in paths if p != "direct"] + [f"{p} × best peer" for p in paths
                                                                   if p not in ("direct",)] + ["best peer"]
    lines += ["| figure | " + " | ".join(header) + " |", "|---|" + "---|" * len(header)]
    for figure in FIGURES:
        row = [_ratio(ratios[p][figure.key]["vs_direct"]) for p in paths if p != "direct"]
        row += [_ratio(ratios[p][figure.key]["vs_best_peer"]) for p in paths if p != "direct"]
        best = next((ratios[p][figure.key]["best_peer"] for p in paths), None)
        lines.append(f"| {_label(figure, results)} | " + " | ".join(row) + f" | {best or '—'} |")
    lines += ["", "Issue #8 targets, tcpmesh in this run:", "", "| target | this run | met |", "|---|---|---|"]
    for t in results.get("targets", []):
        value = t["value"]
        shown = "n/a" if value is None else (f"×{value:.2f}" if t["kind"].startswith("ratio") else f"{value:.1f}")
        met = {True: "yes", False: "**no**", None: "not measured"}[t["met"]]
        lines.append(f"| {t['text']} | {shown}{' (' + t['note'] + ')' if t['note'] else ''} | {met} |")
    same = results.get("same_node")
    if same:
        lines += ["", "Same node (issue #19): client pod n2p2 and server pod n2p1 on node2, straight through node2's "
                  "bridge and through node2's agent (`proxy.same_node`):", "",
                  "| figure | direct (same node) | tcpmesh (same node) | tcpmesh × direct |", "|---|---|---|---|"]
        for figure in FIGURES:
            mine = same["summary"]["tcpmesh"].get(figure.key)
            if not mine:
                continue
            lines.append(f"| {_label(figure, results)} | {_cell(same['summary']['direct'].get(figure.key), figure)} | "
                         f"{_cell(mine, figure)} | {_ratio(same['vs_direct'].get(figure.key))} |")
        lines += ["", "| target | this run | met |", "|---|---|---|"]
        for t in same["targets"]:
            value = t["value"]
            shown = "n/a" if value is None else (f"×{value:.2f}" if t["kind"].startswith("ratio") else f"{value:.1f}")
            lines.append(f"| {t['text']} | {shown} | {({True: 'yes', False: '**no**', None: 'not measured'})[t['met']]} |")
    if results.get("databases"):
        lines += databases_markdown(results)
    cap = results.get("capture")
    if cap:
        lines += ["", f"Capture ({cap.get('measured_pairs', cap['connects'])}+ connects per variant and repetition, the two variants alternating "
                  "connect by connect; only connect() is timed; both reach the same proxy listener on node1):", "",
                  "| connect() to the outbound proxy | p50 (µs) | p99 (µs) |", "|---|---|---|",
                  f"| straight to {results.get('pod_gateway', '169.254.1.1')}:15001 (not captured) | "
                  f"{_cell(cap['straight_p50_us'], Figure('', '', '', False, digits=1))} | "
                  f"{_cell(cap['straight_p99_us'], Figure('', '', '', False, digits=1))} |",
                  f"| through the eBPF connect path (cgroup/connect4 + sockops) | "
                  f"{_cell(cap['captured_p50_us'], Figure('', '', '', False, digits=1))} | "
                  f"{_cell(cap['captured_p99_us'], Figure('', '', '', False, digits=1))} |",
                  "", f"Capture overhead at p50: {_cell(cap['overhead_pct'], Figure('', '', '', False, digits=1))} %."]
        if cap.get("lingered"):
            lines.append(f"{cap['lingered']} straight connection(s) were neither refused nor closed by the proxy within "
                         "2 s (see errors and the JSON).")
        if cap.get("bpf_ns_per_connection"):
            progs = sorted(cap.get("bpf_programs", {}).items(), key=lambda kv: -(kv[1]["ns_per_run"] or 0)
                           * (kv[1]["runs_per_connection"] or 0))
            detail = ", ".join(f"{name} {p['ns_per_run']:.0f} ns × {p['runs_per_connection']:g}" for name, p in progs
                               if p["runs_per_connection"])
            lines.append(f"The kernel's own run time of the tcpmesh BPF programs (pod cgroup and node1's proxy cgroup) "
                         f"per captured connection: {_cell(cap['bpf_ns_per_connection'], Figure('', '', '', False, digits=0))}"
                         f" ns ({detail}).")
    lines += ["", "Load generators:"]
    ref = results.get("reference")
    if ref:
        lines.append(f"- Known-good check, direct path, {ref['size']}-byte ping-pong RTT: sockperf p50 "
                     f"{ref['sockperf']['p50']:.1f} µs / p99 {ref['sockperf']['p99'] or 0:.1f} µs, bench/loadgen.c p50 "
                     f"{ref['loadgen']['p50']:.1f} µs / p99 {ref['loadgen']['p99']:.1f} µs. Bulk is iperf3 itself.")
    shares = results.get("generator_check", {}).get("client_cpu_share_max", {})
    if shares:
        parts = [f"{p} rr {v.get('rr', 0) * 100:.0f} %, crr {v.get('crr', 0) * 100:.0f} %" for p, v in shares.items()]
        lines.append("- Client CPU, highest share of one core: " + "; ".join(parts) + ".")
    if results.get("errors"):
        lines += ["", "Errors in this run:"]
        lines += [f"- {e.get('where')} {e.get('path', '')}: {e['error']}" for e in results["errors"]]
    lines.append("")
    return "\n".join(lines)


def databases_markdown(results: dict) -> list[str]:
    """The database scenario's tables: figures per path, ratios to direct and to the best peer, targets."""
    from bench.dbfigures import figure_list

    db, s, paths = results["databases"], results["settings"], results["paths"]
    figures = figure_list(s["pgbench_clients"], s["redis_clients"])
    others = [p for p in paths if p != "direct"]
    lines = ["", "Databases (issue #19): PostgreSQL 15 and Redis in the server pod n2p1 (node2), pgbench and "
             "redis-benchmark from the client pod n1p1 (node1), every path in the same repetitions. "
             f"pgbench: built-in TPC-B, scale 1, `-c {s['pgbench_clients']} -j 1 -T {s['pgbench_seconds']:g}`, "
             "fsync off, tps without connection setup; redis-benchmark: `-t set,get -P 1 "
             f"-n {s['redis_requests']}` with each client count; no persistence.", "",
             "| figure | " + " | ".join(paths) + " | " + " | ".join(f"{p} × direct" for p in others)
             + (" | tcpmesh × best peer |" if "tcpmesh" in others else " |"),
             "|---|" + "---|" * (len(paths) + len(others) + ("tcpmesh" in others))]
    for figure in figures:
        row = [_cell(db["summary"][p].get(figure.key), figure) for p in paths]
        row += [_ratio(db["ratios"][p][figure.key]["vs_direct"]) for p in others]
        if "tcpmesh" in others:
            best = db["ratios"]["tcpmesh"][figure.key]
            row.append(f"{_ratio(best['vs_best_peer'])} ({best['best_peer'] or '—'})")
        lines.append(f"| {_label(figure, results)} | " + " | ".join(row) + " |")
    geo = db["redis_geomean_vs_direct"]
    lines.append("| redis-benchmark, geometric mean of the ratios to direct | " + " | ".join("" for _ in paths) + " | "
                 + " | ".join(_ratio(geo.get(p)) for p in others) + (" | |" if "tcpmesh" in others else " |"))
    lines += ["", "| target | this run | met |", "|---|---|---|"]
    for t in db["targets"]:
        shown = "n/a" if t["value"] is None else f"×{t['value']:.2f}"
        lines.append(f"| {t['text']} | {shown} | {({True: 'yes', False: '**no**', None: 'not measured'})[t['met']]} |")
    return lines


def append_to(docs_path: Path, section: str) -> None:
    """Append ``section`` to docs/benchmarks.md (with the method intro once, and a title if the file is new)."""
    existing = docs_path.read_text() if docs_path.exists() else ""
    parts = []
    if not existing:
        parts.append("# Benchmarks\n\n")
    elif not existing.endswith("\n"):
        parts.append("\n")
    if INTRO_MARKER not in existing:
        parts.append(("\n" if existing else "") + INTRO + "\n")
    else:
        parts.append("\n")
    parts.append(section)
    with open(docs_path, "a") as f:
        f.write("".join(parts))


def console_table(results: dict) -> str:
    paths = results["paths"]
    width = max(len(f.label) for f in FIGURES) + 10
    out = [f"{'figure':{width}}" + "".join(f"{p:>22}" for p in paths)]
    for figure in FIGURES:
        cells = []
        for p in paths:
            s = results["summary"][p].get(figure.key)
            r = results["ratios"][p][figure.key]
            text = "n/a" if not s else _fmt(s["median"], figure.digits)
            if s and p != "direct" and r["vs_best_peer"] is not None:
                text += f" ×{r['vs_best_peer']:.2f}bp"
            cells.append(f"{text:>22}")
        out.append(f"{figure.label + ' (' + figure.unit + ')':{width}}" + "".join(cells))
    same = results.get("same_node")
    if same:
        for figure in FIGURES:
            d, t = same["summary"]["direct"].get(figure.key), same["summary"]["tcpmesh"].get(figure.key)
            if not t:
                continue
            ratio = same["vs_direct"].get(figure.key)
            text = _fmt(t["median"], figure.digits) + (f" ×{ratio:.2f} direct" if ratio is not None else "")
            out.append(f"{'same node: ' + figure.label + ' (' + figure.unit + ')':{width}}"
                       f"{'n/a' if not d else _fmt(d['median'], figure.digits):>22}{text:>22}")
    db = results.get("databases")
    if db:
        from bench.dbfigures import figure_list
        s = results["settings"]
        for figure in figure_list(s["pgbench_clients"], s["redis_clients"]):
            cells = []
            for p in paths:
                value = db["summary"][p].get(figure.key)
                ratio = db["ratios"][p][figure.key]["vs_direct"]
                text = "n/a" if not value else _fmt(value["median"], figure.digits)
                if value and ratio is not None and p != "direct":
                    text += f" ×{ratio:.2f}d"
                cells.append(f"{text:>22}")
            out.append(f"{figure.label + ' (' + figure.unit + ')':{width}}" + "".join(cells))
    for t in results.get("targets", []) + (same["targets"] if same else []) + (db["targets"] if db else []):
        out.append(f"target {t['text']}: {t['value'] if t['value'] is None else round(t['value'], 2)} "
                   f"-> {'met' if t['met'] else ('not measured' if t['met'] is None else 'NOT met')}")
    if results.get("errors"):
        out.append(f"{len(results['errors'])} error(s): " + "; ".join(e["error"][:120] for e in results["errors"]))
    return "\n".join(out)
