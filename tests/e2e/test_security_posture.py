"""Security posture of a running agent, on a 2-node lab (docs/security.md):

- the admin HTTP endpoint binds to localhost when the config does not say otherwise (the lab's
  configs set the wire address so tests can reach it; here one agent runs from a copy without it);
- the admin socket is mode 0600 and refuses an unprivileged user;
- hostile input at the inbound port from another node (plaintext, random bytes, TLS 1.2 only, no
  client certificate, a handshake that never finishes) is refused, counted by response_flags, and a
  legitimate flow on the same agent carries on untouched; a connection that never sends is reset on
  both sides after proxy.stream_idle_timeout_seconds (SI);
- the tunnel's TLS posture as a real client sees it (`openssl s_client` at node2's inbound port):
  TLS 1.3 only, an AEAD suite, an elliptic-curve key exchange (finite-field groups refused), no
  session ticket (every tunnel a full handshake with a certificate check);
- no key material anywhere an operator or a scraper can read: agent logs (including the output of a
  failed start and of a failed key reload), access logs, /metrics, /debug/flows, /debug/certs,
  `tcpmesh flows` — no PEM markers and no piece of the node intermediate's or the root's key.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from agent.config import DEFAULT_ADMIN_ADDRESS, Config
from agent.identity.node_ca import NODE_KEY_FILE
from agent.lab import agents as lab_agents
from agent.lab import files as lab_files
from agent.lab import lab as labops
from agent.lab.nsenter import http_get_in_netns, popen_in
from tests.e2e.reliability_lab import figures, reliability_lab, wait_until

HANDSHAKE_TIMEOUT = 1.0
STREAM_IDLE = 3.0
ENV = {"TCPMESH_PROXY_HANDSHAKE_TIMEOUT_SECONDS": str(HANDSHAKE_TIMEOUT),
       "TCPMESH_PROXY_STREAM_IDLE_TIMEOUT_SECONDS": str(STREAM_IDLE)}
SYSTEMD_CONFIG = Path(__file__).parents[2] / "systemd" / "config.yaml"

HOSTILE = r"""
import json, os, socket, ssl, sys, time
host, port = sys.argv[1], int(sys.argv[2])
out = {}
def closed(sock, limit=10):
    sock.settimeout(limit)
    started = time.monotonic()
    try:
        while sock.recv(4096):
            pass
    except OSError:
        pass
    return round(time.monotonic() - started, 2)
def raw(payload):
    s = socket.create_connection((host, port), timeout=5)
    s.sendall(payload)
    return closed(s)
def tls(context):
    s = socket.create_connection((host, port), timeout=5)
    try:
        t = context.wrap_socket(s, server_hostname="n2p1.lab.id.sec.tcpmesh")
        t.sendall(b"x")
        return closed(t)
    except (ssl.SSLError, OSError) as exc:
        return type(exc).__name__
out["plaintext"] = raw(b"GET / HTTP/1.1\r\n\r\n")
out["random"] = raw(os.urandom(2048))
out["slowloris"] = raw(b"\x16\x03\x01\x02\x00\x01")
c = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT); c.check_hostname = False; c.verify_mode = ssl.CERT_NONE
c.maximum_version = ssl.TLSVersion.TLSv1_2
out["tls12"] = tls(c)
c = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT); c.check_hostname = False; c.verify_mode = ssl.CERT_NONE
c.set_alpn_protocols(["tcpmesh/2"])
out["no-certificate"] = tls(c)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def lab(bpf_capable):
    with reliability_lab("sec", env=ENV, identity="node_ca") as lab:  # node.key reload and start failures below
        lab.start_server()
        yield lab


def test_admin_http_defaults_to_localhost():
    assert Config().admin.address == DEFAULT_ADMIN_ADDRESS == "127.0.0.1"
    assert yaml.safe_load(SYSTEMD_CONFIG.read_text())["admin"]["address"] == "127.0.0.1"


def test_an_agent_without_admin_address_listens_for_admin_on_localhost_only(lab, tmp_path):
    node = lab.node(2)
    config = yaml.safe_load(Path(node.config_file).read_text())
    del config["admin"]["address"]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    plan, state = labops.load_lab(lab.name)
    record = lab_agents.AgentRecord.from_json(state["agents"]["node2"])
    lab_agents.stop_agents({"node2": record})
    with open(tmp_path / "agent.log", "wb") as log:
        agent = popen_in([sys.executable, "-m", "agent", "run", "--config", str(path)], netns=node.netns,
                         cgroup=node.agent_cgroup, stdout=log, stderr=subprocess.STDOUT)
    try:
        ready = wait_until(lambda: _status(node.netns, "http://127.0.0.1:15020/readyz") == 200, 30)
        assert ready, (tmp_path / "agent.log").read_text()
        listening = subprocess.run(["ip", "netns", "exec", node.netns, "ss", "-Htln"], capture_output=True,
                                   text=True, check=True).stdout
        admin = [line.split()[3] for line in listening.splitlines() if line.split()[3].endswith(":15020")]
        assert admin == ["127.0.0.1:15020"], listening
        assert _status(node.netns, f"http://{node.wire_address}:15020/readyz") is None  # not on the wire
    finally:
        agent.terminate()
        agent.wait(timeout=20)
        lab.restart_agent(2)


def _status(netns: str, url: str) -> int | None:
    try:
        return http_get_in_netns(netns, url, timeout=1.0)[0]
    except OSError:
        return None


def test_the_admin_socket_is_0600_and_refuses_other_users(lab):
    path = Path(lab.node(1).state_dir) / "agent.sock"
    mode = path.stat().st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600, oct(mode)

    child = os.fork()
    if child == 0:  # as nobody: connect, exit with the errno (0: connected)
        code = 99
        try:
            os.setgid(65534)
            os.setuid(65534)
            with socket.socket(socket.AF_UNIX) as sock:
                sock.connect(str(path))
            code = 0
        except OSError as exc:
            code = exc.errno or 98
        finally:
            os._exit(code)
    _, status = os.waitpid(child, 0)
    assert os.WEXITSTATUS(status) == 13, f"an unprivileged user got {os.WEXITSTATUS(status)} (0: connected)"  # EACCES


def test_hostile_input_from_another_node_is_refused_counted_and_others_are_served(lab):
    client = lab.client("stream", "--interval", "0.05")
    assert "connected" in client.stdout.readline()
    before = {flag: lab.metric_sum(2, "tcpmesh_tcp_connections_failed_total", response_flags=flag)
              for flag in ("TLS_FAILURE", "HANDSHAKE_TIMEOUT")}
    node2 = lab.node(2)
    hostile = labops.lab_exec(lab.name, "node1", [sys.executable, "-c", HOSTILE, node2.wire_address, "15008"],
                              stdout=subprocess.PIPE, text=True)
    out, _ = hostile.communicate(timeout=60)
    times = json.loads(out.strip().splitlines()[-1])
    client.stdin.close()
    result = json.loads(client.stdout.read().strip().splitlines()[-1])
    client.wait(timeout=10)
    assert result["error"] is None and result["exchanges"] > 10, result  # the legitimate flow never noticed
    for case in ("plaintext", "random", "slowloris"):
        assert isinstance(times[case], float) and times[case] < HANDSHAKE_TIMEOUT + 2, times
    assert times["slowloris"] >= HANDSHAKE_TIMEOUT - 0.2, times
    after = {flag: wait_until(lambda: lab.metric_sum(2, "tcpmesh_tcp_connections_failed_total",
                                                     response_flags=flag) - before[flag], 5)
             for flag in before}
    figures("hostile input from another node", cut_off_after_s=times, counted=after,
            legitimate_flow_exchanges=result["exchanges"])
    assert after["TLS_FAILURE"] >= 4 and after["HANDSHAKE_TIMEOUT"] >= 1, (after, times)


def test_a_connection_that_never_sends_is_reset_after_the_stream_idle_timeout(lab):
    started = time.time()
    result = lab.run("idle", "--timeout", str(STREAM_IDLE + 10))
    figures("idle stream", ended=result, stream_idle_timeout_s=STREAM_IDLE)
    assert result["result"] in ("eof", "ConnectionResetError(104)"), result
    assert STREAM_IDLE - 0.1 <= result["seconds"] <= STREAM_IDLE * 1.25 + 2, result  # swept every timeout/4
    # whichever node's sweep comes first records SI; the other gets its RST, reason included (DC)
    flows = [lab.wait_flow(index, lambda f: f["start_time"] > started and f["response_flags"] in ("SI", "DC"))
             for index in (1, 2)]
    assert "SI" in {f["response_flags"] for f in flows}, flows
    assert all("proxy.stream_idle_timeout_seconds" in f["detail"] for f in flows), flows


def _secrets(lab) -> list[str]:
    """Pieces of every private key the lab holds on disk: the node intermediates', the root's and the
    audit chain's."""
    keys = [Path(lab_files.node_ca_dir(node), NODE_KEY_FILE) for node in lab.plan.nodes]
    keys += list(Path(lab.plan.ca_dir).glob("*.key"))
    pieces = []
    for key in keys:
        body = "".join(key.read_text().splitlines()[1:-1])
        pieces += [body[i:i + 24] for i in range(0, len(body) - 24, 24)]
    for node in lab.plan.nodes:  # the audit chain's HMAC keys: "<id> <64 hex digits>" lines, created 0600
        audit_key = Path(lab_files.audit_key_path(node))
        assert stat.S_IMODE(audit_key.stat().st_mode) == 0o600, audit_key
        for line in audit_key.read_text().splitlines():
            secret = line.split()[1]
            pieces += [secret[i:i + 24] for i in range(0, len(secret) - 24, 20)]
    assert len(pieces) > 10
    return pieces


def test_a_key_that_cannot_be_loaded_is_reported_without_its_content(lab, tmp_path):
    node = lab.node(2)
    key = Path(lab_files.node_ca_dir(node), NODE_KEY_FILE)
    saved = tmp_path / "node.key"
    shutil.copy2(key, saved)
    body = key.read_text().splitlines()
    corrupted = "\n".join(body[:2] + [body[2][::-1]] + body[3:]) + "\n"
    try:
        key.write_text(corrupted)  # the running agent's rotator notices the change and refuses it
        assert wait_until(lambda: "cannot be used" in lab.log(2), 10), lab.log(2)[-2000:]
        plan, state = labops.load_lab(lab.name)
        lab_agents.stop_agents({"node2": lab_agents.AgentRecord.from_json(state["agents"]["node2"])})
        failed = popen_in([sys.executable, "-m", "agent", "run", "--config", node.config_file], netns=node.netns,
                          cgroup=node.agent_cgroup, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        output, _ = failed.communicate(timeout=60)
        assert failed.returncode != 0 and "node.key" in output, output
        (tmp_path / "failed-start.txt").write_text(output)
    finally:
        shutil.copy2(saved, key)
        lab.restart_agent(2)
    for piece in _secrets(lab):
        assert piece not in output
    assert "PRIVATE KEY" not in output and "-----BEGIN" not in output


def test_no_key_material_in_logs_metrics_debug_endpoints_or_access_logs(lab, tmp_path):
    """Runs last in this module: by now both agents have served, refused, failed to reload a key and
    failed to start; every place an operator or a scraper reads is searched."""
    assert lab.run("crr", "--count", "20", "--parallel", "2")["completed"] == 20
    texts = {}
    for index in (1, 2):
        node = lab.node(index)
        texts[f"node{index} log"] = lab.log(index)
        texts[f"node{index} access log"] = Path(lab_files.access_log_path(node)).read_text(errors="replace")
        for path in ("/metrics", "/debug/flows", "/debug/certs"):
            texts[f"node{index} {path}"] = lab.get(index, path)
        texts[f"node{index} tcpmesh flows"] = _admin_socket(Path(node.state_dir) / "agent.sock", {"op": "flows.list"})
        for leftover in Path(node.state_dir).glob("*.json"):
            texts[f"node{index} {leftover.name}"] = leftover.read_text()
    pieces = _secrets(lab)
    for where, text in texts.items():
        assert text, f"{where} is empty: the search would prove nothing"
        assert "PRIVATE KEY" not in text and "-----BEGIN" not in text, where
        leaked = [piece for piece in pieces if piece in text]
        assert not leaked, f"key material in {where}"


def _admin_socket(path: Path, request: dict) -> str:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(json.dumps(request).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return data.decode()


AEAD_SUITES = {"TLS_AES_256_GCM_SHA384", "TLS_AES_128_GCM_SHA256", "TLS_CHACHA20_POLY1305_SHA256"}


def s_client(lab, tmp_path: Path, *args: str) -> str:
    """`openssl s_client` from node1's netns at node2's inbound port, as the mesh identity of n1p1
    (a leaf from the lab's root); its whole output. It stays until the agent closes the idle tunnel."""
    from agent.identity.ca import load_ca
    from agent.identity.issue import issue_svid
    from agent.identity.spiffe import SpiffeId
    from tests.conftest import require_binary

    openssl = require_binary("openssl", "openssl")
    root = load_ca(lab.plan.ca_dir)
    svid = issue_svid(root, SpiffeId.parse(lab.pod("n1p1").spiffe_id), 600)
    (tmp_path / "leaf.pem").write_text(svid.cert_pem + "".join(svid.chain_pem))
    (tmp_path / "leaf.key").write_text(svid.key_pem)
    (tmp_path / "root.pem").write_text(root.cert_pem)
    node2 = lab.node(2)
    argv = ["ip", "netns", "exec", lab.node(1).netns, openssl, "s_client", "-connect",
            f"{node2.wire_address}:15008", "-servername", SpiffeId.parse(lab.pod("n2p1").spiffe_id).sni,
            "-alpn", "tcpmesh/2", "-cert", str(tmp_path / "leaf.pem"), "-key", str(tmp_path / "leaf.key"),
            "-CAfile", str(tmp_path / "root.pem"), "-ign_eof", *args]
    done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
    return done.stdout + done.stderr


def test_the_tunnel_tls_posture_seen_by_openssl_s_client(lab, tmp_path):
    full = s_client(lab, tmp_path)
    assert "New, TLSv1.3, Cipher is " in full and "Verify return code: 0 (ok)" in full, full
    suite = full.split("Cipher is ", 1)[1].split()[0]
    assert suite in AEAD_SUITES, suite
    key = full.split("Server Temp Key: ", 1)[1].splitlines()[0]
    assert key.startswith(("X25519", "X448", "ECDH")), key
    assert "New Session Ticket" not in full and "TLS session ticket" not in full, "the agent issued a session ticket"
    for refused, args in (("TLS 1.2", ("-tls1_2",)), ("a finite-field group", ("-groups", "ffdhe2048:ffdhe3072")),
                          ("a non-default suite", ("-ciphersuites", "TLS_AES_128_CCM_8_SHA256"))):
        out = s_client(lab, tmp_path, *args)
        assert "Cipher is (NONE)" in out and "alert" in out, f"{refused} accepted:\n{out}"
