"""Two Debian 12 VMs with systemd as PID 1, one private link between them, provisioned by the
Vagrantfile's own script (vagrant/provision.sh, run verbatim with the Vagrantfile's environment;
the checkout is at /vagrant as Vagrant's synced folder puts it). What systemd itself is checked for:

- `systemctl enable --now tcpmesh-agent` (provision.sh's last step) returns only when the agent is
  ready: at that moment /readyz answers 200 on the first try and the status text says so; after a
  `systemctl restart` every local identity holds its SVID at READY=1 (the first `tcpmesh status`);
  the agent runs the compiled data path `make install` built in the VM (its journal says so);
- vagrant/e2e.sh's checks, run on the VMs: bytes intact, TLS on the wire, identities in the metrics,
  a DENY policy;
- PostgreSQL in a pod of VM 2, pgbench from a pod of VM 1 through the mesh while
  `systemctl restart tcpmesh-agent` runs on VM 1: the frames on the link between the VMs (captured on
  the host side, qemu's filter-dump) never carry the SQL in plaintext, and pgbench works again after
  the restart (connections open during the restart end, new ones wait for the new agent); the tunnels run
  kernel TLS (`proxy.kernel_tls: auto` on 6.1: `tcpmesh status` and /proc/net/tls_stat say so);
- reloads (docs/install-systemd.md, after the unit): `systemctl kill -s HUP` leaves the same agent running and
  `tcpmesh status` shows the reload (trigger signal); an edit of /etc/default/tcpmesh then `systemctl reload`
  names the variable and the field as needing `systemctl restart tcpmesh-agent`; the restart, with node1's issuer
  stopped and node2 made to join anew, waits not ready and turns ready by itself once the issuer is back, with
  the edited value in force;
- `systemctl stop` runs `tcpmesh cleanup` (docs/install-systemd.md's table), a restart does not;
  `journalctl -u tcpmesh-agent` shows the documented lines; the unit's hardening directives are
  applied by systemd (the agent runs with exactly its capability bounding set);
- identity (issue #18): node1 also runs the issuer (tcpmesh-issuer.service, Type=notify, started by
  systemd), both agents joined it with a one-time token, and no node's agent holds a key that can sign:
  every private key found on node2, and in node1's agent directories, paired with every certificate
  whose public key it is, signs a forged SVID that the mesh's bundle refuses (tests/vm/try_to_sign.sh);
  on node1 the issuer's own key does sign (the check is not blind).

The VMs are powered off and removed in ``finally`` (tests/vm/conftest.py, machine.py).
"""

from __future__ import annotations

import json
import re
import secrets
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.vm.conftest import CI_KERNEL, checkout_overlay, record, save_log
from tests.vm.machine import Link, Machine, close_all, new_run_dir

pytestmark = [pytest.mark.vm, pytest.mark.vm_ci]   # `make test` / .ci/run: docs/kernels.md, "CI budget"

NODES = {"node1": "192.168.56.11", "node2": "192.168.56.12"}
NODES_ENV = " ".join(f"{name}={address}" for name, address in NODES.items())
WHEELS = "/opt/tcpmesh-wheels"
PG_BIN = "/usr/lib/postgresql/15/bin"
DROPIN = "/etc/systemd/system/tcpmesh-agent.service.d/vm-tier.conf"
TRUST_DOMAIN = "vagrant.tcpmesh"                   # provision.sh's
BUNDLE = "/var/lib/tcpmesh/node-credential/bundle.pem"
# where a node keeps secrets (not /usr: software, whose test suites carry sample keys)
NODE_DIRS = "/etc /var /root /run /home /srv /opt /tmp"
# node1's agent's own files (its config, token, state, run-time and log directories), beside the issuer's
# /etc/tcpmesh/issuer and the root's /var/lib/tcpmesh-admin on the same VM
AGENT_DIRS = "/etc/tcpmesh/config.yaml /etc/tcpmesh/join-token /etc/tcpmesh/policies /var/lib/tcpmesh /run/tcpmesh /var/log/tcpmesh"
PG_POD, PG_IP, PG_DATA = "n2p1", "10.77.2.11", "/var/lib/tcpmesh-vm-pg"
CLIENT_POD = "n1p1"
SQL_MARKERS = (b"pgbench_accounts", b"UPDATE pgbench", b"SELECT abalance")
# the unit's CapabilityBoundingSet, by bit number (linux/capability.h)
CAP_BOUNDING = {"CAP_DAC_OVERRIDE": 1, "CAP_NET_ADMIN": 12, "CAP_NET_RAW": 13, "CAP_SYS_ADMIN": 21,
                "CAP_PERFMON": 38, "CAP_BPF": 39}
# the unit's hardening directives systemd-analyze security rates (docs/install-systemd.md, "Hardening")
HARDENING = ("NoNewPrivileges", "ProtectSystem", "ProtectHome", "PrivateTmp", "ProtectKernelTunables",
             "ProtectKernelLogs", "ProtectClock", "ProtectHostname", "RestrictNamespaces", "RestrictRealtime",
             "RestrictSUIDSGID", "LockPersonality", "SystemCallArchitectures")
# docs/install-systemd.md, "Logs"
# `tcpmesh status --json` on stdin: exit 0 when every local workload's identity has a valid SVID
SVIDS_HELD = ("import json,sys; d=json.load(sys.stdin); h={i[\"spiffe_id\"] for i in d[\"identities\"] "
              "if i[\"state\"]==\"valid\"}; sys.exit(0 if all(w[\"spiffe_id\"] in h for w in d[\"workloads\"]) else 1)")
JOURNAL_START = "agent ready on node "
JOURNAL_JOIN = "joined the issuer as node "
JOURNAL_DATA_PATH = "tunnel data path: compiled (agent.proxy._hotpath, /opt/tcpmesh/src/agent/proxy/_hotpath."
JOURNAL_RESTART = ("stopping: capture stays in place (fail closed)", "restarting (restart job); capture stays attached")
CONFIG = "/etc/tcpmesh/config.yaml"
STATUS = f"tcpmesh status --config {CONFIG}"
# a reload of an edit of the unit's environment file (docs/install-systemd.md, after the unit); put back after
ENV_FILE, ENV_FILE_SAVED = "/etc/default/tcpmesh", "/root/etc-default-tcpmesh.saved"
ENV_EDIT = ("TCPMESH_PROXY_MAX_CONNECTIONS", "20000")      # default 32768; the new agent logs its connection caps
SYSTEMD_RESTART = "systemctl restart tcpmesh-agent"
CREDENTIAL_DIR = "/var/lib/tcpmesh/node-credential"
ISSUER_TOKEN_KEY = "/etc/tcpmesh/issuer/token.key"           # node1 (provision.sh): mints one-time join tokens
JOURNAL_STOP = ("stopped by a stop job", "removing capture: this node's pods now bypass the mesh")


def provision(machine: Machine, index: int, token: str) -> float:
    """vagrant/provision.sh as the Vagrantfile runs it (SRC=/vagrant, NODE_INDEX, NODES, CA_TOKEN);
    PIP_ARGS points `make install`'s pip at the image's wheelhouse: the VMs have no network."""
    started = time.monotonic()
    done = machine.run(f"SRC=/vagrant NODE_INDEX={index} NODES='{NODES_ENV}' CA_TOKEN={token} "
                       f"PIP_ARGS='--no-index --find-links {WHEELS}' bash /vagrant/vagrant/provision.sh",
                       timeout=1200, check=False)
    if done.rc != 0:
        journal = machine.run("systemctl status --no-pager -l tcpmesh-agent; journalctl --no-pager -b -o short-monotonic "
                              "-u tcpmesh-agent | tail -n 80", check=False).stdout
        save_log(f"{machine.name}-provision.log", done.stdout + done.stderr + "\n--- journal\n" + journal)
        done.check()
    seconds = time.monotonic() - started
    record(f"{machine.name}: vagrant/provision.sh (make install ... systemctl enable --now)", seconds)
    for unit in ("tcpmesh-issuer", "tcpmesh-agent") if index == 1 else ("tcpmesh-agent",):
        shown = dict(line.split("=", 1) for line in machine.run(
            f"systemctl show -p InactiveExitTimestampMonotonic,ActiveEnterTimestampMonotonic {unit}").stdout.split())
        started_us, ready_us = int(shown["InactiveExitTimestampMonotonic"]), int(shown["ActiveEnterTimestampMonotonic"])
        record(f"{machine.name}:   of which {unit} start to READY=1 (systemd's timestamps)", (ready_us - started_us) / 1e6)
    return seconds


def readyz_now(machine: Machine) -> str:
    """One GET of /readyz, no retry: it must already be 200 when `systemctl enable --now` returned."""
    return machine.run(["/opt/tcpmesh/bin/python", "-c",
                        "import urllib.request,sys; r=urllib.request.urlopen(sys.argv[1], timeout=5); "
                        "print(r.status)", f"http://{NODES[machine.name]}:15020/readyz"], check=False).stdout.strip()


@pytest.fixture(scope="module")
def nodes(vm_image, checkout_disk):
    run_dir = new_run_dir()
    machines: list[Machine] = []
    link = run_dir / "wire.sock"
    pcap = run_dir / "wire.pcap"
    try:
        for index, (name, address) in enumerate(NODES.items(), start=1):
            machine = Machine(name, vm_image, CI_KERNEL, run_dir, memory_mb=1536,
                              checkout_disk=checkout_overlay(checkout_disk, run_dir, name),
                              link=Link(link, server=index == 1, mac=f"52:54:00:6d:00:0{index}",
                                        pcap=pcap if index == 1 else None))
            machines.append(machine)
            machine.launch()
        for machine, address in zip(machines, NODES.values()):
            machine.wait_ready()
            record(f"{machine.name} ({machine.release}, {machine.accel}): boot to channel", machine.boot_seconds)
            machine.run(f"hostnamectl set-hostname {machine.name} 2>/dev/null || hostname {machine.name}; "
                        f"ip addr add {address}/24 dev eth0 && ip link set eth0 up && "
                        f"mkdir -p /vagrant && mount /dev/vdb /vagrant && "
                        # the one change to the unit, the documented way (a drop-in): its timeouts are for
                        # real machines; software emulation on a loaded host is 10-30x slower — the first
                        # start compiles for 30-90 s (unit: 120 s), and a stop with its ExecStopPost took
                        # 14-29 s at load 6-8 and over the unit's 30 s at load 20-34 (SIGKILL, 'timeout')
                        f"mkdir -p {DROPIN.rsplit('/', 1)[0]} && "
                        f"printf '[Service]\\nTimeoutStartSec=900\\nTimeoutStopSec=300\\n' > {DROPIN}")
        token = secrets.token_hex(16)
        # both at once, as vagrant-libvirt brings VMs up in parallel: node2's identity step waits for
        # node1's hand-off (join_handoff.py fetch retries), its start step for node1's issuer
        started = time.monotonic()
        pool = ThreadPoolExecutor(max_workers=len(machines))
        try:
            futures = {m.name: pool.submit(provision, m, i, token) for i, m in enumerate(machines, start=1)}
            ready_after = {name: future.result() for name, future in futures.items()}
        finally:
            # on a failure or Ctrl-C do not wait for the other VM's provisioning: close_all below powers
            # both off, which ends its channel and so its thread
            pool.shutdown(wait=False, cancel_futures=True)
        record("two VMs: provisioning both, side by side (until both agents are ready)", time.monotonic() - started)
        yield {m.name: m for m in machines}, pcap, ready_after
    finally:
        for machine in machines:
            record(f"{machine.name}: qemu CPU time, boot to power-off (user+sys)", machine.cpu_seconds())
        close_all(machines, run_dir)


def test_enable_now_returns_only_when_the_agent_is_ready(nodes):
    machines, _, _ = nodes
    for machine in machines.values():
        shown = machine.run("systemctl show -p ActiveState,SubState,StatusText,Type tcpmesh-agent").stdout
        unit = dict(line.split("=", 1) for line in shown.splitlines() if "=" in line)
        assert (unit["Type"], unit["ActiveState"], unit["SubState"]) == ("notify", "active", "running"), shown
        assert unit["StatusText"].startswith("ready:") and "(ebpf-connect)" in unit["StatusText"], shown
        assert readyz_now(machine) == "200"
        journal = machine.run("journalctl -u tcpmesh-agent --no-pager -o cat").stdout
        assert f"{JOURNAL_JOIN}{machine.name} with the bootstrap token" in journal, journal[-3000:]
        # the data path `make install` built with the image's gcc and python3-dev, as on a user's Debian 12 node
        assert JOURNAL_DATA_PATH in journal, [line for line in journal.splitlines() if "tunnel data path" in line]
    issuer = machines["node1"].run("systemctl show -p ActiveState,SubState,Type tcpmesh-issuer").stdout
    assert "Type=notify" in issuer and "ActiveState=active" in issuer and "SubState=running" in issuer, issuer
    assert machines["node2"].run("systemctl is-enabled tcpmesh-issuer", check=False).stdout.strip() == "disabled"


def try_to_sign(machine: Machine, dirs: str) -> tuple[int, list[str]]:
    done = machine.run(f"sh /vagrant/tests/vm/try_to_sign.sh {TRUST_DOMAIN} {BUNDLE} {dirs}", check=False, timeout=600)
    lines = done.stdout.strip().splitlines()
    save_log(f"{machine.name}-try-to-sign.txt", done.stdout + done.stderr)
    assert lines and lines[-1].startswith("pairs "), done.stdout + done.stderr
    return done.rc, lines


def test_no_node_agent_holds_a_key_that_can_sign(nodes):
    """An attacker who owns node2 (or node1's agent files) cannot mint an SVID: every key there that has
    a certificate is a node credential or an SVID key (CA:false), and the mesh refuses what it signs."""
    machines, _, _ = nodes
    node1, node2 = machines["node1"], machines["node2"]
    rc, lines = try_to_sign(node2, NODE_DIRS)
    pairs = int(lines[-1].split()[1])
    assert rc == 0 and pairs >= 1, "\n".join(lines)   # at least the node credential was found and tried
    assert any("node-credential/credential.key" in line and "invalid CA certificate" in line for line in lines), lines
    assert node2.run("ls /etc/tcpmesh/issuer /var/lib/tcpmesh-admin /etc/tcpmesh/node-ca 2>&1", check=False).rc != 0
    shown = node2.run("openssl x509 -noout -ext basicConstraints,subjectAltName "
                      "-in /var/lib/tcpmesh/node-credential/credential.crt").stdout
    assert "CA:FALSE" in shown and f"spiffe://{TRUST_DOMAIN}/node/node2" in shown, shown

    rc, lines = try_to_sign(node1, AGENT_DIRS)
    assert rc == 0 and int(lines[-1].split()[1]) >= 1, "\n".join(lines)
    # node1's third role holds what does sign: the check finds it (it is not blind)
    rc, lines = try_to_sign(node1, "/etc/tcpmesh/issuer")
    assert rc == 1 and any(line.startswith("SIGNS: /etc/tcpmesh/issuer/issuer.key") for line in lines), lines


def test_systemd_applies_the_units_hardening(nodes):
    """What systemd itself made of the unit's hardening: the live process's capability bounding set,
    NoNewPrivs, seccomp filters (RestrictAddressFamilies, RestrictNamespaces, SystemCallArchitectures,
    … are seccomp programs), its mount namespace (/ read-only, bpffs read-only but for tcpmesh's own
    directory), and `systemd-analyze security` on the running unit."""
    machines, _, _ = nodes
    node = machines["node1"]
    pid = node.run("systemctl show -p MainPID --value tcpmesh-agent").stdout.strip()
    status = dict(line.split(":", 1) for line in node.run(f"cat /proc/{pid}/status").stdout.splitlines() if ":" in line)
    assert int(status["CapBnd"], 16) == sum(1 << bit for bit in CAP_BOUNDING.values()), f"CapBnd {status['CapBnd']}, want {CAP_BOUNDING}"
    assert status["NoNewPrivs"].strip() == "1", status["NoNewPrivs"]
    assert status["Seccomp"].strip() == "2" and int(status.get("Seccomp_filters", "0")) >= 1, \
        f"no seccomp filter: RestrictAddressFamilies/RestrictNamespaces not applied ({status.get('Seccomp')})"
    mounts = {fields[4]: fields[5] for fields in
              (line.split() for line in node.run(f"cat /proc/{pid}/mountinfo").stdout.splitlines())}
    assert mounts["/"].startswith("ro"), f"ProtectSystem=strict: / is not read-only: {mounts['/']}"
    assert mounts["/sys/fs/bpf"].startswith("ro"), f"/sys/fs/bpf writable for the agent: {mounts['/sys/fs/bpf']}"
    assert mounts["/sys/fs/bpf/tcpmesh"].startswith("rw"), f"tcpmesh's bpffs directory: {mounts.get('/sys/fs/bpf/tcpmesh')}"
    assert mounts["/sys/fs/cgroup"].startswith("rw") and mounts["/sys"].startswith("ro"), mounts

    analyze = node.run("systemd-analyze security --no-pager tcpmesh-agent.service", check=False)
    save_log("node1-systemd-analyze-security.txt", analyze.stdout + analyze.stderr)
    match = re.search(r"Overall exposure level for tcpmesh-agent.service: ([0-9.]+)", analyze.stdout)
    assert match and float(match.group(1)) <= 5.0, analyze.stdout[-3000:]
    record(f"node1: systemd-analyze security (live unit): exposure {match.group(1)}", 0.0)
    unset = [line.strip() for line in analyze.stdout.splitlines()
             if line.strip().startswith("✗") and line.strip()[1:].split()[0].split("=")[0] in HARDENING]
    assert not unset, f"systemd does not apply these hardening directives of the unit: {unset}"


def test_the_vagrant_e2e_checks_pass_across_the_vms(nodes):
    machines, _, _ = nodes
    node1, node2 = machines["node1"], machines["node2"]
    node2.run("tcpmesh-demo serve n2p1 7001 echo && tcpmesh-demo serve n2p2 7004 digest")
    try:
        started = time.monotonic()
        out = [node1.run(f"tcpmesh-demo echo-check n1p1 10.77.2.11 7001 {4 << 20}").stdout,
               node1.run("tcpmesh-demo wire-check n1p1 10.77.2.11 7001").stdout,
               node1.run("tcpmesh-demo metrics-check source n1p1 n2p1").stdout,
               node2.run("tcpmesh-demo metrics-check destination n1p1 n2p1").stdout,
               node1.run("tcpmesh-demo deny-check n1p2 10.77.2.12 7004").stdout]
        record("two VMs: vagrant/e2e.sh's five checks", time.monotonic() - started)
    finally:
        node2.run("tcpmesh-demo stop-servers", check=False)
    assert all(line.startswith("ok") for line in "".join(out).strip().splitlines()), out


def start_postgres(node2: Machine) -> None:
    node2.run(f"install -d -o postgres -m 0700 {PG_DATA} && "
              f"su postgres -s /bin/sh -c '{PG_BIN}/initdb -D {PG_DATA}/data -U postgres -A trust >/dev/null' && "
              # a test world: the mesh authenticates; the inbound proxy's source address is not the pod's
              f"echo 'host all all 0.0.0.0/0 trust' >> {PG_DATA}/data/pg_hba.conf", timeout=300)
    node2.run(f"tcpmesh-demo pod {PG_POD} su postgres -s /bin/sh -c \"{PG_BIN}/pg_ctl -D {PG_DATA}/data -w -t 120 "
              f"-l {PG_DATA}/log -o '-c listen_addresses={PG_IP} -k /tmp' start\" >/dev/null", timeout=300)


def pgbench(node1: Machine, args: str, timeout: float = 300):
    return node1.run(f"tcpmesh-demo pod {CLIENT_POD} {PG_BIN}/pgbench -h {PG_IP} -U postgres {args} postgres",
                     timeout=timeout, check=False)


def test_pgbench_through_the_mesh_across_a_restart_never_shows_plaintext_on_the_link(nodes):
    machines, pcap, _ = nodes
    node1, node2 = machines["node1"], machines["node2"]
    start_postgres(node2)
    init = pgbench(node1, "-i -s 1 -q")
    assert init.rc == 0, init.stderr
    before = pgbench(node1, "-c 2 -T 10")
    assert before.rc == 0 and "number of failed transactions: 0" in before.stdout, before.stdout + before.stderr

    # load in the background: short pgbench runs back to back, each one's exit code and summary logged
    node1.run(f"setsid sh -c 'for i in $(seq 1 200); do "
              f"tcpmesh-demo pod {CLIENT_POD} {PG_BIN}/pgbench -h {PG_IP} -U postgres -c 2 -T 3 postgres "
              f">>/root/load.log 2>&1; echo \"run $i rc $?\" >>/root/load.log; "
              f"[ -e /root/load.stop ] && break; done; touch /root/load.done' </dev/null >/dev/null 2>&1 &")
    time.sleep(8)
    started = time.monotonic()
    node1.run("systemctl restart tcpmesh-agent", timeout=300)     # returns once the new agent is ready
    restart_seconds = time.monotonic() - started
    record("node1: systemctl restart tcpmesh-agent during pgbench (until ready)", restart_seconds)
    # issuer mode: the pods' keys lived in the old agent's memory, so the issuer signs again before READY=1
    # (identity.issuer.first_svid_wait_seconds): every SVID is there at once — measured here (was ≈ 8.4 s)
    started = time.monotonic()
    waited = node1.run(f"for i in $(seq 1 600); do tcpmesh status --json --config /etc/tcpmesh/config.yaml | "
                       f"/opt/tcpmesh/bin/python -c '{SVIDS_HELD}' && echo tries $i && exit 0; sleep 1; done; exit 1",
                       timeout=700, check=False)
    record("node1: after the restart's READY=1, until every local identity has its SVID again", time.monotonic() - started)
    assert waited.rc == 0, node1.run("tcpmesh status --config /etc/tcpmesh/config.yaml", check=False).stdout
    assert waited.stdout.strip().splitlines()[-1] == "tries 1", f"READY=1 came before every SVID: {waited.stdout}"
    time.sleep(10)
    node1.run("touch /root/load.stop; for i in $(seq 1 120); do [ -e /root/load.done ] && exit 0; sleep 1; done; "
              "exit 1", timeout=200)
    log = node1.run("cat /root/load.log").stdout
    runs = [line.split() for line in log.splitlines() if line.startswith("run ")]
    assert len(runs) >= 3, log[-3000:]
    assert runs[-1][-1] == "0" and runs[-2][-1] == "0", f"pgbench did not work again after the restart:\n{log[-4000:]}"

    after = pgbench(node1, "-c 2 -T 5")
    assert after.rc == 0 and "number of failed transactions: 0" in after.stdout, after.stdout + after.stderr
    # the tunnels ran kernel TLS (proxy.kernel_tls auto: Debian 12's tls module loads on first use), so the capture
    # below checks the kernel's records: the agent says so, and so do the kernel's counters
    for machine in (node1, node2):
        tls = json.loads(machine.run(f"{STATUS} --json").stdout)["tunnel_tls"]
        assert tls["in_use"] == "kernel" and tls["established"]["kernel"] >= 1, (machine.name, tls)
        assert not tls["switch_failures"] and not tls["established"]["user"], (machine.name, tls)
        stat = machine.run("cat /proc/net/tls_stat").stdout
        assert int(re.search(r"TlsTxSw\s+(\d+)", stat).group(1)) >= 1, (machine.name, stat)
    # the positive control: a plaintext marker sent node to node outside the mesh must show in the capture
    marker = f"PLAINTEXT-CONTROL-{uuid.uuid4().hex}"
    node2.run(f"setsid timeout 60 /usr/bin/python3 -c 'import socket; s=socket.create_server((\"{NODES['node2']}\", 7999)); "
              f"c,_=s.accept(); c.recv(100)' </dev/null >/dev/null 2>&1 &")
    node1.run(f"/usr/bin/python3 -c 'import socket,time\nfor i in range(50):\n try:\n  "
              f"socket.create_connection((\"{NODES['node2']}\", 7999), 2).sendall(b\"{marker}\"); break\n "
              f"except OSError: time.sleep(0.2)'", timeout=60)
    time.sleep(1)
    wire = pcap.read_bytes()
    assert marker.encode() in wire, "the host-side capture does not see payloads: the plaintext check below would prove nothing"
    assert b"\x17\x03\x03" in wire, "no TLS application data on the link"
    leaked = [m for m in SQL_MARKERS if m in wire]
    assert not leaked, f"SQL in plaintext on the link between the VMs: {leaked}"
    record(f"two VMs: link capture {len(wire) / 1e6:.1f} MB, pgbench runs {len(runs)}", 0.0)

    journal = node1.run("journalctl -u tcpmesh-agent --no-pager -o cat").stdout
    for line in (JOURNAL_START, *JOURNAL_RESTART):
        assert line in journal, f"{line!r} not in journalctl -u tcpmesh-agent:\n{journal[-3000:]}"


def unit_state(machine: Machine, unit: str = "tcpmesh-agent") -> dict[str, str]:
    shown = machine.run(f"systemctl show -p MainPID,ActiveState,SubState,StatusText,NRestarts {unit}").stdout
    return dict(line.split("=", 1) for line in shown.splitlines() if "=" in line)


def journal_tail(machine: Machine, lines: int = 40) -> str:
    return machine.run(f"journalctl -u tcpmesh-agent --no-pager -o short-monotonic | tail -n {lines}", check=False).stdout


def test_sighup_reloads_the_config_and_the_agent_runs_on(nodes):
    """`systemctl kill -s HUP tcpmesh-agent` (a daemon habit): the same process runs on, active, and `tcpmesh
    status` shows the reload with trigger signal. Before bdfbf2b SIGHUP's default action ended the agent (a clean
    exit signal for systemd: no Restart=on-failure, the unit inactive)."""
    machines, _, _ = nodes
    node1 = machines["node1"]
    before = unit_state(node1)
    started = time.monotonic()
    node1.run("systemctl kill -s HUP tcpmesh-agent")
    # until the status shows the reload, or the agent is gone (its MainPID changed: 0 when the unit stopped)
    seen = node1.run(f"for i in $(seq 1 90); do [ \"$(systemctl show -p MainPID --value tcpmesh-agent)\" = "
                     f"'{before['MainPID']}' ] || exit 2; {STATUS} 2>/dev/null | grep -q 'last reload: .* by signal ' "
                     f"&& exit 0; sleep 1; done; exit 1", timeout=180, check=False)
    record("node1: systemctl kill -s HUP tcpmesh-agent, until `tcpmesh status` shows the reload", time.monotonic() - started)
    after = unit_state(node1)
    assert (after["MainPID"], after["ActiveState"], after["SubState"], after["NRestarts"]) == \
        (before["MainPID"], "active", "running", before["NRestarts"]), \
        f"`systemctl kill -s HUP` did not leave the agent running: {before} → {after}\n{journal_tail(node1)}"
    status = node1.run(STATUS, check=False).stdout
    assert seen.rc == 0, f"`tcpmesh status` shows no reload by signal:\n{status}\n{journal_tail(node1)}"
    assert readyz_now(node1) == "200"
    journal = node1.run("journalctl -u tcpmesh-agent --no-pager -o cat").stdout
    assert f"config reload (signal): {CONFIG}: no change from the running config" in journal, journal[-3000:]


def edit_env_file(node: Machine) -> None:
    variable, value = ENV_EDIT
    node.run(f"if [ -e {ENV_FILE} ]; then cp -a {ENV_FILE} {ENV_FILE_SAVED}; fi; echo '{variable}={value}' >> {ENV_FILE}")


def restore_env_file(node: Machine) -> None:
    node.run(f"if [ -e {ENV_FILE_SAVED} ]; then mv {ENV_FILE_SAVED} {ENV_FILE}; else rm -f {ENV_FILE}; fi", check=False)


def test_systemctl_reload_names_an_edit_of_etc_default_tcpmesh_as_needing_a_restart(nodes):
    """node2: a TCPMESH_<SECTION>_<FIELD> line added to /etc/default/tcpmesh, then `systemctl reload`: the reload's
    answer and the agent's line (journal) and `tcpmesh status` name the variable and the field as needing
    `systemctl restart tcpmesh-agent`; the same agent runs on. Before bdfbf2b the agent re-read its file with the
    environment it started with and answered that nothing changed."""
    machines, _, _ = nodes
    node2 = machines["node2"]
    variable, value = ENV_EDIT
    before = unit_state(node2)
    edit_env_file(node2)
    try:
        started = time.monotonic()
        reload = node2.run("systemctl reload tcpmesh-agent", timeout=300, check=False)
        record("node2: systemctl reload tcpmesh-agent after an edit of /etc/default/tcpmesh", time.monotonic() - started)
        assert reload.rc == 0, reload.stderr + journal_tail(node2)
        said = [line for line in node2.run("journalctl -u tcpmesh-agent --no-pager -o cat").stdout.splitlines()
                if "needs a restart" in line and variable in line]
        assert any("config reload (command): " in line for line in said), \
            f"no reload line names {variable}:\n{journal_tail(node2)}"
        assert all(f"proxy.max_connections 32768 → {value}" in line and f"`{SYSTEMD_RESTART}`" in line
                   for line in said), said
        status = node2.run(STATUS, check=False).stdout
        assert f"config changes wait for a restart: proxy.max_connections 32768 → {value}" in status, status
        after = unit_state(node2)
        assert (after["MainPID"], after["ActiveState"], after["NRestarts"]) == \
            (before["MainPID"], "active", before["NRestarts"]), f"{before} → {after}"
    finally:
        restore_env_file(node2)


def test_a_restart_that_must_join_waits_for_the_issuer_then_runs_with_the_edited_environment(nodes):
    """node2, the same edit of /etc/default/tcpmesh, then `systemctl restart` while node1's issuer is stopped and
    node2 has to join anew (its node credential removed, a fresh one-time token from node1's key): the new agent
    stays up and not ready (the start job waits: `activating`, STATUS= and `tcpmesh status` say it has not joined,
    /readyz is not 200), retries the join, and turns ready by itself once the issuer is back — no restart by
    systemd — with the edited value in force. The issuer is started again and the file put back in any case."""
    machines, _, _ = nodes
    node1, node2 = machines["node1"], machines["node2"]
    variable, value = ENV_EDIT
    before = unit_state(node2)
    token = node1.run(f"tcpmesh issuer token node2 --key {ISSUER_TOKEN_KEY} --ttl 900").stdout.strip()
    assert token and "\n" not in token, token
    edit_env_file(node2)
    try:
        node1.run("systemctl stop tcpmesh-issuer", timeout=120)
        started = time.monotonic()
        node2.run(f"rm -f {CREDENTIAL_DIR}/credential.crt {CREDENTIAL_DIR}/credential.key && "
                  f"printf '%s\\n' '{token}' | install -m 0600 /dev/stdin /etc/tcpmesh/join-token && "
                  f"systemctl restart --no-block tcpmesh-agent")
        # until STATUS= says so; a failed unit, or a new agent active (ready without joining), ends the wait
        waiting = node2.run("for i in $(seq 1 600); do systemctl show -p StatusText --value tcpmesh-agent | "
                            "grep -q 'not joined to the issuer yet' && exit 0; s=$(systemctl is-active tcpmesh-agent); "
                            "[ $s = failed ] && echo $s && exit 2; [ $s = active ] && [ \"$(systemctl show -p MainPID "
                            f"--value tcpmesh-agent)\" != '{before['MainPID']}' ] && echo ready without joining && exit 2; "
                            "sleep 1; done; exit 1", timeout=700, check=False)
        record("node2: systemctl restart, issuer stopped: until STATUS= says not joined", time.monotonic() - started)
        unjoined = unit_state(node2)
        status = node2.run(STATUS, check=False).stdout
        assert waiting.rc == 0, f"{waiting.stdout} {unjoined}\n{status}\n{journal_tail(node2)}"
        assert unjoined["ActiveState"] == "activating" and unjoined["StatusText"].startswith("NOT READY"), unjoined
        assert "NOT JOINED" in status, status
        assert readyz_now(node2) != "200"
        time.sleep(5)   # still waiting, the same process: a failed join neither ends the start nor turns it ready
        assert {k: unit_state(node2)[k] for k in ("MainPID", "ActiveState", "NRestarts")} == \
            {k: unjoined[k] for k in ("MainPID", "ActiveState", "NRestarts")}, journal_tail(node2)

        started = time.monotonic()
        node1.run("systemctl start tcpmesh-issuer", timeout=300)
        ready = node2.run("for i in $(seq 1 600); do s=$(systemctl is-active tcpmesh-agent); "
                          "[ $s = active ] && exit 0; [ $s = activating ] || exit 2; sleep 1; done; exit 1",
                          timeout=700, check=False)
        record("node2: issuer started again, until node2's agent has joined and is ready", time.monotonic() - started)
        joined = unit_state(node2)
        assert ready.rc == 0 and (joined["MainPID"], joined["NRestarts"]) == (unjoined["MainPID"], unjoined["NRestarts"]), \
            f"{unjoined} → {joined}\n{journal_tail(node2)}"
        assert joined["StatusText"].startswith("ready:"), joined
        assert readyz_now(node2) == "200"
        journal = node2.run("journalctl -u tcpmesh-agent --no-pager -o cat").stdout.splitlines()
        waited_from = max(i for i, line in enumerate(journal) if "not joined to the issuer yet" in line)
        assert any(f"{JOURNAL_JOIN}node2 with the bootstrap token" in line for line in journal[waited_from:]), \
            journal[waited_from:][:40]
        caps = [line for line in journal if "connection caps per side: " in line]
        assert caps and f"connection caps per side: {value}," in caps[-1], (variable, caps[-2:])
        status = node2.run(STATUS, check=False).stdout
        assert "wait for a restart" not in status and "NOT JOINED" not in status, status
    finally:
        node1.run("systemctl start tcpmesh-issuer", timeout=300, check=False)
        restore_env_file(node2)


def test_stop_runs_cleanup_and_the_journal_says_so(nodes):
    machines, _, _ = nodes
    node1 = machines["node1"]
    pods_cgroup = "/sys/fs/cgroup/tcpmesh-demo/pods"
    attached = node1.run(f"bpftool cgroup tree {pods_cgroup}").stdout
    # the pods' programs and the node guard (bpftool names the programs, e.g. tcpmesh_conn4, tcpmesh_guard4)
    assert "tcpmesh_conn4" in attached and "tcpmesh_guard4" in attached, attached
    started = time.monotonic()
    node1.run("systemctl stop tcpmesh-agent", timeout=300)
    record("node1: systemctl stop tcpmesh-agent (with cleanup)", time.monotonic() - started)
    after = node1.run(f"bpftool cgroup tree {pods_cgroup}").stdout
    assert "tcpmesh_" not in after, f"systemctl stop left programs attached:\n{after}"
    journal = node1.run("journalctl -u tcpmesh-agent --no-pager -o cat").stdout
    for line in (JOURNAL_START, *JOURNAL_STOP):
        assert line in journal, f"{line!r} not in journalctl -u tcpmesh-agent:\n{journal[-4000:]}"
    state = node1.run("systemctl is-active tcpmesh-agent", check=False).stdout.strip()
    if state != "inactive":   # docs: SIGTERM drains and exits 0, ExecStopPost's cleanup exits 0
        why = node1.run("systemctl show -p Result,ExecMainCode,ExecMainStatus tcpmesh-agent; "
                        "journalctl -b -u tcpmesh-agent --no-pager -o short-monotonic | tail -n 60", check=False).stdout
        save_log("node1-after-stop.log", why)
        raise AssertionError(f"after `systemctl stop` the unit is {state!r}, not 'inactive':\n{why[-5000:]}")
