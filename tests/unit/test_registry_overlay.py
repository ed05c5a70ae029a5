"""Merging run-time workloads into the file registry, and the attach/detach plan between snapshots."""

import dataclasses

import pytest

from agent.errors import ConfigError
from agent.registry.model import Node, Registry, Workload
from agent.registry.overlay import merge, plan_local

TD = "td.example"


def wl(name, ip, node="node1", sa=None, cgroup=None):
    return Workload(name, "shop", sa or name, ip, node, cgroup or f"/cg/{name}", TD)


BASE = Registry.build(TD, [Node("node1", "10.0.0.1"), Node("node2", "10.0.0.2")],
                      [wl("web", "10.1.0.1"), wl("db", "10.2.0.1", node="node2")])


def test_merge_adds_and_replaces_by_key():
    merged = merge(BASE, [wl("batch", "10.1.0.2"), wl("web", "10.1.0.9")])
    assert merged.by_ip("10.1.0.2").name == "batch"
    assert merged.by_ip("10.1.0.9").name == "web" and merged.by_ip("10.1.0.1") is None


@pytest.mark.parametrize("added, words", [
    (wl("x", "10.2.0.1"), "already the IP of shop/db"),
    (wl("x", "10.1.0.7", node="node9"), "names no node"),
    (wl("x", "10.1.0.7", cgroup="/cg/web/app"), r"x.cgroup.*is inside the cgroup of shop/web \(/cg/web\)"),
    (wl("x", "10.1.0.7", cgroup="/cg/web/"), "is also the cgroup of shop/web"),
])
def test_merge_rejects_conflicts_with_a_named_field(added, words):
    with pytest.raises(ConfigError, match=words):
        merge(BASE, [added])


def test_workloads_on_other_nodes_or_in_sibling_cgroups_do_not_conflict():
    merged = merge(BASE, [wl("x", "10.1.0.7", cgroup="/cg/web-2"), wl("y", "10.2.0.7", node="node2", cgroup="/cg/web/a")])
    assert {w.name for w in merged.workloads} == {"web", "db", "x", "y"}


def test_plan_from_nothing_attaches_every_local_workload():
    plan = plan_local(None, BASE, "node1")
    assert [w.name for w in plan.attach] == ["web"] and plan.detach == ()


def test_plan_attaches_new_detaches_removed_and_reattaches_changed():
    new = merge(Registry.build(TD, BASE.nodes.values(), [wl("db", "10.2.0.1", node="node2")]),
                [wl("batch", "10.1.0.2")])
    plan = plan_local(BASE, new, "node1")
    assert [w.name for w in plan.attach] == ["batch"]
    assert [w.name for w in plan.detach] == ["web"]
    moved = merge(BASE, [dataclasses.replace(wl("web", "10.1.0.1"), cgroup="/cg/web-2")])
    plan = plan_local(BASE, moved, "node1")
    assert [w.cgroup for w in plan.detach] == ["/cg/web"] and [w.cgroup for w in plan.attach] == ["/cg/web-2"]


def test_changes_on_other_nodes_do_not_touch_this_node():
    assert plan_local(BASE, merge(BASE, [wl("cache", "10.2.0.5", node="node2")]), "node1").empty
