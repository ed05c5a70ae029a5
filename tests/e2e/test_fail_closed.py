"""Fail closed across agent deaths, on a 2-node lab with one pod per node and real agents:

- the agent carries no LLVM/bcc (the loader process compiled and pinned) and stays small;
- a pod connecting over and over while its agent is SIGKILLed: nothing to the destination leaves
  node1 in plaintext, connects are refused during the gap, and work again once the agent is back
  (the restarted agent adopts the pinned set: nothing is compiled);
- a pod cgroup the agent does not know, below the node's pods cgroup, gets EPERM and is counted.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from agent.capture.pinned import read_counters
from agent.lab import lab as labops
from agent.lab.nsenter import popen_in
from agent.lab.sniff import PacketCapture

ECHO_PORT = 7301
AGENT_RSS_BOUND_KB = 90 * 1024  # measured ~60 MB (docs/capture-connect.md, "Measured"); bcc + LLVM alone would be ~125 MB

LOOP_CLIENT = r"""
import json, select, socket, sys, time
ip, port, marker = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode()
print("started", flush=True)
results = []
while not select.select([0], [], [], 0)[0]:
    started = time.time()
    s = socket.socket()
    s.settimeout(2)
    try:
        s.connect((ip, port))
        s.sendall(marker)
        got = b""
        while len(got) < len(marker):
            chunk = s.recv(len(marker) - len(got))
            if not chunk:
                break
            got += chunk
        results.append([started, "ok" if got == marker else "short"])
    except OSError as exc:
        results.append([started, exc.errno or str(exc)])
    finally:
        s.close()
    time.sleep(0.02)
print(json.dumps(results), flush=True)
"""


@pytest.fixture(scope="module")
def lab(bpf_capable):
    name = f"fc{uuid.uuid4().hex[:6]}"
    apps: list[subprocess.Popen] = []
    try:
        plan = labops.lab_up(name, 2, 1, "fc.tcpmesh")
        server = labops.lab_exec(name, "n2p1", [sys.executable, "-m", "agent.demo.sampleapps", "server", "--port",
                                                str(ECHO_PORT), "--mode", "echo"], stdout=subprocess.PIPE, text=True)
        apps.append(server)
        assert "listening" in server.stdout.readline()
        yield name, plan
    finally:
        for proc in apps:
            proc.terminate()
            proc.wait(timeout=5)
        labops.lab_down(name)


def agent_pid(name: str, node: str) -> int:
    return next(n["agent"]["pid"] for n in labops.lab_status(name)["nodes"] if n["name"] == node)


def test_agent_maps_no_llvm_and_stays_small(lab):
    name, plan = lab
    pid = agent_pid(name, "node2")
    maps = open(f"/proc/{pid}/maps").read()
    assert "LLVM" not in maps and "libbcc" not in maps and "clang" not in maps, "the agent mapped bcc/LLVM"
    rss_kb = int(open(f"/proc/{pid}/status").read().split("VmRSS:")[1].split()[0])
    assert rss_kb < AGENT_RSS_BOUND_KB, f"agent RSS {rss_kb} kB exceeds the documented bound"
    assert "loaded a new set" in open(plan.node("node2").log_file).read()


def test_sigkill_fails_closed_and_a_restart_recovers(lab):
    name, plan = lab
    node1, server = plan.node("node1"), plan.pod("n2p1")
    marker = f"PLAINTEXT-MARKER-{uuid.uuid4().hex}"
    with PacketCapture(node1.netns, node1.wire_ifname) as wire:
        client = labops.lab_exec(name, "n1p1", [sys.executable, "-c", LOOP_CLIENT, server.ip, str(ECHO_PORT), marker],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert client.stdout.readline().strip() == "started"
            time.sleep(1.0)
            pid = agent_pid(name, "node1")
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)  # lab_up started it from this process
            killed = time.time()
            time.sleep(1.5)
            restarting = time.time()
            labops.lab_restart_agent(name, "node1")
            ready = time.time()
            time.sleep(1.0)
            out, _ = client.communicate("stop\n", timeout=30)
        finally:
            if client.poll() is None:
                client.kill()
                client.wait()
    attempts = json.loads(out.strip().splitlines()[-1])
    before = [r for t, r in attempts if t < killed - 0.5]
    gap = [r for t, r in attempts if killed + 0.1 < t < restarting]
    after = [r for t, r in attempts if t > ready + 0.3]
    assert before and set(before) == {"ok"}, before
    assert len(gap) >= 10 and set(gap) == {errno.ECONNREFUSED}, gap
    assert after and set(after) == {"ok"}, after
    assert errno.EPERM not in {r for _, r in attempts}, "a captured pod must never meet the guard"

    segments = wire.tcp_segments()
    assert any(s.dport == 15008 for s in segments), "no tunnel traffic seen on node1's wire"
    assert not any(marker.encode() in s.payload for s in segments), "the marker crossed the wire in plaintext"
    assert not any(ECHO_PORT in (s.sport, s.dport) for s in segments), "a segment to the plaintext port left node1"
    log = open(node1.log_file).read()
    assert log.count("adopted the pinned set") == 1, "the restarted agent must reuse the pinned set"


def test_a_pod_cgroup_the_agent_does_not_know_is_refused_and_counted(lab):
    name, plan = lab
    node1, server = plan.node("node1"), plan.pod("n2p1")
    intruder = os.path.join(node1.pods_cgroup, f"intruder{uuid.uuid4().hex[:4]}")
    os.mkdir(intruder)
    try:
        before = read_counters(node1.bpffs_dir)["guard_denied"]
        probe = (f"import socket\ns = socket.socket(); s.settimeout(3)\ntry:\n"
                 f"    s.connect(('{server.ip}', {ECHO_PORT})); print('connected')\n"
                 f"except OSError as e:\n    print(e.errno)")
        proc = popen_in([sys.executable, "-c", probe], netns=plan.pod("n1p1").netns, cgroup=intruder,
                        stdout=subprocess.PIPE, text=True)
        out = proc.communicate(timeout=15)[0].strip()
        assert out == str(errno.EPERM), f"an unknown pod cgroup must get EPERM, got {out!r}"
        assert read_counters(node1.bpffs_dir)["guard_denied"] == before + 1
    finally:
        os.rmdir(intruder)
