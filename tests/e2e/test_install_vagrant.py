"""vagrant/: the Vagrantfile parses (`ruby -c`; Vagrant itself is not packaged for Debian 12), and
the provisioning script's steps run on this machine with lab node namespaces in place of the two VMs,
then vagrant/e2e.sh passes against them.

The same scripts, the same commands: provision.sh's steps install (`make install`, staged under a
per-node root, linking this venv), pods (netns + veth + cgroup per demo pod, routes between nodes),
identity (node1 creates the root, the issuer's directory and a one-time join token per node, and
hands node2 its token and the trust bundle over the lab's wire with vagrant/join_handoff.py), config
(config, issuer config, registry, DENY policy, the tcpmesh-demo helper). Their step "start" is
`systemctl enable --now`; here the test plays systemd instead: node1's issuer, then each node's agent,
are started from the *installed* units' ExecStart lines in the units' sandboxes
(test_install_support.py) and must send READY=1; the agents join the issuer with their tokens. Then
vagrant/e2e.sh runs unchanged, reaching the nodes with nsenter instead of `vagrant ssh`. No node's
files hold a CA key (node1's issuer and root directories are the demo's third role on that VM).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from agent.lab import lab as labops
from agent.lab import nsenter
from agent.lab.topology import lab_bpffs_dir
from tests.e2e import test_install_support as unitrun

REPO = unitrun.REPO
VAGRANT = REPO / "vagrant"


def test_ruby_accepts_the_vagrantfile():
    ruby = shutil.which("ruby")
    if ruby is None:
        pytest.fail("ruby is missing: deploy/bootstrap-debian.sh installs it")
    done = subprocess.run([ruby, "-c", str(VAGRANT / "Vagrantfile")], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "Syntax OK", done.stderr
    text = (VAGRANT / "Vagrantfile").read_text()
    assert 'path: "provision.sh"' in text and (VAGRANT / "provision.sh").exists()
    assert '"debian/bookworm64"' in text and "private_network" in text


def run_step(node, env: dict[str, str], log: Path) -> None:
    with open(log, "ab") as out:
        proc = nsenter.popen_in(["bash", str(VAGRANT / "provision.sh")], netns=node.netns,
                                env={**os.environ, **env}, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT)
        code = proc.wait(120)
    assert code == 0, f"provision.sh on {node.name} failed:\n{log.read_text()[-3000:]}"


@pytest.fixture
def two_node_lab(bpf_capable):
    name = f"vg{uuid.uuid4().hex[:6]}"
    try:
        # the bare network: no lab CA and no lab issuer (provision.sh makes this demo's own)
        yield labops.lab_up(name, 2, 0, "vg.tcpmesh", agents_enabled=False, identity="node_ca")
    finally:
        labops.lab_down(name)


def test_provisioning_steps_on_lab_nodes_then_e2e_sh_passes(two_node_lab):
    plan = two_node_lab
    roots = Path(plan.state_dir) / "roots"         # not under /tmp: the unit's PrivateTmp would hide it
    log = Path(plan.state_dir) / "provision.log"
    nodes = " ".join(f"{n.name}={n.wire_address}" for n in plan.nodes)
    token = secrets.token_hex(16)
    agents, notify = [], []
    handoff_pid = roots / "node1/var/lib/tcpmesh-admin/handoff.pid"
    issuer = issuer_notify = None
    try:
        for node in plan.nodes:
            run_step(node, {"STEPS": "install pods identity config", "NODE_INDEX": str(node.index), "NODES": nodes,
                            "CA_TOKEN": token, "TCPMESH_ROOT": str(roots / node.name),
                            "NETNS_PREFIX": f"tcpmesh-{plan.name}-", "CGROUP_ROOT": plan.cgroup_root,
                            "CGROUP_BASE": node.cgroup, "BPFFS_DIR": f"{lab_bpffs_dir(plan.name)}/{node.name}",
                            "VENV": sys.prefix, "INSTALL_APT": "0", "HANDOFF_TIMEOUT": "60"}, log)
        text = log.read_text()
        assert "provision node1: pod n1p2" in text and "node2's join token and trust bundle installed" in text, text
        assert (roots / "node2/etc/tcpmesh/join-token").stat().st_mode & 0o777 == 0o600
        assert not (roots / "node2/var/lib/tcpmesh-admin").exists(), "the root CA must stay on node1"
        assert not (roots / "node2/etc/tcpmesh/issuer").exists(), "the issuer's key must stay on node1"

        # node1's third role: the issuer, from the installed tcpmesh-issuer.service, in its sandbox
        node1, root1 = plan.nodes[0], roots / plan.nodes[0].name
        unit = unitrun.read_unit(root1 / "etc/systemd/system/tcpmesh-issuer.service")
        env = unitrun.unit_environment(unit, {"TCPMESH_ISSUER_CONFIG": str(root1 / "etc/tcpmesh/issuer.yaml")})
        (root1 / "run").mkdir(parents=True, exist_ok=True)
        sock = issuer_notify = unitrun.NotifySocket(str(root1 / "run/issuer-notify.sock"))
        issuer = unitrun.start_in_node(
            unitrun.sandboxed(unit, unitrun.command_argv(unit, "ExecStart", env, "tcpmesh-issuer.service"),
                              [str(root1 / "var/lib/tcpmesh-issuer")]),
            node1.netns, node1.agent_cgroup, {**env, "NOTIFY_SOCKET": sock.path}, str(log))
        try:
            message, sender = sock.receive(60, alive=lambda: issuer.poll() is None)
        except AssertionError as exc:
            raise AssertionError(f"{exc}:\n{log.read_text()[-3000:]}") from None
        assert message.startswith(b"READY=1") and sender == issuer.pid

        # "start": what systemd does with the installed unit — ExecStart, in the unit's sandbox, READY=1
        for node in plan.nodes:
            root = roots / node.name
            unit = unitrun.read_unit(root / "etc/systemd/system/tcpmesh-agent.service")
            env = unitrun.unit_environment(unit, {"TCPMESH_CONFIG_FILE": str(root / "etc/tcpmesh/config.yaml")})
            writable = ("run/tcpmesh", "var/log/tcpmesh", "var/lib/tcpmesh")   # Runtime-, Logs-, StateDirectory=
            for directory in writable:
                (root / directory).mkdir(parents=True, exist_ok=True)
            # BPFFS_DIR is the lab's, outside /sys/fs/bpf/tcpmesh: writable as the documented drop-in makes it
            bpffs = f"{lab_bpffs_dir(plan.name)}/{node.name}"
            os.makedirs(bpffs, exist_ok=True)
            sock = unitrun.NotifySocket(str(root / "run/notify.sock"))
            notify.append(sock)
            proc = unitrun.start_in_node(
                unitrun.sandboxed(unit, unitrun.command_argv(unit, "ExecStart", env),
                                  [*(str(root / directory) for directory in writable), bpffs]),
                node.netns, node.agent_cgroup, {**env, "NOTIFY_SOCKET": sock.path}, str(log))
            agents.append(proc)
        for proc, sock in zip(agents, notify):
            try:
                message, sender, _ = sock.receive_ready(60, alive=lambda p=proc: p.poll() is None)
            except AssertionError as exc:
                raise AssertionError(f"{exc}:\n{log.read_text()[-3000:]}") from None
            assert message.startswith(b"READY=1") and b"2 local workloads captured" in message and sender == proc.pid
        for node in plan.nodes:   # each joined with its one-time token: a node credential that signs nothing
            credential = roots / node.name / "var/lib/tcpmesh/node-credential/credential.crt"
            shown = subprocess.run(["openssl", "x509", "-noout", "-ext", "basicConstraints,extendedKeyUsage,subjectAltName",
                                    "-in", str(credential)], capture_output=True, text=True, check=True).stdout
            assert "CA:FALSE" in shown and f"spiffe://vagrant.tcpmesh/node/{node.name}" in shown, shown
            keys = [p for p in (roots / node.name).rglob("*") if p.is_file() and not p.is_symlink()
                    and p.suffix in (".key", ".pem", "") and b"PRIVATE KEY" in p.read_bytes()[:4096]]
            expected = {roots / node.name / "var/lib/tcpmesh/node-credential/credential.key"}
            if node.index == 1:   # the demo's admin machine and issuer host
                expected |= {roots / "node1/var/lib/tcpmesh-admin/root-ca/ca.key", roots / "node1/etc/tcpmesh/issuer/issuer.key"}
            assert set(keys) == expected, f"{node.name}: private keys {sorted(map(str, keys))}"

        done = subprocess.run(["bash", str(VAGRANT / "e2e.sh")], capture_output=True, text=True, timeout=180,
                              env={**os.environ, "E2E_NETNS_PREFIX": f"tcpmesh-{plan.name}-",
                                   "E2E_ROOTS": str(roots)})
        print(done.stdout)
        assert done.returncode == 0, done.stdout + done.stderr + log.read_text()[-3000:]
        assert done.stdout.strip().splitlines()[-1] == "e2e: 5 passed, 0 failed"
        for words in ("came back intact", "carried TLS", "as source, mutual_tls", "as destination, mutual_tls",
                      "denied by policy"):
            assert words in done.stdout
    finally:
        for proc in agents:
            unitrun.stop(proc)
        if issuer is not None:
            unitrun.stop(issuer)
        if issuer_notify is not None:
            issuer_notify.close()
        for sock in notify:
            sock.close()
        if handoff_pid.exists():   # the hand-off server exits once node2 fetched; if a step failed, end it
            pid = int(handoff_pid.read_text())
            try:
                if b"join_handoff.py" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signal.SIGTERM)
            except (FileNotFoundError, ProcessLookupError):
                pass
