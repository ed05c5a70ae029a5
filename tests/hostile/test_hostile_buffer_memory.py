"""Attack: a workload whose server never reads makes the destination agent hold every stream's window in
user space (issue #15 item 3).

Each tcpmesh/2 stream may carry 4 MiB before the sender needs credit; a receiver that never reads leaves
those bytes in the destination agent's memory. About 130 such streams exhausted a 512 MiB agent; then
the kernel killed it and every pod of that node failed closed. Here node 2's agent runs in a memory
cgroup limited to 256 MiB (cgroup v2 ``memory.max``; on a hybrid host the v1 memory controller's
``memory.limit_in_bytes``), a pod on node 1 opens 2,000 connections to a pod on node 2 whose server
accepts and never reads and writes to all of them as fast as it can, while another pod (another
identity) runs a steady request/response exchange through the same two agents. Now the agent keeps a
node-wide budget of buffered bytes derived from that limit, shrinks windows under pressure and stalls
the identity that exceeds its share: the agent lives, its RSS stays under the budget plus a fixed
margin, and the other pod keeps at least half its unloaded exchange rate (a ratio measured in the same
test, before and during the attack).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from agent.host import checks
from agent.lab import lab as labops
from agent.lab.agents import DEFAULT_AGENT_ARGV
from tests.conftest import skip_or_fail
from tests.hostile.conftest import running_lab

SINK_PORT = 7441
ECHO_PORT = 7442
STREAMS = 2000
LIMIT = 256 * 1024 * 1024
RSS_MARGIN = 160 * 1024 * 1024  # the agent's own footprint: interpreter, 2,000 connections' objects, TLS
MEASURE_SECONDS = 7.0

# The server that never reads: accept, keep the socket, read nothing (small receive buffer, so the
# kernel holds little and the bytes pile up where the attack wants them: in the agent).
SINK = r"""
import socket, sys, time
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
srv.bind(("0.0.0.0", int(sys.argv[1]))); srv.listen(4096)
print("listening", flush=True)
held = []
while True:
    held.append(srv.accept()[0])
"""

# The attacker: open STREAMS connections to the sink and write to every one as fast as they take it.
ATTACKER = r"""
import json, os, resource, selectors, socket, sys, time
host, port, count, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
sel = selectors.DefaultSelector()
opened = failed = 0
for _ in range(count):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
    s.settimeout(10)
    try:
        s.connect((host, port))
    except OSError:
        failed += 1
        s.close()
        continue
    s.setblocking(False)
    sel.register(s, selectors.EVENT_WRITE)
    opened += 1
print(json.dumps({"phase": "opened", "opened": opened}), flush=True)
block = os.urandom(256 * 1024)
sent = 0
end = time.monotonic() + seconds
while time.monotonic() < end:
    for key, _ in sel.select(timeout=0.2):
        try:
            sent += key.fileobj.send(block)
        except BlockingIOError:
            pass
        except OSError:
            sel.unregister(key.fileobj)
print(json.dumps({"phase": "done", "opened": opened, "failed": failed, "sent": sent,
                  "open_at_end": len(sel.get_map())}), flush=True)
"""

# The other pod: request/response over a connection re-made every 50 exchanges; one count per window.
CLIENT = r"""
import json, socket, sys, time
host, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
ok = failed = 0
end = time.monotonic() + seconds
s = None
n = 0
while time.monotonic() < end:
    try:
        if s is None or n >= 50:
            if s is not None:
                s.close()
            s = socket.create_connection((host, port), timeout=5); s.settimeout(5); n = 0
        s.sendall(b"q" * 64)
        got = b""
        while len(got) < 64:
            chunk = s.recv(64 - len(got))
            if not chunk:
                raise OSError("closed early")
            got += chunk
        ok += 1; n += 1
    except OSError:
        failed += 1; s = None; time.sleep(0.05)
print(json.dumps({"ok": ok, "failed": failed, "rate": ok / seconds}))
"""

# The agent's launcher on a hybrid host: join the v1 memory cgroup, then become the agent.
JOIN_V1 = "import os, sys; open(sys.argv[1], 'w').write(str(os.getpid())); os.execv(sys.argv[2], sys.argv[2:])"


def v1_memory_root() -> Path | None:
    """This process's cgroup in the v1 memory hierarchy (hybrid hosts), where a child can be made."""
    mount = Path("/sys/fs/cgroup/memory")
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            here = mount / path.lstrip("/")
            return here if (here / "memory.limit_in_bytes").exists() else None
    return None


@contextlib.contextmanager
def memory_limited_agent(lab, node_name: str, limit: int):
    """Restart ``node_name``'s agent with its memory limited to ``limit`` bytes (v2 ``memory.max`` on the
    node's agent cgroup when the memory controller is there, else a v1 memory cgroup of its own)."""
    node = lab.plan.node(node_name)
    v2 = Path(node.agent_cgroup)
    made: Path | None = None
    if "memory" in (v2 / "cgroup.controllers").read_text().split():
        (v2 / "memory.max").write_text(str(limit))
        argv = None
    else:
        root = v1_memory_root()
        if root is None:
            skip_or_fail("no memory controller for the agent: cgroup v2 without `memory` in the lab's "
                         "cgroup.controllers and no writable v1 memory hierarchy")
        made = root / f"tcpmesh-budget-{uuid.uuid4().hex[:8]}"
        made.mkdir()
        (made / "memory.limit_in_bytes").write_text(str(limit))
        argv = [sys.executable, "-c", JOIN_V1, str(made / "cgroup.procs"), *DEFAULT_AGENT_ARGV]
    record = None
    try:
        record = labops.lab_restart_agent(lab.name, node_name, agent_argv=argv)
        yield
    finally:
        if made is not None:  # the agent (started here: its argv is the launcher's) leaves the cgroup first
            if record is not None:
                stop_process(record.pid)
            lab.stop_apps()
            labops.lab_down(lab.name)
            for _ in range(50):
                try:
                    made.rmdir()
                    break
                except OSError:
                    time.sleep(0.1)


def stop_process(pid: int, timeout: float = 10.0) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
        try:
            if Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
                break
        except OSError:
            break
        time.sleep(0.1)
    else:
        if Path(f"/proc/{pid}").exists():
            os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def budget_lab(bpf_capable):
    with running_lab("bm", "bm.tcpmesh", pods_per_node=2) as lab:
        # the nodes' TCP buffers stay small, so the shared machine's kernel memory stays small too: the
        # attack is about what the agent holds in user space
        for index in (1, 2):
            for knob in ("tcp_wmem", "tcp_rmem"):
                subprocess.run(["ip", "netns", "exec", lab.node(index).netns, "sysctl", "-q", "-w",
                                f"net.ipv4.{knob}=4096 65536 262144"], check=True)
        with memory_limited_agent(lab, "node2", LIMIT):
            yield lab


def agent_pid(lab, node: str = "node2") -> int:
    return json.loads(Path(lab.plan.state_file).read_text())["agents"][node]["pid"]


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def metric(lab, index: int, name: str) -> float | None:
    """A metric's value, or None when it is missing or the agent does not answer (killed)."""
    try:
        text = lab.metrics_text(index)
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


def exchange_rate(lab, seconds: float) -> dict:
    client = labops.lab_exec(lab.name, "n1p2", [sys.executable, "-c", CLIENT, lab.pod("n2p2").ip, str(ECHO_PORT),
                                                str(seconds)], stdout=subprocess.PIPE, text=True)
    return json.loads(client.communicate(timeout=seconds + 60)[0].strip().splitlines()[-1])


def test_streams_whose_reader_never_reads_stall_alone_and_the_agent_lives(budget_lab, record_property):
    lab = budget_lab
    sink = labops.lab_exec(lab.name, "n2p1", [sys.executable, "-c", SINK, str(SINK_PORT)],
                           stdout=subprocess.PIPE, text=True)
    lab.apps.append(sink)
    assert "listening" in sink.stdout.readline()
    lab.start_server("n2p2", ECHO_PORT, "echo")
    pid = agent_pid(lab)
    budget = metric(lab, 2, "tcpmesh_buffer_budget_bytes")
    unloaded = exchange_rate(lab, MEASURE_SECONDS)
    rss_before = rss(pid)

    attack_seconds = 3 * MEASURE_SECONDS + 30
    attacker = labops.lab_exec(lab.name, "n1p1", [sys.executable, "-c", ATTACKER, lab.pod("n2p1").ip,
                                                  str(SINK_PORT), str(STREAMS), str(attack_seconds)],
                               stdout=subprocess.PIPE, text=True)
    lab.apps.append(attacker)
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.2):
            try:
                peak[0] = max(peak[0], rss(pid))
            except OSError:
                return

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        opened = json.loads(attacker.stdout.readline())
        time.sleep(MEASURE_SECONDS)  # the windows fill
        alive_mid = os.path.exists(f"/proc/{pid}")
        watched = {"agent2": pid, "agent1": agent_pid(lab, "node1"), "attacker": attacker.pid}
        cpu_before = {name: cpu_seconds(p) for name, p in watched.items()}
        # two windows, the better one counts: other sessions' load on this shared machine swings the
        # rate by more than the attack should (both windows lie before the dialling side's 30 s
        # tunnel timeout would end the stalled tunnel)
        loaded = max((exchange_rate(lab, MEASURE_SECONDS) for _ in range(2)), key=lambda r: r["rate"])
        cpu_during = {name: round(cpu_seconds(p) - cpu_before[name], 2) for name, p in watched.items()}
        rss_agent1 = rss(watched["agent1"])
        buffered = metric(lab, 2, "tcpmesh_buffered_bytes") if alive_mid else None
        pressure = metric(lab, 2, "tcpmesh_buffer_stalls_total") if alive_mid else None
        done = json.loads(attacker.communicate(timeout=attack_seconds + 60)[0].strip().splitlines()[-1])
    finally:
        stop.set()
        sampler.join(timeout=5)
        if attacker.poll() is None:
            attacker.kill()
            attacker.wait()
    alive = os.path.exists(f"/proc/{pid}") and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    # the attacker is gone: what was held for it goes back to the budget (its stalled tunnel was given up
    # by the dialling side's TCP_USER_TIMEOUT, or ends with its streams now)
    deadline = time.monotonic() + 40
    after = metric(lab, 2, "tcpmesh_buffered_bytes") if alive else None
    while alive and after is not None and after > 1024 * 1024 and time.monotonic() < deadline:
        time.sleep(1)
        after = metric(lab, 2, "tcpmesh_buffered_bytes")
    figures = {"opened": opened, "attack": done, "unloaded": unloaded, "loaded": loaded,
               "ratio": round(loaded["rate"] / unloaded["rate"], 3) if unloaded["rate"] else None,
               "budget_bytes": budget, "buffered_bytes": buffered, "pressure": pressure,
               "rss_before_mib": round(rss_before / 2**20, 1), "rss_peak_mib": round(peak[0] / 2**20, 1),
               "agent_alive": alive, "buffered_after_attack": after,
               "cpu_s_while_measuring": cpu_during, "rss_agent1_mib": round(rss_agent1 / 2**20, 1)}
    record_property("figures", json.dumps(figures))
    print("FIGURES", json.dumps(figures))
    assert opened["opened"] >= STREAMS * 0.95, f"the attack did not happen: {figures}"
    assert done["sent"] > 256 * 1024 * 1024, f"the attack moved too little to matter: {figures}"
    assert alive, f"node 2's agent died under the attack (OOM-killed?): {figures}"
    assert budget is not None and 0 < budget <= LIMIT // 2, figures
    assert peak[0] < budget + RSS_MARGIN, f"agent RSS above the budget plus {RSS_MARGIN >> 20} MiB: {figures}"
    assert pressure is not None and pressure > 0, figures
    assert buffered is not None and 0 < buffered <= budget + 2 * 1024 * 1024, figures
    assert after is not None and after <= 1024 * 1024, f"bytes still held after the attack ended: {figures}"
    assert unloaded["ok"] > 50, figures
    assert loaded["rate"] >= 0.5 * unloaded["rate"], f"the other pod slowed below half its rate: {figures}"
