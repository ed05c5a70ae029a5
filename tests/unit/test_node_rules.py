"""agent/capture/node_rules.py: what the packet-level modes refuse or exempt in the node netns, and the nft text."""

from agent.capture.node_rules import NodeRules, node_destinations, node_port_pairs, ruleset, shared_interfaces


def test_ipv6_workloads_ipv6_service_frontends_and_ipv4_service_addresses_are_sorted_out():
    mesh = node_destinations(["10.77.1.11", "fd00:77:2::11", "fd00:77:2::11"],
                             [("10.96.0.1", 80), ("10.96.0.1", 443), ("fd00:96::1", 5432)])
    assert mesh == (("fd00:77:2::11",), (("fd00:96::1", 5432),), ("10.96.0.1",))


def test_the_ruleset_updates_the_table_in_place_and_acts_only_on_packets_from_pod_interfaces():
    text = ruleset(["tmb", "tma"], (("fd00::11",), (("fd00:96::1", 5432),), ("10.96.0.1",)))
    assert text.startswith("table inet tcpmesh_node {\n") and "delete table" not in text
    assert "flush set inet tcpmesh_node pod_ifaces\n" in text and "flush chain inet tcpmesh_node prerouting\n" in text
    assert "flush set inet tcpmesh_node refused4" not in text  # the counts survive every change
    assert 'elements = { "tma", "tmb" }' in text and "fd00:96::1 . 5432" in text
    assert "priority raw" in text  # before conntrack and kube-proxy's DNAT: the address the pod dialled
    assert "    iifname @pod_ifaces ip daddr @vips4 notrack\n" in text
    assert text.count("iifname @pod_ifaces tcp flags & (syn | ack) == syn ip6 daddr") == 3  # mesh6, svc, nodePorts
    assert "meta nfproto ipv6" not in text
    replaced = ruleset(["tma"], ((), (), ()), replace=True)
    assert replaced.startswith("table inet tcpmesh_node\ndelete table inet tcpmesh_node\n") and "flush" not in replaced


def test_every_reset_is_counted_per_source_destination_and_port_then_reset():
    text = ruleset(["tma"], ((), (), ()))
    assert "set refused4 { type ipv4_addr . ipv4_addr . inet_service; size 65536; flags dynamic,timeout; " \
           "timeout 10m; }" in text
    assert "  chain refuse4 {\n    update @refused4 { ip saddr . ip daddr . tcp dport counter }\n" \
           "    reject with tcp reset\n" in text
    assert "  chain refuse6 {\n    update @refused6 { ip6 saddr . ip6 daddr . tcp dport counter }\n" \
           "    reject with tcp reset\n" in text
    assert "reject" not in text.split("chain prerouting {\n    iifname")[1]  # the resets jump, counted first
    uncounted = ruleset(["tma"], ((), (), ()), replace=True, count=False)  # a kernel that cannot count: reset only
    assert "refused4" not in uncounted and "  chain refuse4 {\n    reject with tcp reset\n" in uncounted


def test_passthrough_deny_adds_one_rule_for_every_ipv6_syn_from_a_pod():
    text = ruleset(["tma"], ((), (), ()), refuse_all6=True)
    assert "    iifname @pod_ifaces tcp flags & (syn | ack) == syn meta nfproto ipv6 jump refuse6\n" in text
    assert "set pod_ifaces { type ifname; elements" in text and "  set mesh6 { type ipv6_addr; }\n" in text


def test_an_interface_several_workloads_share_is_found():
    assert shared_interfaces({"a/p1": "tmp1", "a/p2": "cni0", "a/p3": "cni0"}) == {"cni0": ("a/p2", "a/p3")}
    assert shared_interfaces({"a/p1": "tmp1", "a/p2": "tmp2"}) == {}


def test_pods_behind_one_bridge_are_said_once_loudly(caplog):
    rules = NodeRules("ebpf-tc")  # no mesh, passthrough ALLOW: no table, so no nft is run
    with caplog.at_level("WARNING", logger="tcpmesh.capture"):
        rules.set_interfaces({"a/p1": "cni0", "a/p2": "cni0"})
        rules.set_interfaces({"a/p1": "cni0", "a/p2": "cni0"})
        rules.set_interfaces({"a/p1": "tmp1"})
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "a/p1, a/p2 share the node interface cni0" in warnings[0]
    assert "ebpf-connect" in warnings[0]


def test_node_ports_of_either_family_are_reset_by_address_and_port():
    pairs = node_port_pairs([("10.77.0.2", 30760), ("169.254.1.1", 30760), ("fd00:76:0::2", 30760),
                             ("10.77.0.2", 30760)])
    assert pairs == ((("10.77.0.2", 30760), ("169.254.1.1", 30760)), (("fd00:76::2", 30760),))
    text = ruleset(["tma"], ((), (), ()), node_ports=pairs)
    assert "set node_ports4 { type ipv4_addr . inet_service; elements = { 10.77.0.2 . 30760, 169.254.1.1 . 30760 }; }" \
        in text and "fd00:76::2 . 30760" in text
    assert "syn ip daddr . tcp dport @node_ports4 jump refuse4\n" in text
    assert "syn ip6 daddr . tcp dport @node_ports6 jump refuse6\n" in text


def test_a_kernel_that_cannot_count_gets_the_resets_uncounted_and_it_is_said_once(monkeypatch, caplog):
    from agent.capture import node_rules
    from agent.capture.netns import Completed

    ran = []

    def run(argv, netns=None, stdin=None):
        ran.append(stdin)
        refused = "update @refused4" in (stdin or "")
        return Completed(tuple(argv), 1 if refused else 0, "", "Error: Could not process rule: Not supported" if refused else "")

    monkeypatch.setattr(node_rules, "run", run)
    rules = NodeRules("ebpf-tc")
    with caplog.at_level("WARNING", logger="tcpmesh.capture"):
        rules.set_mesh([], [], [("10.76.0.1", 30760)])
        rules.set_mesh([], [], [("10.76.0.1", 30760), ("10.76.0.1", 30761)])
    assert not rules.counting and rules.read_refusals() == {}
    assert "10.76.0.1 . 30761" in ran[-1] and "update @refused4" not in ran[-1]  # straight to the uncounted table
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "cannot count" in warnings[0] and "ebpf-connect" in warnings[0], warnings
