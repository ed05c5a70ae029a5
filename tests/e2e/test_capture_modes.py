"""capture.mode auto and the packet-level modes on a real agent: auto falls back by probe and logs
which mode and why; an agent in ebpf-tc or iptables mode that is SIGKILLed fails closed (its filters
or rules stay, nothing listens: a pod's captured connect gets no answer, and the server sees no
packet of it) and works again once restarted; stopped with SIGTERM it leaves no tc filter, rule,
route, nft table or iptables chain of tcpmesh in its node netns (stop() alone, before any lab down)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid

import pytest

from agent.capture import tc_mode, tproxy_mode
from agent.host.doctor import DISABLE_ENV
from agent.lab import lab as labops
from agent.lab.sniff import PacketCapture
from tests.e2e.conftest import Lab

# One connect from a pod: its outcome as "answered", "eof", "timeout" or the errno's name.
PROBE = r"""
import errno, json, socket, sys
ip, port, timeout, marker = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4].encode()
s = socket.socket()
s.settimeout(timeout)
try:
    s.connect((ip, port))
    s.sendall(marker)
    s.shutdown(socket.SHUT_WR)
    print(json.dumps({"result": "answered" if s.recv(100) else "eof"}))
except socket.timeout:
    print(json.dumps({"result": "timeout"}))
except OSError as exc:
    print(json.dumps({"result": errno.errorcode.get(exc.errno, str(exc))}))
"""


def probe(lab: Lab, pod: str, ip: str, port: int, marker: str, timeout: float = 2.0) -> str:
    proc = labops.lab_exec(lab.name, pod, [sys.executable, "-c", PROBE, ip, str(port), str(timeout), marker],
                           stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=timeout + 30)
    return json.loads(out.strip().splitlines()[-1])["result"]


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

        # SIGKILL: capture stays, nothing listens — a captured connect is dropped, never delivered
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)  # lab_up started the agent from this process
        server = lab.pod("n1p2")
        marker = f"PLAINTEXT-MARKER-{uuid.uuid4().hex}"
        with PacketCapture(node.netns, server.node_ifname) as to_server:
            outcome = probe(lab, "n1p1", server.ip, 7200, marker)
        assert outcome in ("timeout", "ECONNREFUSED"), f"{chosen} after SIGKILL: the connect was {outcome}"
        segments = to_server.tcp_segments()
        assert not any(7200 in (s.sport, s.dport) for s in segments), "a packet reached the server around the dead agent"
        assert not any(marker.encode() in s.payload for s in segments)
        assert leftovers(node.netns), "the crash removed the capture"
        labops.lab_restart_agent(name, "node1")
        again = lab.run_client("n1p1", f"{server.ip}:7200", 5000, "digest", name="cm-after")
        assert again["complete"] and again["reply"].split()[0] == again["sent_sha256"], again
        assert lab.wait_flow(1, lambda f: f.get("source_port") == again["local"][1])["security"] == "mutual_tls"

        pid = labops.lab_status(name)["nodes"][0]["agent"]["pid"]
        os.kill(pid, signal.SIGTERM)
        _, status = os.waitpid(pid, 0)  # lab_up started the agent from this process
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"agent exit status {status:#x}"
        assert leftovers(node.netns) == []
    finally:
        if lab is not None:
            lab.stop_apps()
        labops.lab_down(name)
