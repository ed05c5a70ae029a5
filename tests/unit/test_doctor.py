"""`tcpmesh doctor`'s pure parts: which mode each set of check results allows, the JSON schema, the table."""

from __future__ import annotations

import click
import pytest

from agent.host import doctor, probes
from agent.host.doctor import CheckResult, build_report, evaluate_modes, parse_disabled, render_table, select_mode


def all_ok(**overrides: str) -> list[CheckResult]:
    return [CheckResult(name, overrides.get(name, probes.OK), error="boom" if name in overrides else "")
            for name in doctor.CHECKS]


def verdicts(results):
    return {v.name: v for v in evaluate_modes({r.name: r for r in results})}


def test_everything_ok_makes_every_mode_usable_and_auto_picks_ebpf_connect():
    report = build_report(all_ok(), "auto")
    assert [m["name"] for m in report["modes"]] == ["ebpf-connect", "ebpf-tc", "iptables"]
    assert all(m["usable"] for m in report["modes"])
    assert report["selected_mode"] == "ebpf-connect" and report["can_run"]
    assert report["modes"][2]["detail"] == "netfilter backend nft"


def test_a_missing_sockopt_program_falls_back_to_ebpf_tc_and_says_why():
    results = all_ok(prog_getsockopt=doctor.DISABLED)
    selected, why = select_mode("auto", evaluate_modes({r.name: r for r in results}))
    assert selected == "ebpf-tc"
    assert "ebpf-connect unusable (missing prog_getsockopt)" in why


def test_iptables_needs_any_one_backend():
    results = all_ok(tproxy_nft=probes.FAIL, tproxy_iptables_nft=probes.FAIL)
    assert verdicts(results)["iptables"].usable
    assert verdicts(results)["iptables"].detail == "netfilter backend iptables-legacy"
    results = all_ok(tproxy_nft=probes.FAIL, tproxy_iptables_nft=probes.FAIL, tproxy_iptables_legacy=probes.FAIL)
    assert verdicts(results)["iptables"].missing == ("tproxy_nft|tproxy_iptables_nft|tproxy_iptables_legacy",)


def test_warnings_do_not_block_but_missing_root_blocks_everything():
    assert build_report(all_ok(clock=probes.WARN), "auto")["can_run"]
    report = build_report(all_ok(root=probes.FAIL), "auto")
    assert not report["can_run"] and report["selected_mode"] is None
    assert all("root" in m["missing"] for m in report["modes"])


def test_an_explicit_mode_is_judged_alone():
    results = all_ok(helper_sk_assign=probes.FAIL)
    assert select_mode("ebpf-tc", evaluate_modes({r.name: r for r in results})) == \
        (None, "capture.mode is ebpf-tc but this host lacks: helper_sk_assign")
    assert select_mode("iptables", evaluate_modes({r.name: r for r in results}))[0] == "iptables"
    assert select_mode("none", [])[0] == "none"


def test_report_schema_is_stable():
    report = build_report(all_ok(bcc=probes.FAIL), "auto")
    assert set(report) == {"version", "checks", "modes", "configured_mode", "selected_mode", "reason",
                           "source_address", "same_node", "data_path", "can_run"}
    assert set(report["source_address"]) == {"configured", "selected", "can_run", "missing", "reason", "ipv6"}
    assert set(report["source_address"]["ipv6"]) == {"selected", "can_run", "missing", "reason"}
    assert report["version"] == doctor.REPORT_VERSION == 1
    assert set(report["checks"][0]) == {"name", "result", "detail", "error", "seconds"}
    assert set(report["modes"][0]) == {"name", "usable", "missing", "detail"}
    assert [c["name"] for c in report["checks"]] == list(doctor.CHECKS)
    bcc = next(c for c in report["checks"] if c["name"] == "bcc")
    assert bcc["result"] == "fail" and bcc["error"] == "boom"
    assert report["selected_mode"] == "iptables"


def test_table_shows_each_check_its_result_and_error_then_the_choice():
    text = render_table(build_report(all_ok(tproxy_nft=probes.FAIL), "auto"))
    lines = text.splitlines()
    assert lines[0].split() == ["CHECK", "RESULT", "DETAIL", "/", "ERROR"]
    row = next(line for line in lines if line.startswith("tproxy_nft "))
    assert row.split() == ["tproxy_nft", "fail", "boom"]
    assert "the agent would use: ebpf-connect" in text
    assert "mode iptables: usable (netfilter backend iptables-nft)" in text


def test_disabled_checks_are_parsed_from_options_and_environment():
    assert parse_disabled(["bcc", "tc_clsact,tproxy_nft", ""]) == {"bcc", "tc_clsact", "tproxy_nft"}
    with pytest.raises(click.BadParameter, match="unknown check"):
        parse_disabled(["bcc,nope"])


def test_every_mode_requirement_is_a_known_check():
    for needs in doctor.MODE_REQUIREMENTS.values():
        for need in needs:
            for name in need if isinstance(need, tuple) else (need,):
                assert name in doctor.CHECKS
    assert set(probes.PROGRAM_PROBES) | set(probes.TPROXY_PROBES) <= set(doctor.CHECKS)


def test_host_probes_read_what_they_are_given(tmp_path):
    status = tmp_path / "status"
    status.write_text("Name:\tx\nCapEff:\t0000000000201000\n")  # NET_ADMIN (12) + SYS_ADMIN (21)
    assert probes.probe_permissions(str(status)).result == probes.OK
    status.write_text("CapEff:\t0000000000001000\n")
    assert "CAP_SYS_ADMIN" in probes.probe_permissions(str(status)).error
    assert probes.probe_clock(now=0).result == probes.FAIL  # 1970
    assert probes.probe_clock(now=1_800_000_000).result in (probes.OK, probes.WARN)
    fs = tmp_path / "filesystems"
    fs.write_text("nodev\tsysfs\nnodev\tbpf\n\text4\n")
    assert probes.probe_bpffs(str(fs)).result == probes.OK
    fs.write_text("nodev\tsysfs\n")
    assert probes.probe_bpffs(str(fs)).result == probes.FAIL


def test_the_source_address_is_the_pods_where_the_host_allows_it():
    verdict = doctor.source_address_verdict({r.name: r for r in all_ok()}, "auto")
    assert (verdict["selected"], verdict["can_run"], verdict["missing"]) == ("pod", True, [])


def test_auto_falls_back_to_the_node_address_and_says_what_is_missing():
    results = {r.name: r for r in all_ok(prog_sched_cls=probes.FAIL)}
    verdict = doctor.source_address_verdict(results, "auto")
    assert (verdict["selected"], verdict["can_run"], verdict["missing"]) == ("node", True, ["prog_sched_cls"])
    assert "prog_sched_cls" in verdict["reason"] and "node's address" in verdict["reason"]


def test_source_address_pod_on_a_host_that_lacks_it_cannot_run():
    report = build_report(all_ok(tc_clsact=probes.FAIL), "ebpf-connect", source_address="pod")
    assert report["selected_mode"] == "ebpf-connect" and not report["can_run"]
    assert report["source_address"]["selected"] is None
    assert "set it to auto or node" in report["source_address"]["reason"]
    assert "source address servers see: none" in render_table(report)


def test_ipv6_legs_keep_the_pods_address_where_the_ipv6_pair_installs():
    report = build_report(all_ok(), "auto")
    assert report["source_address"]["ipv6"]["selected"] == "pod"
    assert "source address IPv6 servers see: pod" in render_table(report)


def test_without_the_ipv6_pair_auto_gives_ipv6_servers_the_node_address_and_says_why():
    report = build_report(all_ok(policy_routing6=probes.FAIL), "auto")
    source = report["source_address"]
    assert (source["selected"], source["ipv6"]["selected"], report["can_run"]) == ("pod", "node", True)
    assert source["ipv6"]["missing"] == ["policy_routing6"]
    assert "CONFIG_IPV6_MULTIPLE_TABLES" in source["ipv6"]["reason"]
    assert "source address IPv6 servers see: node" in render_table(report)


def test_without_the_ipv6_pair_pod_cannot_run_unless_ipv6_is_not_meshed():
    report = build_report(all_ok(policy_routing6=probes.FAIL), "ebpf-connect", source_address="pod")
    assert not report["can_run"] and report["source_address"]["ipv6"]["selected"] is None
    assert "capture.ipv6 to false" in report["source_address"]["ipv6"]["reason"]
    off = build_report(all_ok(policy_routing6=probes.FAIL), "ebpf-connect", source_address="pod", ipv6_required=False)
    assert off["can_run"] and off["source_address"]["ipv6"]["selected"] == "node"


def test_a_kernel_without_ipv6_needs_no_ipv6_pair():
    results = all_ok()
    results[[r.name for r in results].index("policy_routing6")] = CheckResult("policy_routing6", probes.SKIPPED,
                                                                             error=probes.NO_IPV6)
    report = build_report(results, "ebpf-connect", source_address="pod")
    assert report["can_run"] and report["source_address"]["ipv6"]["selected"] == "none"


def test_source_address_node_is_the_configured_fallback():
    verdict = doctor.source_address_verdict({r.name: r for r in all_ok()}, "node")
    assert verdict["selected"] == "node" and verdict["can_run"]


def test_same_node_path_is_reported_and_the_switch_named():
    local = build_report(all_ok(), "auto")
    assert local["same_node"]["path"] == "local" and "proxy.same_node" in local["same_node"]["reason"]
    assert "same-node connections: local" in render_table(local)
    tunnel = build_report(all_ok(), "auto", same_node="tunnel")
    assert tunnel["same_node"]["path"] == "tunnel"
    assert "same-node connections: tunnel" in render_table(tunnel)


def test_the_ipv6_probe_reads_the_nodes_own_lo_before_the_throwaway_namespace(tmp_path):
    """A fresh namespace cannot show a disable_ipv6 set on the node's lo: the probe reads it first
    (and never reaches the namespace here: the name is not one)."""
    assert probes.probe_policy_routing6("no-such-netns", str(tmp_path / "absent")).error == probes.NO_IPV6
    lo = tmp_path / "conf" / "lo"
    lo.mkdir(parents=True)
    (lo / "disable_ipv6").write_text("1\n")
    probe = probes.probe_policy_routing6("no-such-netns", str(tmp_path))
    assert probe.result == probes.FAIL and "net.ipv6.conf.lo.disable_ipv6=1" in probe.error
