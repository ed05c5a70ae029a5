"""agent/capture/ipv6_refusal.py: which IPv6 destinations the packet-level modes refuse, and the nft text."""

from agent.capture.ipv6_refusal import ipv6_destinations, ruleset


def test_only_ipv6_workload_addresses_and_ipv6_service_frontends_are_refused():
    addresses, frontends = ipv6_destinations(["10.77.1.11", "fd00:77:2::11", "fd00:77:2::11"],
                                             [("10.96.0.1", 80), ("fd00:96::1", 5432)])
    assert addresses == ("fd00:77:2::11",)
    assert frontends == (("fd00:96::1", 5432),)  # the Service's port only: other ports are outside the mesh


def test_the_ruleset_replaces_the_table_and_resets_only_syns_from_pod_interfaces():
    text = ruleset(["tmb", "tma"], ["fd00::11"], [("fd00:96::1", 5432)])
    assert text.startswith("table ip6 tcpmesh_ipv6\ndelete table ip6 tcpmesh_ipv6\n")
    assert 'elements = { "tma", "tmb" }' in text and "fd00:96::1 . 5432" in text
    assert "priority raw" in text  # before conntrack and kube-proxy's DNAT: the address the pod dialled
    assert text.count("iifname @pod_ifaces tcp flags & (syn | ack) == syn") == 2
    assert text.count("reject with tcp reset") == 2


def test_empty_sets_carry_no_elements_clause():
    text = ruleset([], ["fd00::11"], [])
    assert "set pod_ifaces { type ifname; }" in text
    assert "set mesh6_svc { type ipv6_addr . inet_service; }" in text


def test_passthrough_deny_adds_one_rule_for_every_ipv6_syn_from_a_pod():
    assert "syn reject with tcp reset" not in ruleset(["tma"], [], [], refuse_all=False).replace("@mesh6", "")
    text = ruleset(["tma"], [], [], refuse_all=True)
    assert "    iifname @pod_ifaces tcp flags & (syn | ack) == syn reject with tcp reset\n" in text
