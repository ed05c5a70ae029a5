"""The metric names a user reads and the metrics tcpmesh exports are the same set.

- Every metric the agent and the issuer export has a row in docs/telemetry.md's tables, under its exposition name
  and with its type. The collectors are the agent's own, built as agent/app.py builds them (tests/metric_catalog.py,
  no running agent), and every metric agent/ defines in its source is among them.
- Every ``tcpmesh_…`` name README.md, tests/README.md, docs/ and deploy/ (the Grafana dashboard, the alert rules)
  mention is an exported metric (a counter as ``…_total``, a histogram also as ``…_bucket``/``_sum``/``_count``,
  ``tcpmesh_tcp_*`` a prefix of some), with only labels it has in ``name{label=…}`` — or the name of a kernel object
  tcpmesh creates (a BPF map, program or struct of bpf/, its 15-character kernel name, an nft table). A metric
  renamed in the code, or a name mistyped in a page, fails here with the page and line.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path

from tests.metric_catalog import REPO, Family, defined_in_source, families

DOC = REPO / "docs" / "telemetry.md"
PAGES = ("README.md", "tests/README.md", "docs", "deploy")
MENTION = re.compile(r"(?<![\w])(tcpmesh_[a-z0-9_]+)(\*|\{[^}\n]*\})?")
ROW = re.compile(r"^\| `(tcpmesh_[a-z0-9_]+)` \| (\w+) \|", re.M)
LABEL = re.compile(r"\s*([A-Za-z_]\w*)\s*(?:=~|!=|!~|=|$)")
TARGET_LABELS = {"instance", "job"}  # Prometheus adds them to every scraped sample
KERNEL_NAME_LENGTH = 15  # BPF object names are cut to BPF_OBJ_NAME_LEN - 1 (`bpftool map show` shows that)


def pages() -> list[Path]:
    found = []
    for name in PAGES:
        path = REPO / name
        found += [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in (".md", ".json", ".yml",
                                                                                                   ".yaml"))
    return found


def kernel_objects() -> set[str]:
    """The ``tcpmesh_`` names of what tcpmesh creates in the kernel: bpf/'s maps, programs and structs (also cut to
    the kernel's 15 characters), and the nft tables of the capture and the lab."""
    from agent.capture.node_rules import TABLE
    from agent.lab.services import NFT_TABLE

    names = {name for path in (REPO / "bpf").rglob("*") if path.suffix in (".c", ".h")
             for name in re.findall(r"\btcpmesh_[a-z0-9_]+", path.read_text())}
    return names | {name[:KERNEL_NAME_LENGTH] for name in names} | {TABLE, NFT_TABLE}


def mention_problems(paths: list[Path], known: dict[str, Family], kernel: set[str]) -> list[str]:
    """``path:line: …`` for every ``tcpmesh_`` name in ``paths`` that no exported metric (nor kernel object) has."""
    by_exposition = {name: family for family in known.values() for name in family.exposition_names()}
    problems = []
    for path in paths:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for match in MENTION.finditer(line):
                name, tail = match.group(1), match.group(2) or ""
                where = f"{path.relative_to(REPO) if path.is_relative_to(REPO) else path}:{number}"
                if tail == "*":
                    if not any(exposed.startswith(name) for exposed in by_exposition):
                        problems.append(f"{where}: no metric starts with {name}")
                    continue
                family = by_exposition.get(name)
                if family is None:
                    if name not in kernel:
                        problems.append(f"{where}: {name} is not a metric tcpmesh exports{_hint(name, known)}")
                    continue
                allowed = set(family.labels) | TARGET_LABELS | ({"le"} if name.endswith("_bucket") else set())
                for label in _labels(tail):
                    if label not in allowed:
                        problems.append(f"{where}: {name} has no label {label!r} (its labels: "
                                        f"{', '.join(family.labels) or 'none'})")
    return problems


def _labels(braces: str) -> list[str]:
    """The label names of ``{a="x", b, …}`` (a matcher or a bare name; ``…`` and ``...`` are not labels)."""
    found = []
    for part in braces[1:-1].split(","):
        match = LABEL.match(part)
        if match:
            found.append(match.group(1))
    return found


def _hint(name: str, known: dict[str, Family]) -> str:
    if name in known and known[name].type == "counter":
        return f" (a counter: its samples are {name}_total)"
    close = difflib.get_close_matches(name, [f.documented_name for f in known.values()], n=1, cutoff=0.8)
    return f"; did you mean {close[0]}?" if close else " (renamed or removed? say what it is now)"


def test_the_catalog_holds_every_metric_the_source_defines():
    known = families()
    # one of each collector, so a collector that silently exports nothing cannot make the tests below pass
    assert {"tcpmesh_tcp_connections_opened", "tcpmesh_agent_relays", "tcpmesh_plaintext_rejected",
            "tcpmesh_tcp_rtt_seconds", "tcpmesh_tcp_stats_series", "tcpmesh_capture_events",
            "tcpmesh_buffered_bytes", "tcpmesh_issuer_requests", "tcpmesh_tunnels_open"} <= set(known)
    defined = defined_in_source()
    assert len(defined) >= 40, defined
    missing = [f"{where}: {name}" for where, name in defined
               if not (any(f.startswith(name[:-1]) for f in known) if name.endswith("*") else name in known)]
    assert not missing, ("defined in agent/ but not built by tests/metric_catalog.py (register its collector there, "
                         "as agent/app.py does):\n" + "\n".join(missing))


def test_every_exported_metric_has_a_row_with_its_type_in_telemetry_md():
    rows = dict(ROW.findall(DOC.read_text()))
    missing = sorted(f.documented_name for f in families().values() if f.documented_name not in rows)
    assert not missing, f"docs/telemetry.md has no table row (| `name` | type | …) for: {', '.join(missing)}"
    wrong = sorted(f"{f.documented_name}: the page says {rows[f.documented_name]}, it is a {f.type}"
                   for f in families().values() if rows[f.documented_name] != f.type)
    assert not wrong, "docs/telemetry.md gives the wrong type:\n" + "\n".join(wrong)


def test_every_metric_a_page_names_is_exported():
    problems = mention_problems(pages(), families(), kernel_objects())
    assert not problems, "metric names the pages give that tcpmesh does not export:\n" + "\n".join(problems)


def test_a_mistyped_or_renamed_metric_is_named_with_its_page_and_line(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("Watch `tcpmesh_tcp_connections_openned_total` and\n"
                    "`tcpmesh_config_reloads{trigger}`, `tcpmesh_admin_refused_total{reson=\"source\"}`,\n"
                    "`tcpmesh_made_up_total`, `tcpmesh_nothing_*`; the map `tcpmesh_conn4` (`tcpmesh_handove`),\n"
                    "`tcpmesh_tcp_*`, `tcpmesh_tcp_rtt_seconds_bucket{le=\"0.001\",instance=~\".*\"}`.\n")
    problems = mention_problems([page], families(), kernel_objects())
    assert problems == [
        f"{page}:1: tcpmesh_tcp_connections_openned_total is not a metric tcpmesh exports; did you mean "
        "tcpmesh_tcp_connections_opened_total?",
        f"{page}:2: tcpmesh_config_reloads is not a metric tcpmesh exports (a counter: its samples are "
        "tcpmesh_config_reloads_total)",
        f"{page}:2: tcpmesh_admin_refused_total has no label 'reson' (its labels: reason)",
        f"{page}:3: tcpmesh_made_up_total is not a metric tcpmesh exports (renamed or removed? say what it is now)",
        f"{page}:3: no metric starts with tcpmesh_nothing_"], problems


def test_every_flow_label_is_documented_in_telemetry_md():
    from agent.connection.flow import METRIC_LABELS

    doc = DOC.read_text()
    missing = [label for label in METRIC_LABELS if f"`{label}`" not in doc]
    assert not missing, f"docs/telemetry.md does not document the flow label(s) {', '.join(missing)}"
