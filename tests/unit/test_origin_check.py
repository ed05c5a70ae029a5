"""agent/proxy/origin_check.py: the client's cgroup (the connect hook's record) against the pod its address names."""

from __future__ import annotations

import os

from agent.proxy.origin_check import CgroupOwnership, subtree_ids
from agent.registry.model import Workload

WEB = Workload("web", "shop", "web", "10.0.0.1", "node1", cgroup="/cg/web")
INTRUDER = Workload("intruder", "shop", "intruder", "10.0.0.2", "node1", cgroup="/cg/intruder")
TREES = {"/cg/web": {1, 11}, "/cg/intruder": {2}}


def ownership(trees=TREES, scans=None) -> CgroupOwnership:
    def scan(path: str) -> frozenset[int]:
        if scans is not None:
            scans.append(path)
        return frozenset(trees.get(path, ()))
    return CgroupOwnership(scan)


def test_the_pods_cgroup_or_a_container_below_it_is_the_pod():
    check = ownership()
    assert check.problem(WEB, 1, lambda: (WEB, INTRUDER)) == ""
    assert check.problem(WEB, 11, lambda: (WEB, INTRUDER)) == ""


def test_a_neighbours_cgroup_using_the_address_is_refused_and_named():
    problem = ownership().problem(WEB, 2, lambda: (WEB, INTRUDER))
    assert "shop/intruder's cgroup /cg/intruder" in problem and "is not shop/web's" in problem


def test_a_cgroup_of_no_workload_and_a_workload_without_cgroup_are_refused():
    assert "in no workload's cgroup" in ownership().problem(WEB, 99, lambda: (WEB, INTRUDER))
    bare = Workload("bare", "shop", "bare", "10.0.0.3", "node1")
    assert "none in the registry" in ownership().problem(bare, 1, lambda: (WEB,))


def test_without_a_cgroup_record_there_is_nothing_to_compare():
    assert ownership().problem(WEB, None, lambda: ()) == ""


def test_a_container_cgroup_made_later_is_found_by_one_rescan_and_then_cached():
    trees = {"/cg/web": {1}}
    scans: list[str] = []
    check = ownership(trees, scans)
    assert check.problem(WEB, 1, lambda: ()) == ""
    trees["/cg/web"] = {1, 12}
    assert check.problem(WEB, 12, lambda: ()) == "" and check.problem(WEB, 12, lambda: ()) == ""
    assert scans == ["/cg/web", "/cg/web"]


def test_subtree_ids_reads_inode_numbers_below_a_directory(tmp_path):
    (tmp_path / "c1" / "deeper").mkdir(parents=True)
    assert subtree_ids(str(tmp_path)) == {os.stat(p).st_ino for p in (tmp_path, tmp_path / "c1", tmp_path / "c1/deeper")}
    assert subtree_ids(str(tmp_path / "gone")) == frozenset()
