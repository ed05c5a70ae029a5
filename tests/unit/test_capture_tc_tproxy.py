"""The pure parts of the ebpf-tc and iptables modes: rule text, LPM entries, flags, transparent origins."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.capture import abi, netfilter, steering
from agent.capture.netfilter import TproxySpec, cidr_rules, iptables_capture_chain, nft_ruleset, spec_for
from agent.capture.tc_mode import TC_PRIORITY, cidr_entries, compile_flags
from agent.capture.transparent import lookup_address, transparent_origin
from agent.errors import ConfigError


def test_cidr_rules_put_the_longest_prefix_first_so_first_match_is_longest_match():
    rules = cidr_rules(["0.0.0.0/0", "10.0.0.0/8"], ["10.1.0.0/16", "10.1.2.3/32"])
    assert rules == (("10.1.2.3/32", False), ("10.1.0.0/16", False), ("10.0.0.0/8", True), ("0.0.0.0/0", True))


def test_cidr_rules_refuse_a_prefix_in_both_lists():
    with pytest.raises(ConfigError) as info:
        cidr_rules(["10.0.0.0/8"], ["10.0.0.0/8"])
    assert info.value.field == "bypass_cidrs"


def test_nft_ruleset_keeps_the_pod_set_and_rebuilds_the_chains_in_one_transaction():
    text = nft_ruleset(spec_for("0.0.0.0", 15001, abi.STEER_MARK, ["0.0.0.0/0"], ["10.9.0.0/16"]))
    lines = text.splitlines()
    assert lines[0] == "table inet tcpmesh {}"
    assert not any(line.startswith(("flush set", "delete")) for line in lines)  # captured pods survive
    assert "flush chain inet tcpmesh capture" in lines
    assert ("add rule inet tcpmesh prerouting meta nfproto ipv4 meta l4proto tcp iifname @pod_ifaces "
            "jump capture") in lines
    order = [line.split(" capture ", 1)[1] for line in lines if line.startswith("add rule inet tcpmesh capture")]
    assert order == ["ct direction reply return", "fib daddr type local return", "ip daddr 0.0.0.0/8 return",
                     "ip daddr 10.9.0.0/16 return", "ip daddr 0.0.0.0/0 jump divert"]
    assert ("add rule inet tcpmesh divert meta l4proto tcp tproxy ip to 127.0.0.1:15001 "
            "meta mark set meta mark | 0x10000000 accept") in lines
    assert lines[-1] == "add rule inet tcpmesh divert counter drop"  # no listener: never forwarded


def test_iptables_chain_is_one_atomic_restore_of_the_capture_chain():
    spec = TproxySpec("10.76.0.1", 15001, 0x10000000, (("10.1.0.0/16", False), ("0.0.0.0/0", True)))
    lines = iptables_capture_chain(spec).splitlines()
    assert lines[0] == "*mangle" and lines[1] == ":TCPMESH-CAPTURE - [0:0]" and lines[-1] == "COMMIT"
    assert lines[2:6] == [
        "-A TCPMESH-CAPTURE -m conntrack --ctdir REPLY -j RETURN",
        "-A TCPMESH-CAPTURE -m addrtype --dst-type LOCAL -j RETURN",
        "-A TCPMESH-CAPTURE -d 0.0.0.0/8 -j RETURN",
        "-A TCPMESH-CAPTURE -d 10.1.0.0/16 -j RETURN",
    ]
    assert lines[6] == ("-A TCPMESH-CAPTURE -d 0.0.0.0/0 -p tcp -j TPROXY --on-port 15001 --on-ip 10.76.0.1 "
                        "--tproxy-mark 0x10000000/0x10000000")


def test_leftovers_are_found_in_iptables_save_output():
    text = "\n".join([
        "*mangle", ":PREROUTING ACCEPT [0:0]", ":OTHER - [0:0]", ":TCPMESH-CAPTURE - [0:0]",
        ":TCPMESH-PREROUTING - [0:0]", "-A PREROUTING -p tcp -j TCPMESH-PREROUTING",
        "-A PREROUTING -j OTHER", "-A OTHER -i x -j TCPMESH-CAPTURE",
        "-A TCPMESH-PREROUTING -i tmn1p1 -j TCPMESH-CAPTURE", "COMMIT"])
    chains, jumps = netfilter.tcpmesh_objects_in_save(text)
    assert chains == ["TCPMESH-CAPTURE", "TCPMESH-PREROUTING"]
    assert jumps == ["-A PREROUTING -p tcp -j TCPMESH-PREROUTING", "-A OTHER -i x -j TCPMESH-CAPTURE"]


def test_unknown_backend_is_refused_by_name():
    with pytest.raises(ValueError, match="nft, iptables-nft, iptables-legacy"):
        netfilter.backend("ipfw")


def test_listener_lookup_address():
    assert lookup_address("0.0.0.0") == "127.0.0.1"
    assert lookup_address("10.76.0.1") == "10.76.0.1"


def test_tc_compile_flags_and_lpm_entries_bypass_every_node_address():
    flags = compile_flags(Path("/src/bpf"), "0.0.0.0", 15001)
    assert "-DPROXY_IP=2130706433u" in flags and "-DPROXY_PORT=15001" in flags and "-I/src/bpf/include" in flags
    entries = cidr_entries(["0.0.0.0/0"], [], frozenset({"10.76.0.1", "169.254.1.1"}))
    assert entries[(0, 0)] == abi.CIDR_CAPTURE
    assert entries[(32, abi.ip4_to_net_u32("10.76.0.1"))] == abi.CIDR_BYPASS
    assert entries[(32, abi.ip4_to_net_u32("169.254.1.1"))] == abi.CIDR_BYPASS
    # a node address wins over a configured capture /32 of the same address
    assert cidr_entries(["10.76.0.1/32"], [], frozenset({"10.76.0.1"}))[(32, abi.ip4_to_net_u32("10.76.0.1"))] \
        == abi.CIDR_BYPASS


def test_constants_are_recognisable_and_consistent():
    assert steering.TABLE == steering.RULE_PRIORITY == TC_PRIORITY == 0x746D
    assert steering.MARK == abi.STEER_MARK and bin(abi.STEER_MARK).count("1") == 1  # one bit: other marks kept
    assert len(abi.TC_REASONS) == abi.TC_REASON_MAX
    assert abi.C_CONSTANTS["TCPMESH_TC_R_ORPHAN_DROPPED"] == abi.TC_REASONS.index("orphan_dropped")


class FakeSocket:
    def __init__(self, sockname) -> None:
        self._sockname = sockname

    def getsockname(self):
        if isinstance(self._sockname, Exception):
            raise self._sockname
        return self._sockname


def test_transparent_origin_is_the_local_address_of_the_accepted_socket():
    origin = transparent_origin(FakeSocket(("10.77.2.10", 5432)), frozenset({"10.76.0.1"}))
    assert (origin.dst_ip, origin.dst_port) == ("10.77.2.10", 5432)
    assert origin.pid is None and origin.comm is None and origin.cgroup_id is None  # unknown in these modes


@pytest.mark.parametrize("sockname", [("169.254.1.1", 15001), ("127.0.0.1", 15001), OSError(9, "bad fd")])
def test_a_connection_to_a_node_address_was_not_captured(sockname):
    assert transparent_origin(FakeSocket(sockname), frozenset({"169.254.1.1", "10.76.0.1"})) is None


def test_tproxy_capture_validates_its_inputs_before_start():
    from agent.capture.tproxy_mode import TproxyCapture

    with pytest.raises(ValueError):
        TproxyCapture("0.0.0.0", 15001, backends=["nft", "pf"])
    with pytest.raises(ConfigError):
        TproxyCapture("0.0.0.0", 15001, capture_cidrs=["10.0.0.1/8"])
    capture = TproxyCapture("0.0.0.0", 15001)
    assert capture.name == "iptables" and capture.listener.transparent
    assert capture.origin(FakeSocket(("10.1.1.1", 80))).dst_ip == "10.1.1.1"
