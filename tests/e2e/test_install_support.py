"""Running systemd/tcpmesh-agent.service's command lines the way systemd would, on a host whose PID 1
is not systemd (this one). No test lives here; the install tests import it.

What is real: the unit's ExecStart/ExecStopPost lines as written (``${VAR}`` from its Environment=,
``%n``), argv[0] ``/usr/local/bin/tcpmesh`` as `make install` links it (in a private mount
namespace, a tmpfs over /usr/local/bin holds that link to this checkout's console script), the
``NOTIFY_SOCKET`` protocol, and the unit's sandbox, built from its own directives: the
CapabilityBoundingSet (setpriv; no inheritable or ambient capabilities), NoNewPrivileges,
ProtectSystem=strict + ProtectKernelTunables (every mount read-only except /dev, /proc and
ReadWritePaths=; /sys and /proc/sys read-only, and so a mount below /sys such as /sys/fs/bpf even
when ReadWritePaths= names it, as systemd does), PrivateTmp, ProtectHome (except that a Python
installed under /root or /home — pyenv on this machine — is bound back read-only, or nothing could
run; a `make install` venv uses Debian's /usr/bin/python3). What is not: systemd
itself — the remaining directives (RestrictNamespaces, RestrictAddressFamilies, …) are checked by
`systemd-analyze verify` only, and RuntimeDirectory/LogsDirectory are replaced by the lab node's
state directory, passed as an extra writable path.

Mounts happen only inside a new mount namespace with private propagation, and only as bind
remounts (MS_REMOUNT|MS_BIND), which change the flags of that namespace's copy of a mount, never
a filesystem's: the host sees none of it. The sandbox script refuses to run in the test's own mount namespace.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

from agent.lab import nsenter

REPO = Path(__file__).resolve().parents[2]
UNIT_FILE = REPO / "systemd" / "tcpmesh-agent.service"
INSTALLED_BIN = "/usr/local/bin/tcpmesh"
CHECKOUT_BIN = str(Path(sys.executable).with_name("tcpmesh"))
CAP_NUMBERS = {"CAP_DAC_OVERRIDE": 1, "CAP_NET_ADMIN": 12, "CAP_NET_RAW": 13, "CAP_SYS_ADMIN": 21, "CAP_SYS_RESOURCE": 24,
               "CAP_PERFMON": 38, "CAP_BPF": 39}


def read_unit(path: Path = UNIT_FILE) -> dict[str, dict[str, list[str]]]:
    """section → directive → values (in order; a directive may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def unit_environment(unit: dict, overrides: dict[str, str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for value in unit["Service"].get("Environment", []):
        for assignment in shlex.split(value):
            key, _, val = assignment.partition("=")
            env[key] = val
    env.update(overrides)
    return env


def command_argv(unit: dict, directive: str, env: dict[str, str], unit_name: str = UNIT_FILE.name) -> list[str]:
    """The argv systemd builds from ``directive``: prefixes stripped, %n, ${VAR} and $VAR expanded."""
    (line,) = unit["Service"][directive]
    line = line.lstrip("-@:+!").replace("%n", unit_name)
    words = []
    for word in shlex.split(line):
        word = re.sub(r"\$\{(\w+)\}", lambda m: env.get(m.group(1), ""), word)
        words.append(env.get(word[1:], "") if re.fullmatch(r"\$\w+", word) else word)
    return words


def capability_mask(unit: dict) -> int:
    (line,) = unit["Service"]["CapabilityBoundingSet"]
    return sum(1 << CAP_NUMBERS[name] for name in line.split())


def sandboxed(unit: dict, argv: list[str], extra_rw: list[str]) -> list[str]:
    """``argv`` wrapped: new mount namespace → the unit's sandbox → setpriv → exec (same PID throughout)."""
    service = unit["Service"]
    # "-PATH": systemd ignores a missing PATH; a missing one is left out here too
    rw = [p.removeprefix("-") for line in service.get("ReadWritePaths", []) for p in line.split()]
    rw = [p for p in rw if os.path.exists(p)] + list(extra_rw)
    caps = "".join(",+" + name.lower().removeprefix("cap_") for name in service["CapabilityBoundingSet"][0].split())
    spec = {"rw": rw, "bin": {INSTALLED_BIN: CHECKOUT_BIN}, "host_mnt_ns": os.readlink("/proc/self/ns/mnt"),
            "keep": [sys.base_prefix, sys.prefix, str(REPO)],
            "private_tmp": service.get("PrivateTmp") == ["yes"], "protect_home": service.get("ProtectHome") == ["yes"],
            "strict": service.get("ProtectSystem") == ["strict"],
            "tunables": service.get("ProtectKernelTunables") == ["yes"],
            "setpriv": ["setpriv", *(["--no-new-privs"] if service.get("NoNewPrivileges") == ["yes"] else []),
                        "--inh-caps=-all", "--ambient-caps=-all", f"--bounding-set=-all{caps}", "--"]}
    return ["unshare", "--mount", "--propagation", "private", "--", sys.executable, "-c", SANDBOX_SCRIPT,
            json.dumps(spec), *argv]


SANDBOX_SCRIPT = r'''
import ctypes, json, os, re, sys
spec, argv = json.loads(sys.argv[1]), sys.argv[2:]
if os.readlink("/proc/self/ns/mnt") == spec["host_mnt_ns"]:
    sys.exit("sandbox: refusing to remount anything in the host's mount namespace")
libc = ctypes.CDLL(None, use_errno=True)
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC = 1, 2, 4, 8, 32, 4096, 16384
FLAGS = {"ro": MS_RDONLY, "nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": 1024,
         "nodiratime": 2048, "relatime": 1 << 21}

def mount(source, target, fstype, flags, data=None):
    if libc.mount(source.encode() if source else None, target.encode(), fstype.encode() if fstype else None,
                  flags, data.encode() if data else None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {target}: {os.strerror(err)}")

def mounts():
    for line in open("/proc/self/mountinfo"):
        fields = line.split()
        sep = fields.index("-")
        yield re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4]), fields[5], fields[sep + 1]

def under(path, roots):
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)

for target, link in spec["bin"].items():
    mount("tmpfs", os.path.dirname(target), "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755")
    os.symlink(link, target)
if spec["private_tmp"]:
    # a checkout or venv under /tmp (a CI clone) stays visible, as BindReadOnlyPaths= would keep it
    held = [(p, os.open(p, os.O_PATH | os.O_DIRECTORY)) for p in sorted(set(spec["keep"]), key=len) if under(p, ["/tmp"])]
    mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    for path, fd in held:
        os.makedirs(path, exist_ok=True)
        mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
        os.close(fd)
if spec["protect_home"]:
    # this machine's Python lives under /root (pyenv): bind it back, as BindReadOnlyPaths= would
    keep = [p for p in spec["keep"] if under(p, ["/home", "/root"])]
    if keep and not spec["private_tmp"]:
        sys.exit("sandbox: keeping paths under ProtectHome needs PrivateTmp (staging happens in the private /tmp)")
    for i, path in enumerate(keep):
        os.makedirs(f"/tmp/.keep{i}")
        mount(path, f"/tmp/.keep{i}", None, MS_BIND | MS_REC)
    for path in ("/home", "/root", "/run/user"):
        if os.path.isdir(path):
            mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755")
            for i, kept in enumerate(keep):
                if under(kept, [path]):
                    os.makedirs(kept)
                    mount(f"/tmp/.keep{i}", kept, None, MS_BIND | MS_REC)
            mount(None, path, None, MS_REMOUNT | MS_NOSUID | MS_NODEV | MS_RDONLY)
    for i in range(len(keep)):
        libc.umount2(f"/tmp/.keep{i}".encode(), 0)
        os.rmdir(f"/tmp/.keep{i}")
points = {p for p, _, _ in mounts()}
if spec["tunables"]:
    # systemd (252, measured in the vm tier) keeps a mount below /sys read-only under ProtectKernelTunables
    # even when ReadWritePaths= names it (/sys/fs/bpf); a plain directory below one is made writable
    spec["rw"] = [p for p in spec["rw"] if not (p in points and under(p, ["/sys"]) and p != "/sys/fs/cgroup")]
for path in spec["rw"] + (["/proc/sys"] if spec["tunables"] else []):
    if path not in points:
        mount(path, path, None, MS_BIND | MS_REC)
exempt = ["/dev", "/proc"] if spec["strict"] else ["/"]
if not spec["tunables"]:
    exempt.append("/sys")
for path, options, fstype in list(mounts()):
    if under(path, spec["rw"]) or (under(path, exempt) and not under(path, ["/proc/sys"])):
        continue
    if spec["private_tmp"] and path == "/tmp":
        continue
    flags = MS_REMOUNT | MS_BIND | MS_RDONLY
    for option in options.split(","):
        flags |= FLAGS.get(option, 0)
    try:
        mount(None, path, None, flags)
    except OSError:
        if fstype not in ("nsfs", "autofs", "binfmt_misc"):
            raise
os.execvp(spec["setpriv"][0], spec["setpriv"] + argv)
'''


class NotifySocket:
    """The NOTIFY_SOCKET systemd would provide: a unix datagram socket that learns each sender's pid."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(path)

    def receive(self, timeout: float, alive=lambda: True) -> tuple[bytes, int]:
        """(message, sender pid); AssertionError on timeout or when ``alive()`` turns false."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(0.2)
            try:
                data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
            except socket.timeout:
                if not alive():
                    raise AssertionError("the agent exited before it notified systemd")
                continue
            pid = next(struct.unpack("iII", d[:12])[0] for level, kind, d in ancillary
                       if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS)
            return data, pid
        raise AssertionError(f"no message on {self.path} within {timeout}s")

    def receive_ready(self, timeout: float, alive=lambda: True) -> tuple[bytes, int, list[bytes]]:
        """(the READY=1 message, its sender, the waiting messages before it): the agent says why it is not
        ready yet (issuer mode: waiting for the first SVIDs) with ``STATUS=``, and extends systemd's start
        timeout while it waits (``EXTEND_TIMEOUT_USEC=``, every 2 s), then sends ``READY=1``. Any other
        message (one without READY=1 that is not only these) is returned as it is, for the test to refuse."""
        deadline = time.monotonic() + timeout
        before: list[bytes] = []
        while True:
            message, pid = self.receive(max(deadline - time.monotonic(), 0.2), alive)
            lines = message.split(b"\n")
            waiting = all(line.startswith((b"STATUS=", b"EXTEND_TIMEOUT_USEC=")) for line in lines if line)
            if b"READY=1" in lines or not waiting:
                return message, pid, before
            before.append(message)

    def close(self) -> None:
        self.sock.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def start_in_node(argv: list[str], netns: str, cgroup: str, env: dict[str, str], log_path: str) -> subprocess.Popen:
    """Start ``argv`` as systemd would start the service: in the node's netns and (agent) cgroup."""
    with open(log_path, "ab") as log:
        return nsenter.popen_in(argv, netns=netns, cgroup=cgroup, env={**os.environ, **env},
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)


def process_status(pid: int) -> dict[str, str]:
    return dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":\t" in line)


def mount_options(pid: int, path: str) -> str:
    for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == path:
            return fields[5]
    raise AssertionError(f"{path} is not a mount point in {pid}'s namespace")


def stop(proc: subprocess.Popen, timeout: float = 20) -> int:
    if proc.poll() is None:
        proc.terminate()
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()
