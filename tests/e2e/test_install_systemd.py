"""systemd/tcpmesh-agent.service and `make install`.

- `systemd-analyze verify` accepts the unit (with /usr/local/bin/tcpmesh present, as after `make
  install`), and `systemd-analyze security --offline` rates it no worse than 5.0 ("OK");
- the unit's exact ExecStart line, run in the unit's own sandbox (test_install_support.py says what
  is emulated and what is not) inside a lab node, sends READY=1 from the main PID only once the
  pod's BPF programs are attached, the listeners accept and /readyz answers 200; a pod's connection
  is meshed (mutual_tls) under that sandbox; SIGTERM gives STOPPING=1 and exit 0; the unit's exact
  ExecStopPost line then keeps capture in place (no systemd to ask for the job: fail closed);
- `make install` (systemd/install.sh, staged with DESTDIR) lays out the link, the unit, the config
  and /etc/default/tcpmesh, and keeps an edited config on a second run;
- it builds the compiled data path where gcc and Python's headers are (as on this machine) and says so;
  where the build fails it warns on stderr, naming the pure-Python fallback and the fix, and with
  REQUIRE_COMPILED=1 it stops before installing the unit.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from agent.lab import lab as labops
from agent.lab.nsenter import connect_in_netns, http_get_in_netns
from tests.e2e import test_install_support as unitrun

READY_TIMEOUT = 60.0


def bpftool_programs(cgroup: str) -> str:
    return subprocess.run(["bpftool", "cgroup", "show", cgroup], capture_output=True, text=True, check=True).stdout


def verify_with_installed_bin(unit_path: str, *extra: str) -> subprocess.CompletedProcess:
    """`systemd-analyze <extra or verify> UNIT` where /usr/local/bin/tcpmesh exists (private mount namespace)."""
    script = (f"mount -t tmpfs tmpfs /usr/local/bin && ln -s {unitrun.CHECKOUT_BIN} /usr/local/bin/tcpmesh && "
              f"exec systemd-analyze {' '.join(extra) or 'verify'} {unit_path}")
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                          capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def analyze(privileged):
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze is missing: deploy/bootstrap-debian.sh installs the systemd package")


def test_systemd_analyze_verify_accepts_the_unit(analyze):
    done = verify_with_installed_bin(str(unitrun.UNIT_FILE))
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr + done.stdout


def test_systemd_analyze_security_rates_the_unit_ok(analyze):
    done = verify_with_installed_bin(str(unitrun.UNIT_FILE), "security", "--offline=yes", "--no-pager")
    match = re.search(r"Overall exposure level for tcpmesh-agent.service: ([0-9.]+)", done.stdout)
    assert match, done.stdout + done.stderr
    assert float(match.group(1)) <= 5.0, done.stdout


def test_the_unit_says_what_the_issue_asks():
    service = unitrun.read_unit()["Service"]
    assert service["Type"] == ["notify"] and service["Restart"] == ["on-failure"]
    assert service["NoNewPrivileges"] == ["yes"] and service["ProtectSystem"] == ["strict"]
    # bpffs: only tcpmesh's own directory (the default capture.bpffs_dir's parent), never the whole mount
    assert set(service["ReadWritePaths"][0].split()) == {"-/sys/fs/bpf/tcpmesh", "/sys/fs/cgroup"}
    assert service["RuntimeDirectory"] == ["tcpmesh"]          # /run/tcpmesh, writable under ProtectSystem
    assert set(service["CapabilityBoundingSet"][0].split()) <= {"CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN",
                                                                "CAP_SYS_ADMIN", "CAP_NET_RAW", "CAP_DAC_OVERRIDE"}
    assert service["ExecStopPost"][0].split()[:2] == ["/usr/local/bin/tcpmesh", "cleanup"]


@pytest.fixture
def node_lab(bpf_capable):
    name = f"sd{uuid.uuid4().hex[:6]}"
    plan = None
    try:
        plan = labops.lab_up(name, 1, 2, "sd.tcpmesh", agents_enabled=False, capture_mode="ebpf-connect")
        yield plan
    finally:
        labops.lab_down(name)


def test_exec_start_in_the_units_sandbox_notifies_ready_only_when_capture_and_listeners_are_up(node_lab):
    plan = node_lab
    node = plan.nodes[0]
    unit = unitrun.read_unit()
    env = unitrun.unit_environment(unit, {"TCPMESH_CONFIG_FILE": node.config_file})
    argv = unitrun.command_argv(unit, "ExecStart", env)
    assert argv == ["/usr/local/bin/tcpmesh", "run", "--config", node.config_file]
    notify = unitrun.NotifySocket(f"{plan.state_dir}/notify.sock")
    log_path = f"{plan.state_dir}/agent-under-unit.log"
    proc = None
    apps = []
    try:
        # RuntimeDirectory= and LogsDirectory= stand-in: the lab node's state dir (config, log, socket)
        # capture.bpffs_dir is the lab's, outside /sys/fs/bpf/tcpmesh: writable as the documented drop-in makes it
        os.makedirs(node.bpffs_dir, exist_ok=True)
        proc = unitrun.start_in_node(unitrun.sandboxed(unit, argv, [node.state_dir, node.bpffs_dir]), node.netns,
                                     node.agent_cgroup,
                                     {**env, "NOTIFY_SOCKET": notify.path}, log_path)
        try:
            message, sender, _ = notify.receive_ready(READY_TIMEOUT, alive=lambda: proc.poll() is None)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; its log:\n{open(log_path).read()[-4000:]}") from None
        log = open(log_path).read()
        # at READY: programs on the pod cgroups, listeners accepting, /readyz 200 — checked before anything else
        for pod in node.pods:
            assert "tcpmesh_conn4" in bpftool_programs(pod.cgroup), f"{pod.name} not captured at READY\n{log}"
        listening = subprocess.run(["ip", "netns", "exec", node.netns, "ss", "-Hltn"], capture_output=True,
                                   text=True, check=True).stdout
        assert ":15001 " in listening and ":15008 " in listening, listening
        connect_in_netns(node.netns, (node.wire_address, 15008), timeout=2).close()
        status, _ = http_get_in_netns(node.netns, f"http://{node.admin_address}/readyz")
        assert status == 200
        assert message.split(b"\n")[0] == b"READY=1" and b"STATUS=ready: 2 local workloads captured" in message
        assert sender == proc.pid, "systemd (NotifyAccess=main) accepts READY from the main PID only"

        # the sandbox really was the unit's
        status = unitrun.process_status(proc.pid)
        assert int(status["CapBnd"], 16) == unitrun.capability_mask(unit) == int(status["CapEff"], 16)
        assert status["NoNewPrivs"].strip() == "1"
        assert "ro" in unitrun.mount_options(proc.pid, "/").split(",")
        # as systemd does it (seen in the vm tier): the bpffs mount read-only, only the pin directory writable
        assert "ro" in unitrun.mount_options(proc.pid, "/sys/fs/bpf").split(",")
        assert "rw" in unitrun.mount_options(proc.pid, node.bpffs_dir).split(",")
        assert os.readlink(f"/proc/{proc.pid}/exe") == os.path.realpath(sys.executable)

        # and the mesh works under it: pod → pod through the agent, mutual TLS — READY=1 came once the lab's
        # issuer (the default identity mode) had signed the pods' SVIDs
        server, client = node.pods[1], node.pods[0]
        apps.append(labops.lab_exec(plan.name, server.name, [sys.executable, "-m", "agent.demo.sampleapps", "server",
                                                             "--port", "7301", "--mode", "digest"],
                                    stdout=subprocess.PIPE, text=True))
        assert "listening" in apps[0].stdout.readline()
        done = labops.lab_exec(plan.name, client.name, [sys.executable, "-m", "agent.demo.sampleapps", "client", "--connect",
                                                         f"{server.ip}:7301", "--bytes", "4096", "--mode", "digest"],
                               stdout=subprocess.PIPE, text=True)
        result = json.loads(done.communicate(timeout=30)[0].strip().splitlines()[-1])
        assert result["complete"], result
        flows = json.loads(http_get_in_netns(node.netns, f"http://{node.admin_address}/debug/flows")[1])["flows"]
        assert any(f["destination_port"] == 7301 and f["security"] == "mutual_tls" for f in flows)

        # SIGTERM (systemctl stop): STOPPING=1, exit 0
        proc.terminate()
        message, _ = notify.receive(20)
        assert message.startswith(b"STOPPING=1")
        assert proc.wait(30) == 0, open(log_path).read()

        # the unit's ExecStopPost line, same sandbox: without systemd to ask, capture stays (fail closed)
        stop_post = unitrun.command_argv(unit, "ExecStopPost", env)
        assert stop_post == ["/usr/local/bin/tcpmesh", "cleanup", "--config", node.config_file,
                             "--systemd-stop-post", "tcpmesh-agent.service"]
        post = unitrun.start_in_node(unitrun.sandboxed(unit, stop_post, [node.state_dir, node.bpffs_dir]), node.netns,
                                     node.agent_cgroup, env, log_path)
        assert post.wait(30) == 0
        assert "capture stays attached" in open(log_path).read()
        assert "tcpmesh_conn4" in bpftool_programs(node.pods[0].cgroup)
    finally:
        for app in apps:
            unitrun.stop(app, 5)
        if proc is not None:
            unitrun.stop(proc)
        notify.close()


# The mount shape systemd gives the unit's ExecStopPost (seen in a Debian 12 VM): /sys/fs/bpf read-only,
# only the default pin root (ReadWritePaths=-/sys/fs/bpf/tcpmesh) a writable bind mount of itself. Built
# on a tmpfs in a private mount namespace, never on the host's bpffs.
STOP_POST_MOUNTS = r"""
import ctypes, json, os, sys
from agent.host.cleanup import CleanupReport, remove_pins
base = sys.argv[1]
libc = ctypes.CDLL(None, use_errno=True)
MS_RDONLY, MS_REMOUNT, MS_BIND = 1, 32, 4096
def mount(source, target, fstype, flags):
    if libc.mount(source and source.encode(), target.encode(), fstype and fstype.encode(), flags, None) != 0:
        raise OSError(ctypes.get_errno(), f"mount {target}")
mount("tmpfs", base, "tmpfs", 0)
root = f"{base}/tcpmesh"
os.makedirs(f"{root}/node1/maps-v2-x")
open(f"{root}/node1/maps-v2-x/tcpmesh_counters", "w").close()
mount(root, root, None, MS_BIND)
mount(None, base, None, MS_REMOUNT | MS_BIND | MS_RDONLY)
report = CleanupReport()
remove_pins(f"{root}/node1", report, default_root=root)
print(json.dumps({"removed": report.removed, "notes": report.notes, "problems": report.problems,
                  "left": sorted(os.listdir(root))}))
"""


def test_cleanup_under_the_units_mounts_keeps_the_read_only_pin_root_and_exits_clean(privileged, tmp_path):
    """`systemctl stop` ended the unit 'failed': its ExecStopPost cleanup crashed with EROFS removing
    /sys/fs/bpf/tcpmesh, the unit's own writable mount in a read-only /sys/fs/bpf (found in the vm tier)."""
    base = tmp_path / "bpf"
    base.mkdir()
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable, "-c", STOP_POST_MOUNTS,
                           str(base)], capture_output=True, text=True, timeout=60, cwd=str(unitrun.REPO))
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["problems"] == [] and report["left"] == [], report
    assert f"unpinned {base}/tcpmesh/node1/maps-v2-x/tcpmesh_counters" in report["removed"], report
    assert len(report["notes"]) == 1 and "kept the empty" in report["notes"][0] and "Read-only" in report["notes"][0], report


def test_make_install_stages_link_unit_and_config_and_keeps_an_edited_config(tmp_path, analyze):
    root = tmp_path / "root"
    env = {**os.environ, "DESTDIR": str(root), "VENV": os.path.dirname(os.path.dirname(unitrun.CHECKOUT_BIN)),
           "INSTALL_APT": "0"}
    done = subprocess.run(["make", "-s", "install"], cwd=unitrun.REPO, env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr + done.stdout
    assert "install: tunnel data path: compiled (agent.proxy._hotpath, " in done.stdout, done.stdout
    assert os.readlink(root / "usr/local/bin/tcpmesh") == unitrun.CHECKOUT_BIN
    unit = root / "etc/systemd/system/tcpmesh-agent.service"
    assert unit.read_text() == unitrun.UNIT_FILE.read_text()
    assert (root / "etc/tcpmesh/config.yaml").read_text() == (unitrun.REPO / "systemd/config.yaml").read_text()
    assert (root / "etc/default/tcpmesh").exists() and (root / "etc/tcpmesh/policies").is_dir()
    assert (root / "opt/tcpmesh/share/doc/install-systemd.md").exists()
    # docs/install-systemd.md's next step copies the root CA to .../node-credential/bundle.pem: the directory
    # must exist, root-only (seen failing: scp answered "No such file or directory")
    for directory in ("var/lib/tcpmesh", "var/lib/tcpmesh/node-credential"):
        assert (root / directory).is_dir() and stat.S_IMODE((root / directory).stat().st_mode) == 0o700, directory
    version = subprocess.run([str(root / "usr/local/bin/tcpmesh"), "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and "tcpmesh" in version.stdout
    assert verify_with_installed_bin(str(unit)).returncode == 0

    (root / "etc/tcpmesh/config.yaml").write_text("# edited\n")
    again = subprocess.run(["make", "-s", "install"], cwd=unitrun.REPO, env=env, capture_output=True, text=True,
                           timeout=60)
    assert again.returncode == 0 and "kept" in again.stdout
    assert (root / "etc/tcpmesh/config.yaml").read_text() == "# edited\n"


def test_make_install_builds_a_venv_that_finds_its_bpf_sources_and_bcc(tmp_path, analyze):
    """The real PREFIX path (venv, bcc link, own source copy, editable install) with --no-deps,
    so only tcpmesh itself is installed; its dependencies are a network install on a real host."""
    root = tmp_path / "root"
    env = {**os.environ, "DESTDIR": str(root), "INSTALL_APT": "0", "PYTHON": sys.executable,
           "PIP_ARGS": "--no-deps"}
    env.pop("VENV", None)
    done = subprocess.run(["make", "-s", "install"], cwd=unitrun.REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr + done.stdout
    python = root / "opt/tcpmesh/bin/python"
    probe = ("import agent.bpf.sources as b, agent.bpf.kstub as k, bcc; "
             "print(b.bpf_dir()); print(k.shipped_dir()); print(bcc.__file__)")
    out = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stderr
    bpf_dir, kstub_dir, bcc_file = out.stdout.split()
    assert bpf_dir == str(root / "opt/tcpmesh/src/bpf") and any(Path(bpf_dir).glob("*.c"))
    assert Path(kstub_dir).is_dir() and os.path.realpath(bcc_file).startswith("/usr/lib/python3/dist-packages/bcc")
    assert os.readlink(root / "usr/local/bin/tcpmesh") == "/opt/tcpmesh/bin/tcpmesh"
    assert (root / "opt/tcpmesh/bin/tcpmesh").exists()
    # pip built the install's own compiled data path (gcc and python3-dev are here), and the install said so
    built = list((root / "opt/tcpmesh/src/agent/proxy").glob("_hotpath*.so"))
    assert len(built) == 1, done.stdout
    assert f"install: tunnel data path: compiled (agent.proxy._hotpath, {built[0]})" in done.stdout, done.stdout
    assert "WARNING" not in done.stderr, done.stderr


def test_make_install_without_a_working_compiler_warns_of_the_pure_python_data_path(tmp_path, analyze):
    """A node where pip cannot build agent/proxy/_hotpath.c (CC=false: the compiler fails, as a missing gcc or
    Python.h does): the install goes on and says, last and on stderr, that the agent runs the pure-Python
    fallback and how to get the compiled one; REQUIRE_COMPILED=1 makes it an error before the unit is installed."""
    root = tmp_path / "root"
    env = {**os.environ, "DESTDIR": str(root), "INSTALL_APT": "0", "PYTHON": sys.executable,
           "PIP_ARGS": "--no-deps", "CC": "false"}
    env.pop("VENV", None)
    done = subprocess.run(["make", "-s", "install"], cwd=unitrun.REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr + done.stdout
    assert not list((root / "opt/tcpmesh/src/agent/proxy").glob("_hotpath*.so"))
    assert "tunnel data path: compiled" not in done.stdout
    warning = done.stderr
    assert "WARNING: tunnel data path: pure Python (agent.proxy._hotpath not built" in warning, warning
    assert "PURE-PYTHON FALLBACK" in warning and "the build failed" in warning, warning
    assert "Fix: apt-get install gcc python3-dev; make install again" in warning, warning
    # the installed agent's own line (what `tcpmesh doctor` shows) names the same fix, not a checkout's
    assert "`make install` again from a tcpmesh checkout (it rebuilds " in warning, warning
    assert "make setup" not in warning, warning
    assert (root / "etc/systemd/system/tcpmesh-agent.service").exists()

    strict = subprocess.run(["make", "-s", "install"], cwd=unitrun.REPO, env={**env, "DESTDIR": str(tmp_path / "strict"),
                            "REQUIRE_COMPILED": "1"}, capture_output=True, text=True, timeout=120)
    assert strict.returncode != 0 and "REQUIRE_COMPILED=1: stopped before the unit" in strict.stderr, strict.stderr
    assert not (tmp_path / "strict/etc/systemd/system/tcpmesh-agent.service").exists()
