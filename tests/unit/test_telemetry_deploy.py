"""deploy/: the Grafana dashboard is importable JSON whose every panel queries tcpmesh metrics that
exist, and the Prometheus examples pass `promtool check` (the lab e2e runs every query for real)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import skip_or_fail
from tests.metric_catalog import exposition_names

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def exported_names() -> set[str]:
    """The names of every sample the agent and the issuer export (tests/metric_catalog.py)."""
    return exposition_names()


def test_every_dashboard_panel_queries_metrics_the_agent_exports():
    dashboard = json.loads((DEPLOY / "grafana" / "tcpmesh.json").read_text())
    known = exported_names()
    assert dashboard["uid"] and dashboard["title"] == "tcpmesh"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    queried = set()
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            for name in re.findall(r"\b(tcpmesh_[a-z_]+)", target["expr"]):
                assert name in known, f"{panel['title']}: {name} is not exported by the agent"
                queried.add(name)
    for wanted in ("tcpmesh_tcp_received_bytes_total", "tcpmesh_tcp_connections_failed_total",
                   "tcpmesh_tcp_rtt_seconds_bucket", "tcpmesh_tcp_retransmits_total",
                   "tcpmesh_certificate_expiry_timestamp_seconds", "tcpmesh_tcp_open_connections"):
        assert wanted in queried, f"the dashboard shows no {wanted}"


def test_prometheus_examples_pass_promtool():
    promtool = shutil.which("promtool")
    if promtool is None:
        skip_or_fail("promtool is not installed (Debian package `prometheus`; deploy/bootstrap-debian.sh installs it)")
    out = subprocess.run([promtool, "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    kubernetes = yaml.safe_load((DEPLOY / "prometheus" / "prometheus-kubernetes.yml").read_text())
    (job,) = kubernetes["scrape_configs"]
    assert job["kubernetes_sd_configs"] == [{"role": "pod"}]  # Debian's promtool lacks Kubernetes discovery
    rules = yaml.safe_load((DEPLOY / "prometheus" / "tcpmesh-rules.yml").read_text())
    known = exported_names()
    for rule in rules["groups"][0]["rules"]:
        for name in re.findall(r"\b(tcpmesh_[a-z_]+)", rule["expr"]):
            assert name in known, f"alert {rule['alert']}: {name} is not exported"


@pytest.mark.parametrize("name", ["tcpmesh_tcp_connections_failed_total", "tcpmesh_tcp_open_connections",
                                  "tcpmesh_tunnel_handshake_duration_seconds_bucket"])
def test_the_issue_s_metrics_exist(name):
    assert name in exported_names()
