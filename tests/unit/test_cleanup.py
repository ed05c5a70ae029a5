"""`tcpmesh cleanup`'s plumbing that needs no root: other modes' hooks, notes, dry runs, pins."""

from __future__ import annotations

import sys
import types

from agent.host.cleanup import CleanupReport, other_mode_leftovers, remove_pins


def fake_mode(monkeypatch, name, fn):
    module = types.ModuleType(name)
    if fn is not None:
        module.cleanup_leftovers = fn
    monkeypatch.setitem(sys.modules, name, module)


def test_a_mode_that_is_not_installed_is_a_note(monkeypatch):
    monkeypatch.setitem(sys.modules, "agent.capture.nosuchmode", None)  # import raises ImportError
    report = CleanupReport()
    other_mode_leftovers("agent.capture.nosuchmode", report)
    assert report.removed == [] and "not available" in report.notes[0]


def test_other_mode_is_called_in_this_netns_and_reported(monkeypatch):
    calls = []
    fake_mode(monkeypatch, "fake_tc", lambda netns=None: calls.append(netns) or ["tc filter on tmx"])
    report = CleanupReport()
    other_mode_leftovers("fake_tc", report)
    assert calls == [None] and report.removed == ["removed tc filter on tmx"]


def test_dry_run_skips_a_mode_without_one_and_passes_it_to_one_with(monkeypatch):
    fake_mode(monkeypatch, "fake_plain", lambda netns=None: ["must not run"])
    fake_mode(monkeypatch, "fake_dry", lambda netns=None, dry_run=False: [f"rule (dry={dry_run})"])
    report = CleanupReport()
    other_mode_leftovers("fake_plain", report, dry_run=True)
    other_mode_leftovers("fake_dry", report, dry_run=True)
    assert report.removed == ["would remove rule (dry=True)"]
    assert "no dry-run" in report.notes[0]


def test_a_failing_mode_is_a_problem_not_a_crash(monkeypatch):
    def boom(netns=None):
        raise RuntimeError("netlink said no")

    fake_mode(monkeypatch, "fake_boom", boom)
    report = CleanupReport()
    other_mode_leftovers("fake_boom", report)
    assert report.problems == ["fake_boom.cleanup_leftovers failed: netlink said no"]


def test_remove_pins_reports_each_object_and_is_idempotent(tmp_path):
    pin_dir = tmp_path / "node1"
    (pin_dir / "maps-v2-x").mkdir(parents=True)
    (pin_dir / "maps-v2-x" / "tcpmesh_counters").write_text("")
    report = CleanupReport()
    remove_pins(str(pin_dir), report, dry_run=True)
    assert report.removed[0] == f"would unpin {pin_dir}/maps-v2-x/tcpmesh_counters" and pin_dir.exists()
    report = CleanupReport()
    remove_pins(str(pin_dir), report)
    assert len(report.removed) == 3 and not pin_dir.exists()
    again = CleanupReport()
    remove_pins(str(pin_dir), again)
    assert again.removed == []


def test_only_probe_namespaces_of_gone_processes_are_stale():
    from agent.host.probes import stale_probe_namespaces

    names = ["tcpmesh-probe-100-ab12cd", "tcpmesh-probe-200-ef34ab", "tcpmesh-lab-n1", "tcpmesh-probe-x-1",
             "tcpmesh-probe-300-zz", "mytcpmesh-probe-100-ab"]
    assert stale_probe_namespaces(names, lambda pid: pid == 200) == ["tcpmesh-probe-100-ab12cd"]
