"""capture.mode auto and the packet-level modes on a real agent: auto falls back by probe and logs
which mode and why; an agent in ebpf-tc or iptables mode stopped with SIGTERM leaves no tc filter,
rule, route, nft table or iptables chain of tcpmesh in its node netns (stop() alone, before any
lab down)."""

from __future__ import annotations

import os
import signal
import uuid

import pytest

from agent.capture import tc_mode, tproxy_mode
from agent.host.doctor import DISABLE_ENV
from agent.lab import lab as labops
from tests.e2e.conftest import Lab


def leftovers(netns: str) -> list[str]:
    return sorted(set(tc_mode.find_leftovers(netns)) | set(tproxy_mode.find_leftovers(netns)))


@pytest.mark.parametrize("mode, disabled, chosen", [
    ("auto", "prog_getsockopt", "ebpf-tc"),  # ebpf-connect hidden: auto falls back to ebpf-tc
    ("iptables", "", "iptables"),
])
def test_mode_is_chosen_traffic_flows_and_sigterm_leaves_nothing(bpf_capable, monkeypatch, mode, disabled, chosen):
    monkeypatch.setenv(DISABLE_ENV, disabled)  # the agents inherit it; their doctor run honours it
    name = f"cm{uuid.uuid4().hex[:6]}"
    lab = None
    try:
        lab = Lab(name, labops.lab_up(name, 1, 2, "cm.tcpmesh", capture_mode=mode), chosen)
        node = lab.node(1)
        log = open(node.log_file).read()
        assert f"captured ({chosen})" in log
        if mode == "auto":
            assert f"capture mode {chosen} chosen" in log and "ebpf-connect unusable (missing prog_getsockopt)" in log
        assert leftovers(node.netns), "the capture left no trace in the node netns while running"

        lab.start_server("n1p2", 7200, "digest")
        result = lab.run_client("n1p1", f"{lab.pod('n1p2').ip}:7200", 5000, "digest", name="cm-client")
        assert result["complete"], result
        flow = lab.wait_flow(1, lambda f: f["destination_port"] == 7200 and f["reporter"] == "source")
        assert flow["security"] == "mutual_tls" and flow["source_workload"] == "n1p1"
        assert flow["pid"] is None  # packet-level capture: the process is unknown

        pid = labops.lab_status(name)["nodes"][0]["agent"]["pid"]
        mapped = open(f"/proc/{pid}/maps").read()
        assert "libLLVM" not in mapped and "libbcc" not in mapped  # ebpf-tc compiles in a child process
        os.kill(pid, signal.SIGTERM)
        _, status = os.waitpid(pid, 0)  # lab_up started the agent from this process
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"agent exit status {status:#x}"
        assert leftovers(node.netns) == []
    finally:
        if lab is not None:
            lab.stop_apps()
        labops.lab_down(name)
