"""The chart of a run: one small bar panel per figure, the four paths side by side.

Bars are medians, whiskers min–max; each bar is labelled with its value, and tcpmesh's bar also
with its ratio to the best peer (in the database row, issue #19's, to direct). matplotlib is a bench-only extra (``pip install -e '.[bench]'``).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from bench.figures import FIGURE_BY_KEY  # noqa: E402

COLORS = {"direct": "#9e9e9e", "tcpmesh": "#1f6fd1", "stunnel": "#e08a2e", "haproxy": "#3a9a5b"}
PANELS = (
    ("bulk1_gbps", "Bulk, 1 stream", "Gbit/s"),
    ("bulk8_gbps", "Bulk, 8 streams", "Gbit/s"),
    ("rr_p50_us", "Ping-pong RTT p50", "µs"),
    ("rr_p99_us", "Ping-pong RTT p99", "µs"),
    ("crr_per_s", "New connections / s", "conn/s (32 in flight)"),
    ("rss_held_mib", "Data-path RSS, {n} idle conns", "MiB, both nodes"),
    ("cpu_s_per_gb", "CPU per GB (whole path)", "CPU s / GB"),
    ("datapath_cpu_ms_per_conn", "Data-path CPU per new conn", "ms"),
)


def _fmt(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _runs(n: int) -> str:
    return "one run" if n == 1 else f"medians of {n} runs"


def render(results: dict, out: Path) -> None:
    paths = results["paths"]
    summary, ratios = results["summary"], results["ratios"]
    db = results.get("databases")
    rows = 3 if db else 2
    fig, axes = plt.subplots(rows, 4, figsize=(16, 4.1 * rows), layout="constrained")
    for ax, (key, title, unit) in zip(axes.flat, PANELS):
        title = title.format(n=f"{results['settings']['idle_connections']:,}")
        _panel(ax, paths, summary, ratios, FIGURE_BY_KEY[key], title, unit, "vs_best_peer", "best peer")
        if key == "rss_held_mib":  # the idle part of each bar, hatched
            shown = [p for p in paths if summary[p].get(key)]
            idle = [(summary[p].get("rss_idle_mib") or {}).get("median", 0) for p in shown]
            ax.bar(range(len(shown)), idle, color="none", edgecolor="white", hatch="//", width=0.7)
            ax.legend(handles=[Patch(facecolor="#999", edgecolor="white", hatch="//", label="of which at idle")],
                      loc="upper right", fontsize=8, frameon=False)
    if db:
        from bench.dbfigures import figure_list, redis_key

        s = results["settings"]
        by_key = {f.key: f for f in figure_list(s["pgbench_clients"], s["redis_clients"])}
        first, last = s["redis_clients"][0], s["redis_clients"][-1]
        panels = (("pgbench_tps", by_key["pgbench_tps"].label, "tps"),
                  ("pgbench_cpu_ms_per_tx", "CPU per pgbench transaction", "ms (client + server + data path)"),
                  (redis_key("SET", first), f"redis-benchmark SET, {first} clients", "req/s"),
                  (redis_key("GET", last), f"redis-benchmark GET, {last} clients", "req/s"))
        for ax, (key, title, unit) in zip(axes[2], panels):
            _panel(ax, paths, db["summary"], db["ratios"], by_key[key], title, unit, "vs_direct", "direct")
    _suptitle(fig, results)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _panel(ax, paths: list[str], summary: dict, ratios: dict, figure, title: str, unit: str, ratio_key: str,
           ratio_name: str) -> None:
    """One bar per path (median, whiskers min–max), tcpmesh's labelled with its ratio."""
    key = figure.key
    shown = [p for p in paths if summary[p].get(key)]
    medians = [summary[p][key]["median"] for p in shown]
    lows = [summary[p][key]["median"] - summary[p][key]["min"] for p in shown]
    highs = [summary[p][key]["max"] - summary[p][key]["median"] for p in shown]
    bars = ax.bar(range(len(shown)), medians, color=[COLORS.get(p, "#666") for p in shown],
                  yerr=[lows, highs], capsize=3, ecolor="#333", width=0.7)
    ax.set_xticks(range(len(shown)), shown, fontsize=10)
    arrow = "higher is better" if figure.higher_is_better else "lower is better"
    ax.set_title(f"{title}\n({arrow})", fontsize=11)
    ax.set_ylabel(unit, fontsize=9)
    ax.spines[["top", "right"]].set_visible(False)
    top = max((m + h for m, h in zip(medians, highs)), default=1) or 1
    ax.set_ylim(0, top * 1.28)
    for bar, path, median in zip(bars, shown, medians):
        label = _fmt(median)
        ratio = ratios[path][key][ratio_key]
        if path == "tcpmesh" and ratio is not None:
            label += f"\n×{ratio:.2f} {ratio_name}"
        ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height() + top * 0.03, label, ha="center",
                va="bottom", fontsize=8.5, fontweight="bold" if path == "tcpmesh" else "normal")
    if not shown:
        ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)


def _suptitle(fig, results: dict) -> None:
    m = results["machine"]
    date = results["date"][:16].replace("T", " ")
    fig.suptitle(f"tcpmesh data path vs direct, stunnel and HAProxy — {date} UTC, {m['nproc']} cores, kernel "
                 f"{m['kernel']}, Python {m['python']}, commit {m['commit'].split('+')[0]}\n"
                 f"client pod on node1 → server pod on node2; {_runs(results['settings']['repetitions'])}, "
                 "whiskers min–max; load generators share the same cores", fontsize=12)
