"""The return path's policy routing in real network namespaces, both families (agent.capture.steering,
agent.capture.source_return_child): the IPv6 pair (``ip -6 rule fwmark ... lookup 29805`` and
``local ::/0 dev lo table 29805``) is installed beside IPv4's, found and removed by `tcpmesh cleanup`;
a namespace whose kernel side refuses IPv6 (lo with disable_ipv6) gets a reason naming the fix, keeps
its IPv4 pair, and no half of the IPv6 one (the rule goes first and is taken back when the route
fails: a kernel without IPv6 policy routing refuses the rule, and must never get the route, which it
would file in the main table, making every IPv6 address local)."""

from __future__ import annotations

import subprocess
import uuid

import pytest

from agent.capture import source_return_child, steering, tc_mode
from agent.host import probes


@pytest.fixture
def netns(privileged):
    name = f"tcpmesh-test-steer-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def ip(netns: str, *argv: str) -> str:
    return subprocess.run(["ip", "netns", "exec", netns, "ip", *argv], check=True, capture_output=True,
                          text=True).stdout


def test_the_ipv6_pair_is_installed_beside_ipv4s_and_tcpmesh_cleanup_removes_both(netns):
    assert source_return_child.handle({"op": "ensure", "netns": netns}) == {"ipv6": "ok"}
    assert source_return_child.handle({"op": "ensure", "netns": netns}) == {"ipv6": "ok"}  # idempotent
    assert "fwmark 0x10000000/0x10000000 lookup 29805 proto 116" in ip(netns, "-6", "rule")
    assert "local default dev lo proto 116" in ip(netns, "-6", "route", "show", "table", "29805")
    found = steering.present(netns)
    assert len(found) == 4 and sum(item.startswith("ip -6 ") for item in found) == 2, found
    removed = tc_mode.cleanup_leftovers(netns)  # what `tcpmesh cleanup` runs per namespace
    assert any(item.startswith("ip -6 rule") for item in removed), removed
    assert any(item.startswith("ip -6 route local ::/0") for item in removed), removed
    assert steering.present(netns) == [] and "29805" not in ip(netns, "-6", "rule")


def test_a_namespace_refusing_ipv6_keeps_ipv4s_pair_and_gets_no_local_ipv6_route(netns):
    subprocess.run(["ip", "netns", "exec", netns, "sysctl", "-qw", "net.ipv6.conf.lo.disable_ipv6=1"], check=True)
    answer = source_return_child.handle({"op": "ensure", "netns": netns})
    assert answer["ipv6"] not in ("ok", "absent") and "disable_ipv6=0" in answer["ipv6"], answer
    assert steering.present(netns) == ["ip rule pref 29805 fwmark 0x10000000/0x10000000 lookup 29805",
                                       "ip route local 0.0.0.0/0 dev lo table 29805"]  # no half IPv6 pair
    assert "local default" not in ip(netns, "-6", "route", "show", "table", "all")
    steering.remove(netns)
    assert steering.present(netns) == []


def test_doctor_probes_the_ipv6_pair(netns):
    assert probes.probe_policy_routing6(netns).result == probes.OK
    assert steering.present(netns) == []
