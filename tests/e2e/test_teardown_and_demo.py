"""`lab down`, `tcpmesh cleanup` and `tcpmesh demo` leave nothing behind: no namespace, veth, cgroup,
attached BPF program, pinned object, agent process or state directory — checked by listing each."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

from agent.lab import lab as labops


def bpf_cgroup_attachments(path: str, recursive: bool = False) -> str:
    """`bpftool cgroup tree` lines of ``path`` (and, ``recursive``, of every cgroup below it)."""
    out = subprocess.run(["bpftool", "cgroup", "tree", path if recursive else os.path.dirname(path)],
                         capture_output=True, text=True)
    if recursive:
        return "\n".join(line for line in out.stdout.splitlines()[1:] if "tcpmesh" in line)
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
    if os.path.exists(plan.bpffs_dir):
        found.append(f"pins {sorted(os.listdir(plan.bpffs_dir))} in {plan.bpffs_dir}")
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
        assert "tcpmesh_guard4" in bpf_cgroup_attachments(plan.nodes[0].cgroup, recursive=True)
        assert os.listdir(plan.nodes[0].bpffs_dir), "the agent pinned nothing"
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
    # one screen: flows, a row per identity pair, where to look next; no raw Prometheus lines without --metrics
    lines = text.splitlines()
    assert len(lines) <= 40, text
    assert not [line for line in lines if line.startswith("tcpmesh_")], text
    pairs = {line.split()[0]: line.split() for line in lines if line.startswith("ns/lab/sa/")}
    assert set(pairs) == {"ns/lab/sa/web", "ns/lab/sa/batch"}, text
    web = pairs["ns/lab/sa/web"]
    assert web[1:4] == ["ns/lab/sa/db", "1", "0"] and web[4:6] == ["256", "KiB"] and web[-1] == "mutual_tls", web
    assert web[9] == "ms" and float(web[8]) > 0, web      # the tunnel's RTT p50, from the kernel's sockops
    assert "tcpmesh flows --socket" in text and "/metrics" in text and "deploy/grafana/tcpmesh.json" in text
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "tcpmesh-demo-" not in netns
    assert not os.path.exists("/run/tcpmesh-lab/demo")


def test_sigterm_exits_zero_leaves_capture_closed_and_cleanup_removes_it(bpf_capable):
    """Orderly stop no longer detaches (fail closed): the pod's connects are refused, never sent in
    plaintext, until `tcpmesh cleanup` removes every program and pin of the node. Twice is fine."""
    import errno
    import signal

    name = f"st{uuid.uuid4().hex[:6]}"
    try:
        plan = labops.lab_up(name, 1, 1, "st.tcpmesh")
        node, pod = plan.nodes[0], plan.pods[0]
        pid = labops.lab_status(name)["nodes"][0]["agent"]["pid"]
        show = lambda: subprocess.run(["bpftool", "cgroup", "show", pod.cgroup],  # noqa: E731
                                      capture_output=True, text=True).stdout
        assert "cgroup_inet4_connect" in show()
        os.kill(pid, signal.SIGTERM)
        _, status = os.waitpid(pid, 0)  # lab_up started the agent from this process
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"agent exit status {status:#x}"
        assert "tcpmesh_conn4" in show(), "an orderly stop must leave capture in place (fail closed)"
        assert "agent stopped" in open(node.log_file).read()
        # A mesh destination (only those are captured): the pod's own address, where the probe itself
        # listens, so a connect that escaped capture would say 'connected'.
        probe = ("import socket, sys\nip = sys.argv[1]\n"
                 "l = socket.socket(); l.bind((ip, 7000)); l.listen()\n"
                 "s = socket.socket(); s.settimeout(3)\n"
                 "try:\n    s.connect((ip, 7000)); print('connected')\n"
                 "except OSError as e:\n    print(e.errno)")
        out = labops.lab_exec(name, pod.name, [sys.executable, "-c", probe, pod.ip], stdout=subprocess.PIPE,
                              text=True).communicate(timeout=10)[0].strip()
        assert out == str(errno.ECONNREFUSED), f"a captured connect with no agent must be refused, got {out!r}"

        cleanup = [sys.executable, "-m", "agent", "cleanup", "--config", node.config_file]
        dry = labops.lab_exec(name, node.name, cleanup + ["--dry-run"], stdout=subprocess.PIPE, text=True)
        assert "would detach tcpmesh_conn4" in dry.communicate(timeout=60)[0]
        assert "tcpmesh_conn4" in show(), "--dry-run changed something"
        first = labops.lab_exec(name, node.name, cleanup, stdout=subprocess.PIPE, text=True)
        out = first.communicate(timeout=60)[0]
        assert first.returncode == 0, out
        for expected in ("detached tcpmesh_conn4", "detached tcpmesh_guard4", "detached tcpmesh_sockopt",
                         f"unpinned {node.bpffs_dir}/"):
            assert expected in out, out
        assert bpf_cgroup_attachments(node.cgroup, recursive=True) == ""
        assert not os.path.exists(node.bpffs_dir)
        second = labops.lab_exec(name, node.name, cleanup, stdout=subprocess.PIPE, text=True)
        out = second.communicate(timeout=60)[0]
        assert second.returncode == 0 and "nothing of tcpmesh left to remove" in out, out
    finally:
        labops.lab_down(name)
