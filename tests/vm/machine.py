"""One test VM: a qcow2 overlay on a cached image (tests/vm/images.py), booted by qemu, driven through
the project's own command channel, always powered off and removed.

Owns: the accelerator choice (KVM only when a probe boot shows it really works, else TCG — on
hosts whose /dev/kvm hangs a guest, as some nested/PVM hosts do), the qemu command line, the
host half of the channel (a unix socket on a virtio-serial port; the guest half is
tests/vm/guest_agent.py), the checkout disk handed to a guest, the link between two VMs (a qemu
``stream`` netdev over a unix socket; qemu's filter-dump writes that link's frames to a pcap on
the host side) and cleanup: ``close()`` asks the guest to power off, waits, then kills qemu by its
PID and removes the run directory (overlay, sockets, disks). Use it as a context manager.
Must not import tcpmesh (``agent``).
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tests.vm.images import Image, cache_dir

CHANNEL_PORT = "org.tcpmesh.vm.0"
PR_SET_PDEATHSIG = 1
ACCEL_ENV = "TCPMESH_VM_ACCEL"          # tcg | kvm: skip the probe
BOOT_TIMEOUT = 300                     # TCG with two VMs and other suites on two cores: ~15-60 s measured
REPO = Path(__file__).resolve().parent.parent.parent
GUEST_VENV = "/opt/tcpmesh-test"       # the image's test venv (tests/vm/image-provision.sh)
GUEST_SRC = "/root/tcpmesh"            # where a guest mounts its checkout disk


class MachineError(RuntimeError):
    """The VM did not boot, the channel broke, or a command failed; the message says which and where
    the console log is."""


@dataclass(frozen=True)
class Result:
    argv: list[str]
    rc: int
    stdout: str
    stderr: str
    seconds: float

    def check(self) -> "Result":
        if self.rc != 0:
            raise MachineError(f"`{' '.join(self.argv)}` exited {self.rc} after {self.seconds:.1f}s\n"
                               f"--- stdout (end)\n{self.stdout[-6000:]}\n--- stderr (end)\n{self.stderr[-3000:]}")
        return self


@dataclass(frozen=True)
class Link:
    """A point-to-point link between two VMs: ``server`` listens on the unix socket, the other connects."""
    socket_path: Path
    server: bool
    mac: str
    pcap: Path | None = None


def _die_with_parent() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def new_run_dir(prefix: str = "tcpmesh-vm-") -> Path:
    """A private directory for one test's VMs (short: unix socket paths are limited to 107 bytes)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def choose_accel(image: Image) -> str:
    """'kvm' if /dev/kvm boots the image's kernel to its first panic within seconds, else 'tcg'.
    Cached per host boot (the answer cannot change until the host reboots)."""
    forced = os.environ.get(ACCEL_ENV)
    if forced:
        return forced
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg"
    boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    memo = cache_dir() / f"accel-{boot_id}"
    if memo.exists():
        return memo.read_text().strip()
    vmlinuz = image.path / f"vmlinuz-{image.manifest['kernels'][0]}"
    with tempfile.TemporaryDirectory(prefix="tcpmesh-kvm-probe-") as tmp:
        console = Path(tmp) / "console.log"
        # No root disk: a kernel that really runs reaches "Kernel panic" (VFS) in ~1 s under KVM and
        # exits (panic=-1, -no-reboot); a host whose KVM hangs guests never gets there.
        proc = subprocess.Popen(["qemu-system-x86_64", "-accel", "kvm", "-cpu", "host", "-m", "256", "-display", "none",
                                 "-vga", "none", "-monitor", "none", "-no-reboot", "-serial", f"file:{console}",
                                 "-kernel", str(vmlinuz), "-append", "console=ttyS0 panic=-1"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        text = console.read_text(errors="replace") if console.exists() else ""
    accel = "kvm" if "Kernel panic" in text else "tcg"
    memo.write_text(accel + "\n")
    return accel


def close_all(machines, run_dir: Path) -> None:
    """Power off every machine and remove ``run_dir``, even when a close is interrupted (a second
    Ctrl-C) or fails: each close still kills its qemu; the first error is raised after all of it."""
    error: BaseException | None = None
    for machine in machines:
        try:
            machine.close()
        except BaseException as exc:   # KeyboardInterrupt included: the others must still go
            error = error or exc
    shutil.rmtree(run_dir, ignore_errors=True)
    if error is not None:
        raise error


def make_checkout_disk(dest: Path, source: Path = REPO, extra: dict[str, Path] | None = None) -> Path:
    """An ext4 disk image holding this checkout's files (tracked and untracked, not ignored ones:
    no .venv, no .git), for a guest to mount at /root/tcpmesh. ~3 MB; each VM gets its own copy.
    ``extra``: more files, path on the disk → file on the host (the guests have no network: e.g. .debs)."""
    listing = subprocess.run(["git", "-C", str(source), "ls-files", "-z", "-co", "--exclude-standard"],
                             capture_output=True, check=True).stdout.split(b"\0")
    staging = dest.with_suffix(".d")
    for name in filter(None, listing):
        path = source / os.fsdecode(name)
        target = staging / os.fsdecode(name)
        if path.is_symlink():           # e.g. agent/bpf_sources -> ../bpf: a link in the guest too
            target.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(os.readlink(path), target)
        elif path.is_file():            # (a file deleted in the work tree but still in the index: skipped)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
    for name, path in (extra or {}).items():
        (staging / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, staging / name)
    subprocess.run(["truncate", "-s", "256M", str(dest)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "tcpmesh-src", "-d", str(staging), str(dest)], check=True)
    shutil.rmtree(staging)
    return dest


def install_checkout(machine: "Machine", device: str = "/dev/vdb") -> float:
    """Mount the checkout disk at GUEST_SRC and install tcpmesh from it (editable, no network: pip builds the
    compiled hot path in the guest) into the test venv; `tcpmesh` on PATH. The seconds it took."""
    started = time.monotonic()
    machine.run(f"mkdir -p {GUEST_SRC} && mount {device} {GUEST_SRC} && "
                f"{GUEST_VENV}/bin/pip install -q --disable-pip-version-check --no-deps --no-index "
                f"--no-build-isolation -e {GUEST_SRC} && ln -sfn {GUEST_VENV}/bin/tcpmesh /usr/local/bin/tcpmesh",
                timeout=600)
    return time.monotonic() - started


def checkout_overlay(checkout: Path, run_dir: Path, name: str) -> Path:
    """A private qcow2 overlay of the checkout disk (the guest writes .egg-info, __pycache__)."""
    overlay = run_dir / f"{name}-src.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(checkout), str(overlay)],
                   check=True)
    return overlay


class Machine:
    """A VM booted from ``image`` with kernel ``series``. ``start()`` returns once the guest channel
    answers (systemd is PID 1 and has reached the channel's unit)."""

    def __init__(self, name: str, image: Image, series: str, run_dir: Path, memory_mb: int = 1536,
                 cpus: int = 2, checkout_disk: Path | None = None, link: Link | None = None,
                 accel: str | None = None) -> None:
        self.name = name
        self.image = image
        self.vmlinuz, self.initrd, self.release = image.kernel(series)
        self.dir = run_dir / name
        self.memory_mb = memory_mb
        self.cpus = cpus
        self.checkout_disk = checkout_disk
        self.link = link
        self.accel = accel or choose_accel(image)
        self.proc: subprocess.Popen | None = None
        self.sock: socket.socket | None = None
        self._buffer = b""
        self._next_id = 0
        self.boot_seconds: float | None = None
        self._started = 0.0

    # ---- lifecycle -------------------------------------------------------------------------------------

    def __enter__(self) -> "Machine":
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def console_log(self) -> Path:
        return self.dir / "console.log"

    def qemu_argv(self) -> list[str]:
        accel = ["-accel", "kvm", "-cpu", "host"] if self.accel == "kvm" else ["-accel", "tcg,thread=multi", "-cpu", "max"]
        argv = ["qemu-system-x86_64", "-name", f"tcpmesh-vm-{self.name}", *accel, "-smp", str(self.cpus),
                "-m", str(self.memory_mb), "-display", "none", "-vga", "none", "-monitor", "none", "-no-reboot",
                "-serial", f"file:{self.console_log}", "-pidfile", str(self.dir / "qemu.pid"),
                "-kernel", str(self.vmlinuz), "-initrd", str(self.initrd),
                "-append", "console=ttyS0 root=/dev/vda rw net.ifnames=0 panic=-1 quiet systemd.show_status=1",
                "-drive", f"file={self.dir / 'overlay.qcow2'},format=qcow2,if=virtio,cache=unsafe,discard=unmap",
                "-device", "virtio-serial-pci",
                "-chardev", f"socket,id=channel,path={self.dir / 'channel.sock'},server=on,wait=off",
                "-device", f"virtserialport,chardev=channel,name={CHANNEL_PORT}",
                "-device", "virtio-rng-pci"]
        if self.checkout_disk is not None:
            disk_format = "qcow2" if self.checkout_disk.suffix == ".qcow2" else "raw"
            argv += ["-drive", f"file={self.checkout_disk},format={disk_format},if=virtio,cache=unsafe"]
        if self.link is None:
            argv += ["-nic", "none"]
        else:
            argv += ["-netdev", f"stream,id=wire,server={'on' if self.link.server else 'off'},"
                                f"addr.type=unix,addr.path={self.link.socket_path}",
                     "-device", f"virtio-net-pci,netdev=wire,mac={self.link.mac}"]
            if self.link.pcap is not None:
                argv += ["-object", f"filter-dump,id=dump,netdev=wire,file={self.link.pcap},maxlen=65535"]
        return argv

    def start(self, timeout: float = BOOT_TIMEOUT) -> None:
        self.launch()
        self.wait_ready(timeout)

    def launch(self) -> None:
        """Start qemu (returns at once; ``wait_ready`` waits for the guest): two VMs boot side by side."""
        self.dir.mkdir(parents=True, exist_ok=False)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(self.image.root),
                        str(self.dir / "overlay.qcow2")], check=True)
        self._started = time.monotonic()
        with open(self.dir / "qemu.log", "wb") as log:
            # own session: a Ctrl-C in the terminal reaches pytest, whose cleanup powers this VM off
            # and PR_SET_PDEATHSIG: if pytest itself is killed (no cleanup runs), qemu dies with it
            self.proc = subprocess.Popen(self.qemu_argv(), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         start_new_session=True, preexec_fn=_die_with_parent)
        if self.link is not None and self.link.server:
            deadline = time.monotonic() + 30     # the other end connects to this socket: it must exist first
            while not self.link.socket_path.exists():
                self._check_alive()
                if time.monotonic() > deadline:
                    raise MachineError(f"{self.name}: qemu never created the link socket {self.link.socket_path}")
                time.sleep(0.05)

    def wait_ready(self, timeout: float = BOOT_TIMEOUT) -> None:
        self._connect(self._started + 30)
        self._wait_for_guest(self._started + timeout)
        self.boot_seconds = time.monotonic() - self._started

    def _connect(self, deadline: float) -> None:
        path = str(self.dir / "channel.sock")
        while True:
            self._check_alive()
            try:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.connect(path)
                self.sock = sock
                return
            except OSError:
                sock.close()
                if time.monotonic() > deadline:
                    raise MachineError(f"{self.name}: qemu's channel socket {path} never appeared; "
                                       f"see {self.dir / 'qemu.log'}")
                time.sleep(0.1)

    def _wait_for_guest(self, deadline: float) -> None:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise MachineError(f"{self.name}: the guest did not answer within {BOOT_TIMEOUT}s of boot "
                                   f"(kernel {self.release}, accel {self.accel}); console:\n{self._console_tail()}")
            try:
                reply = self._request({"op": "ping"}, timeout=min(3.0, remaining))
            except TimeoutError:
                continue
            if reply.get("kernel") != self.release:
                raise MachineError(f"{self.name}: booted {reply.get('kernel')}, expected {self.release}")
            return

    def close(self, timeout: float = 60) -> None:
        """Power off (or kill) and remove everything this machine made. Safe to call twice."""
        try:
            if self.proc is not None and self.proc.poll() is None:
                if self.sock is not None:
                    try:
                        self._request({"op": "poweroff"}, timeout=10)
                    except (OSError, TimeoutError, MachineError):
                        pass
                try:
                    self.proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    os.kill(self.proc.pid, signal.SIGKILL)
                    self.proc.wait()
        finally:
            if self.proc is not None and self.proc.poll() is None:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            if self.sock is not None:
                self.sock.close()
                self.sock = None
            shutil.rmtree(self.dir, ignore_errors=True)

    def cpu_seconds(self) -> float:
        """CPU time (user + system) qemu has used so far: what this VM costs a quiet host, whatever the
        load average made of the wall-clock times. 0.0 once qemu is gone."""
        if self.proc is None:
            return 0.0
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")   # utime, stime

    # ---- the channel ---------------------------------------------------------------------------------

    def run(self, command: str | list[str], timeout: float = 600, check: bool = True, env: dict | None = None,
            cwd: str = "/") -> Result:
        """Run ``command`` (argv, or a string for ``/bin/sh -c``) in the guest as root."""
        argv = ["/bin/sh", "-c", command] if isinstance(command, str) else list(command)
        reply = self._request({"op": "run", "argv": argv, "timeout": timeout, "env": env or {}, "cwd": cwd},
                              timeout=timeout + 30)
        result = Result(argv, reply["rc"], reply["stdout"], reply["stderr"], reply.get("seconds", 0.0))
        return result.check() if check else result

    def _request(self, request: dict, timeout: float) -> dict:
        self._next_id += 1
        request = {**request, "id": self._next_id}
        assert self.sock is not None
        self.sock.sendall((json.dumps(request) + "\n").encode())
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self._buffer:
                line, self._buffer = self._buffer.split(b"\n", 1)
                reply = json.loads(line)
                if reply.get("id") == request["id"]:
                    return reply          # older ids: answers to pings sent before the guest listened
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{self.name}: no answer to {request['op']} within {timeout:.0f}s")
            self._check_alive()
            self.sock.settimeout(min(remaining, 1.0))
            try:
                chunk = self.sock.recv(1 << 20)
            except socket.timeout:
                continue
            if not chunk:
                raise MachineError(f"{self.name}: the channel closed (qemu exited?); console:\n{self._console_tail()}")
            self._buffer += chunk

    def _check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            qemu_log = (self.dir / "qemu.log").read_text(errors="replace")[-2000:] if (self.dir / "qemu.log").exists() else ""
            raise MachineError(f"{self.name}: qemu exited with {self.proc.returncode}: {qemu_log}\n"
                               f"console:\n{self._console_tail()}")

    def _console_tail(self) -> str:
        try:
            return self.console_log.read_text(errors="replace")[-4000:]
        except OSError:
            return "(no console log)"
