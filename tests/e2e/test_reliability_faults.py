"""Faults on a 2-node lab with real agents (ebpf-connect), configured through the environment with
short deadlines: proxy.tunnel_timeout_seconds 4, proxy.connect_timeout_seconds 3.

- the destination pod does not listen: the client is refused at once, UF on both sides;
- the destination node's agent is SIGKILLed mid-flow: the client's connection is reset (the kernel
  closes the dead agent's tunnel), well within the tunnel timeout; after a restart flows work again;
- the wire between the nodes is cut mid-flow (the bridge port of node2 set down in the lab's wire
  netns: no FIN, no RST, nothing): the flow is reset after about the tunnel timeout — on both nodes —
  instead of hanging for the kernel's ~15 minutes; new connections meanwhile fail within the connect
  timeout; once the wire is back, new connections work with the same agents (no restart);
- the access log's disk is full, then read-only: proxying continues, each failed write is counted
  and the error logged, nothing blocks; once writable again the log resumes with a gap record.

The source node's agent SIGKILLed (no plaintext leaves the node meanwhile, capture resumes on
restart) is tests/e2e/test_fail_closed.py::test_sigkill_fails_closed_and_a_restart_recovers.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from agent.audit.keys import read_keys
from agent.audit.verify import verify_files
from agent.lab.files import audit_key_path
from tests.e2e.reliability_lab import ECHO_PORT, figures, reliability_lab, wait_until

TUNNEL_TIMEOUT = 4.0
CONNECT_TIMEOUT = 3.0
ENV = {"TCPMESH_PROXY_TUNNEL_TIMEOUT_SECONDS": str(TUNNEL_TIMEOUT),
       "TCPMESH_PROXY_CONNECT_TIMEOUT_SECONDS": str(CONNECT_TIMEOUT)}
SLACK = 3.0  # keepalive/user-timeout granularity and scheduling on a shared 2-core machine


@pytest.fixture(scope="module")
def lab(bpf_capable):
    with reliability_lab("ft", env=ENV) as lab:
        lab.start_server()
        assert lab.run("probe")["result"] == "ok"
        yield lab


def start_stream(lab) -> subprocess.Popen:
    client = lab.client("stream", "--interval", "0.05")
    assert "connected" in client.stdout.readline()
    time.sleep(0.5)  # some exchanges through the tunnel
    return client


def stream_result(client: subprocess.Popen, timeout: float) -> dict:
    """The stream client's end (it ends by itself when its connection fails), or a failure saying it hung."""
    try:
        client.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        client.kill()
        client.communicate()
        raise AssertionError(f"the application's connection was still open {timeout:.0f}s after the fault")
    return json.loads(client.stdout.read().strip().splitlines()[-1])


def test_a_destination_that_does_not_listen_is_refused_at_once_with_uf_on_both_sides(lab):
    closed_port = 7999
    result = lab.run("probe", port=closed_port)
    figures("not listening", refused_after_s=result["seconds"], client=result["result"])
    assert result["result"].startswith("ConnectionResetError") and result["seconds"] < 1.0, result
    src = lab.wait_flow(1, lambda f: f["destination_port"] == closed_port)
    dst = lab.wait_flow(2, lambda f: f["destination_port"] == closed_port)
    figures("not listening, records", source=(src["response_flags"], src["detail"]),
            destination=(dst["response_flags"], dst["detail"]))
    assert src["response_flags"] == dst["response_flags"] == "UF", (src, dst)
    assert "UNREACHABLE" in src["detail"] and "refused" in dst["detail"].lower(), (src["detail"], dst["detail"])
    assert lab.metric_sum(1, "tcpmesh_tcp_connections_failed_total", response_flags="UF") >= 1
    assert lab.metric_sum(2, "tcpmesh_tcp_connections_failed_total", response_flags="UF") >= 1


def test_the_destination_agent_killed_mid_flow_resets_the_client_promptly(lab):
    began = time.time()
    client = start_stream(lab)
    pid = lab.agent_pid(2)
    os.kill(pid, signal.SIGKILL)
    killed = time.time()
    os.waitpid(pid, 0)  # lab up started it from this process
    try:
        result = stream_result(client, TUNNEL_TIMEOUT + SLACK + 10)
    finally:
        lab.restart_agent(2)
    figures("destination agent killed", reset_after_s=round(result["failed_at"] - killed, 3), client=result["error"])
    assert result["error"] and result["exchanges"] > 0, result
    assert result["failed_at"] - killed < TUNNEL_TIMEOUT, result  # the dead agent's kernel closed the tunnel
    src = lab.wait_flow(1, lambda f: f["destination_port"] == ECHO_PORT and f["response_flags"] == "DC"
                        and f["start_time"] > began)
    assert "tunnel" in src["detail"], src
    assert lab.run("probe")["result"] == "ok"


def test_a_cut_wire_times_flows_out_as_configured_and_the_mesh_recovers_without_restart(lab):
    pids = (lab.agent_pid(1), lab.agent_pid(2))
    wire, port = lab.plan.wire_netns, lab.node(2).bridge_port
    began = time.time()
    client = start_stream(lab)
    failed_before = lab.metric_sum(2, "tcpmesh_tcp_connections_failed_total", response_flags="DC")
    subprocess.run(["ip", "-n", wire, "link", "set", port, "down"], check=True)
    cut = time.time()
    try:
        result = stream_result(client, TUNNEL_TIMEOUT + SLACK + 30)
        during = lab.run("probe", "--timeout", "30")  # a new connection while the wire is still cut
    finally:
        subprocess.run(["ip", "-n", wire, "link", "set", port, "up"], check=True)
    took = result["failed_at"] - cut
    restored = time.time()
    back = wait_until(lambda: lab.run("probe", "--timeout", "10")["result"] == "ok", 20)
    first_ok = round(time.time() - restored, 3)
    assert result["error"] and TUNNEL_TIMEOUT - 1 <= took <= TUNNEL_TIMEOUT + SLACK, (took, result)
    assert during["result"] != "ok" and during["result"] != "hung" and during["seconds"] <= CONNECT_TIMEOUT + SLACK, \
        during
    src = lab.wait_flow(1, lambda f: f["destination_port"] == ECHO_PORT and f["response_flags"] == "DC"
                        and began < f["start_time"] < cut)
    assert "tunnel lost" in src["detail"], src
    figures("wire cut", reset_after_s=round(took, 3), client=result["error"], new_connection_during_cut=during,
            first_ok_after_restore_s=first_ok, tunnel_timeout_s=TUNNEL_TIMEOUT, source_detail=src["detail"])
    # node2 saw nothing either: its side of the tunnel times out too, and it resets the server's connection
    assert wait_until(lambda: lab.metric_sum(2, "tcpmesh_tcp_connections_failed_total", response_flags="DC")
                      > failed_before, TUNNEL_TIMEOUT + SLACK + 5)
    refused = lab.wait_flow(1, lambda f: f["start_time"] > cut and f["response_flags"] in ("UT", "UF"))
    assert "10.76.0.2:15008" in refused["detail"], refused
    figures("wire cut, new connection", flag=refused["response_flags"], detail=refused["detail"])
    assert back, "no connection worked within 20 s of restoring the wire"
    assert (lab.agent_pid(1), lab.agent_pid(2)) == pids  # the same agents: nothing was restarted


@pytest.fixture
def small_disk():
    directory = tempfile.mkdtemp(prefix="tcpmesh-accesslog-")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", directory], check=True)
    try:
        yield Path(directory)
    finally:
        subprocess.run(["umount", "-l", directory], check=False)
        os.rmdir(directory)


def test_a_full_or_read_only_access_log_disk_never_blocks_the_data_path(lab, small_disk):
    log_path = small_disk / "access.log"
    lab.env["TCPMESH_ACCESS_LOG_PATH"] = str(log_path)
    lab.restart_agent(2)
    try:
        assert lab.run("crr", "--count", "20", "--parallel", "2")["completed"] == 20
        filler = small_disk / "filler"
        try:
            with open(filler, "wb") as f:  # fill the disk
                while True:
                    f.write(b"\0" * 4096)
                    f.flush()
        except OSError:
            pass
        full = lab.run("crr", "--count", "300", "--parallel", "10")
        errors_full = wait_until(lambda: lab.metric_sum(2, "tcpmesh_access_log_write_errors_total"), 5)
        subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
        read_only = lab.run("crr", "--count", "300", "--parallel", "10")
        subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
        filler.unlink()
        time.sleep(0.5)
        errors = lab.metric_sum(2, "tcpmesh_access_log_write_errors_total")
        dropped = lab.metric_sum(2, "tcpmesh_access_log_dropped_records_total", reason="write_error")
        after = lab.run("crr", "--count", "20", "--parallel", "2")
        figures("access log disk", full=full["completed"], read_only=read_only["completed"], write_errors=errors,
                dropped=dropped, rate_full=full["rate"], rate_read_only=read_only["rate"])
        assert full["completed"] == 300 and read_only["completed"] == 300 and after["completed"] == 20, \
            (full, read_only, after)
        assert errors_full >= 1 and errors > errors_full and dropped >= 300, (errors_full, errors, dropped)
        assert "write failed" in lab.log(2) and "the data path continues" in lab.log(2)
        gap = wait_until(lambda: [json.loads(line) for line in log_path.read_text().splitlines()
                                  if '"event":"gap"' in line.replace(" ", "")], 5)
        assert gap and gap[-1]["dropped"] >= 300, gap
        report = verify_files([str(log_path)], read_keys(audit_key_path(lab.node(2))))
        assert report.ok, report
    finally:
        del lab.env["TCPMESH_ACCESS_LOG_PATH"]
        lab.restart_agent(2)
