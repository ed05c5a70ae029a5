"""`lab down` and `tcpmesh demo` leave nothing behind: no namespace, veth, cgroup, attached BPF
program, agent process or state directory — checked by listing each of them."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

from agent.lab import lab as labops


def bpf_cgroup_attachments(path: str) -> str:
    out = subprocess.run(["bpftool", "cgroup", "tree", os.path.dirname(path)], capture_output=True, text=True)
    return "\n".join(line for line in out.stdout.splitlines() if os.path.basename(path) in line)


def leftovers(name: str, plan) -> list[str]:
    found = []
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    found += [f"netns {line.split()[0]}" for line in netns.splitlines() if line.startswith(f"tcpmesh-{name}-")]
    if os.path.exists(plan.cgroup):
        found.append(f"cgroup {plan.cgroup}")
    if bpf_cgroup_attachments(plan.cgroup):
        found.append(f"bpf attachments {bpf_cgroup_attachments(plan.cgroup)}")
    if os.path.exists(plan.state_dir):
        found.append(f"state dir {plan.state_dir}")
    return found


def agent_pids_alive(status: dict) -> list[int]:
    return [n["agent"]["pid"] for n in status["nodes"] if n["agent"]["alive"]]


def test_lab_down_removes_every_object_including_attached_bpf_programs(bpf_capable):
    name = f"td{uuid.uuid4().hex[:6]}"
    try:
        plan = labops.lab_up(name, 2, 1, "td.tcpmesh")
        status = labops.lab_status(name)
        pids = agent_pids_alive(status)
        assert len(pids) == 2
        attached = subprocess.run(["bpftool", "cgroup", "show", plan.pods[0].cgroup],
                                  capture_output=True, text=True).stdout
        assert "cgroup_inet4_connect" in attached and "tcpmesh" in attached, f"capture is not attached to {plan.pods[0].cgroup}: {attached!r}"
    finally:
        labops.lab_down(name)
    assert leftovers(name, plan) == []
    assert not [pid for pid in pids if os.path.exists(f"/proc/{pid}")]
    for node in plan.nodes:  # veths lived in the namespaces; make sure none leaked into ours
        links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
        assert f"tm{node.name}" not in links


def test_demo_runs_end_to_end_and_cleans_up(bpf_capable):
    out = subprocess.run([sys.executable, "-m", "agent", "demo"], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    assert "mutual_tls" in text
    assert "spiffe://demo.tcpmesh/ns/lab/sa/web" in text and "spiffe://demo.tcpmesh/ns/lab/sa/db" in text
    assert "web-frontend" in text and "nightly-batch" in text  # client commands from the BPF hook
    opened = [line for line in text.splitlines() if line.startswith("tcpmesh_tcp_connections_opened_total{")]
    assert any('reporter="source"' in line and 'source_workload="n1p1"' in line for line in opened)
    assert any('reporter="destination"' in line and 'source_workload="n1p1"' in line for line in opened)
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "tcpmesh-demo-" not in netns
    assert not os.path.exists("/run/tcpmesh-lab/demo")


def test_sigterm_detaches_capture_and_exits_zero(bpf_capable):
    import signal

    name = f"st{uuid.uuid4().hex[:6]}"
    try:
        plan = labops.lab_up(name, 1, 1, "st.tcpmesh")
        pid = labops.lab_status(name)["nodes"][0]["agent"]["pid"]
        pod_cgroup = plan.pods[0].cgroup
        show = lambda: subprocess.run(["bpftool", "cgroup", "show", pod_cgroup],  # noqa: E731
                                      capture_output=True, text=True).stdout
        assert "cgroup_inet4_connect" in show()
        os.kill(pid, signal.SIGTERM)
        _, status = os.waitpid(pid, 0)  # lab_up started the agent from this process
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"agent exit status {status:#x}"
        assert "tcpmesh" not in show(), "capture programs still attached after an orderly stop"
        log = open(plan.nodes[0].log_file).read()
        assert "agent stopped" in log
    finally:
        labops.lab_down(name)
