"""`tcpmesh doctor` on this machine: every probe runs for real (throwaway namespaces), all three
capture modes are usable here, and a hidden capability shows its failure row and the fallback."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from agent.host.doctor import DISABLE_ENV, OPTIONAL_CHECKS, doctor


def probe_netns(pid: int) -> list[str]:
    """The throwaway probe namespaces of doctor process ``pid`` that still exist;
    other doctors on the machine (a running agent's `auto`, another test run) have their own."""
    prefix = f"tcpmesh-probe-{pid}-"
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(prefix)]


def rows(report: dict) -> dict[str, dict]:
    return {c["name"]: c for c in report["checks"]}


def test_doctor_json_reports_all_three_modes_usable_here(bpf_capable):
    proc = subprocess.Popen([sys.executable, "-m", "agent", "doctor", "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    stdout, stderr = proc.communicate(timeout=60)
    out = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["version"] == 1 and report["can_run"]
    assert {m["name"]: m["usable"] for m in report["modes"]} == \
        {"ebpf-connect": True, "ebpf-tc": True, "iptables": True}, report["modes"]
    assert report["selected_mode"] == "ebpf-connect"
    bad = {n: c for n, c in rows(report).items() if c["result"] not in ("ok", "warn") and n not in OPTIONAL_CHECKS}
    assert bad == {}
    ktls = rows(report)["ktls"]   # this machine's kernel has CONFIG_TLS off; Debian's have it (tests/vm)
    assert ktls["result"] == "ok" or "offers no kernel TLS" in ktls["error"], ktls
    assert probe_netns(proc.pid) == []  # its throwaway namespace is gone


@pytest.fixture
def runner(bpf_capable):
    return CliRunner()


def test_a_hidden_program_type_shows_its_row_and_the_fallback(runner):
    result = runner.invoke(doctor, ["--json"], env={DISABLE_ENV: "prog_getsockopt"})
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert rows(report)["prog_getsockopt"]["result"] == "disabled"
    assert "assumed missing" in rows(report)["prog_getsockopt"]["error"]
    assert report["selected_mode"] == "ebpf-tc"
    assert "ebpf-connect unusable (missing prog_getsockopt)" in report["reason"]


def test_no_netfilter_tools_in_path_and_no_ebpf_leave_nothing_to_run(runner, tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()
    result = runner.invoke(doctor, ["--assume-missing", "prog_connect4", "--assume-missing", "helper_sk_assign"],
                           env={"PATH": str(empty)})  # no nft, no iptables-*
    assert result.exit_code == 1, result.output
    lines = {line.split()[0]: line for line in result.output.splitlines() if line and not line.startswith(" ")}
    assert lines["tproxy_nft"].split()[1] == "fail"
    assert "nft is not installed (not found in PATH)" in lines["tproxy_nft"]
    assert lines["tproxy_iptables_legacy"].split()[1] == "fail"
    assert lines["prog_connect4"].split()[1] == "disabled"
    assert "the agent cannot run" in result.output
    assert "iptables unusable (missing tproxy_nft|tproxy_iptables_nft|tproxy_iptables_legacy)" in result.output
    assert probe_netns(os.getpid()) == []  # doctor ran in this process


def test_a_killed_doctor_s_namespace_is_removed_by_the_next_doctor_and_by_cleanup(bpf_capable):
    """A doctor killed mid-probe never runs its ``finally``: its throwaway namespace stays. The next
    doctor removes every probe namespace whose creator is gone (and only those); so does `cleanup`."""
    from pyroute2 import netns

    from agent.host.cleanup import CleanupReport, probe_namespace_leftovers
    from agent.host.probes import throwaway_netns

    gone = subprocess.Popen(["true"])
    gone.wait()
    alive = subprocess.Popen(["sleep", "60"])
    names = {"stale": f"tcpmesh-probe-{gone.pid}-dead01", "live": f"tcpmesh-probe-{alive.pid}-beef01",
             "stale2": f"tcpmesh-probe-{gone.pid}-dead02"}
    try:
        for name in names.values():
            netns.create(name)
        with throwaway_netns():
            pass
        left = set(netns.listnetns())
        assert names["stale"] not in left and names["stale2"] not in left, "the next doctor left a dead doctor's namespace"
        assert names["live"] in left, "a namespace of a living doctor must be left alone"
        netns.create(names["stale"])
        alive.kill()
        alive.wait()
        report = CleanupReport()
        probe_namespace_leftovers(report, dry_run=True)
        assert f"would remove netns {names['stale']}" in report.removed and names["stale"] in netns.listnetns()
        report = CleanupReport()
        probe_namespace_leftovers(report)
        assert {f"removed netns {names['stale']}", f"removed netns {names['live']}"} <= set(report.removed)
        assert not {names["stale"], names["live"]} & set(netns.listnetns())
    finally:
        if alive.poll() is None:
            alive.kill()
            alive.wait()
        for name in names.values():
            if name in netns.listnetns():
                netns.remove(name)
