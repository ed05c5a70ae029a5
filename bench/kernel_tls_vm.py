"""``python -m bench.kernel_tls_vm``: bench/kernel_tls.py in Debian 12 guests of the VM tier (issue #19).

This host's kernel has no ``CONFIG_TLS``; Debian 12's 6.1 has it (``modprobe tls``). Each boot: one guest
from the VM tier's cached image (tests/vm/images.py ``cached_image``: never builds one — ``make test-vm``
or ``python -m tests.vm.images`` does), 2 vCPUs under qemu (TCG here), this checkout installed in it as the
vm tier installs it (tests/vm/machine.py ``install_checkout``), stunnel unpacked from Debian's own
packages when ``--debs`` holds them, then ``python -m bench.kernel_tls`` in the guest. Boots run one after
another; while each runs, the host's /proc/loadavg is sampled (the other tenants' load). Every boot's
JSON and the summary over all boots go to one file under bench/results/ (``kernel-tls-<time>.json``).

Root, from the repository's root. Not part of ``make bench`` or CI. The VM plumbing is the vm tier's
(tests/vm), imported rather than copied: the one exception to "bench/ never imports tests/"
(tests/unit/test_bench_imports.py), as nothing there changes what is measured in the guest.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import shlex
import signal
import sys
import threading
import time
from pathlib import Path

from bench import kernel_tls

REPO = Path(__file__).resolve().parents[1]
DEBS = Path("/tmp/ktls-debs")      # `apt-get download stunnel4 libwrap0` (Debian's registry)
GUEST_DEBS = "bench/out/vm-debs"   # where they sit on the guest's checkout disk
LOADAVG_EVERY = 15.0


class LoadSampler:
    """In a thread, every ``every`` seconds: the host's /proc/loadavg, and the guest's progress lines from its
    serial console (``console``; bench.kernel_tls --progress /dev/ttyS0) passed to ``log``."""

    def __init__(self, name: str, console: Path, log, every: float = LOADAVG_EVERY) -> None:
        self.name = name
        self.every = every
        self.console = console
        self.log = log
        self._read = 0
        self.samples: list[tuple[float, list[float]]] = []
        self._stop = threading.Event()
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            with open("/proc/loadavg") as f:
                fields = f.read().split()
            self.samples.append((round(time.monotonic() - self._started, 1), [float(v) for v in fields[:3]]))
            self._progress(fields[0])
            if self._stop.wait(self.every):
                self._progress(fields[0])
                return

    def _progress(self, load: str) -> None:
        try:
            with open(self.console, "rb") as f:
                f.seek(self._read)
                text = f.read()
        except OSError:
            return
        complete = text.rfind(b"\n") + 1
        self._read += complete
        for line in text[:complete].decode(errors="replace").splitlines():
            if kernel_tls.PROGRESS_PREFIX in line:
                self.log(f"  [{self.name}, host load {load}] {line.split(kernel_tls.PROGRESS_PREFIX, 1)[1].rstrip()}")

    def __enter__(self) -> "LoadSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def install_stunnel(machine, debs: str) -> str:
    """Unpack the .debs under /opt/stunnel (never into /: the packages' ./lib would replace the merged-/usr
    symlink /lib and break the guest) and put a `stunnel` on PATH that finds their libraries; its version."""
    root = "/opt/stunnel"
    libs = f"{root}/lib/x86_64-linux-gnu:{root}/usr/lib/x86_64-linux-gnu"
    done = machine.run(f"mkdir -p {root} && for d in {debs}/*.deb; do dpkg-deb -x $d {root}; done && "
                       f"printf '#!/bin/sh\\nLD_LIBRARY_PATH={libs} exec {root}/usr/bin/stunnel4 \"$@\"\\n' "
                       f"> /usr/local/bin/stunnel && chmod 755 /usr/local/bin/stunnel && "
                       f"stunnel -version </dev/null 2>&1 | grep -m1 '^stunnel'", timeout=120, check=False)
    return done.stdout.strip() if done.rc == 0 else f"not usable: {(done.stdout + done.stderr).strip()[-300:]}"


def one_boot(image, opts, index: int, log) -> dict:
    from tests.vm.machine import GUEST_SRC, GUEST_VENV, Machine, close_all, install_checkout, make_checkout_disk, \
        new_run_dir

    run_dir = new_run_dir("tcpmesh-ktlsbench-")
    machines = []
    try:
        debs = sorted(opts.debs.glob("*.deb")) if opts.debs and opts.debs.is_dir() else []
        disk = make_checkout_disk(run_dir / "src.img", extra={f"{GUEST_DEBS}/{d.name}": d for d in debs})
        machine = Machine(f"ktls{index}", image, opts.kernel, run_dir, memory_mb=opts.memory, cpus=2,
                          checkout_disk=disk)
        machines.append(machine)
        machine.start()
        log(f"boot {index}: {machine.release} ({machine.accel}) up in {machine.boot_seconds:.0f} s")
        installed = install_checkout(machine)
        log(f"boot {index}: checkout installed in {installed:.0f} s")
        stunnel = install_stunnel(machine, f"{GUEST_SRC}/{GUEST_DEBS}") if debs else None
        args = ["--reps", str(opts.reps), "--rr-seconds", str(opts.rr_seconds), "--bulk-bytes", str(opts.bulk_bytes),
                "--ready-timeout", str(opts.ready_timeout), "--progress", "/dev/ttyS0", *(["--no-stunnel"] if not debs else []),
                *(a for v in opts.variant or () for a in ("--variant", v))]
        command = f"cd {GUEST_SRC} && {GUEST_VENV}/bin/python -m bench.kernel_tls {shlex.join(args)}"
        started = time.monotonic()
        with LoadSampler(f"boot {index}", machine.console_log, log) as load:
            done = machine.run(command, timeout=opts.timeout, check=False)
        if done.rc != 0:
            raise RuntimeError(f"boot {index}: bench.kernel_tls exited {done.rc}:\n{done.stderr[-4000:]}")
        log(done.stderr[-3000:])
        result = json.loads(done.stdout)
        result["host"] = {"boot": index, "release": machine.release, "accel": machine.accel,
                          "boot_seconds": round(machine.boot_seconds, 1), "install_seconds": round(installed, 1),
                          "guest_seconds": round(time.monotonic() - started, 1), "stunnel": stunnel,
                          "qemu_cpu_seconds": machine.cpu_seconds(), "loadavg": load.samples}
        return result
    finally:
        close_all(machines, run_dir)


def main(argv: list[str] | None = None) -> int:
    from tests.vm.images import cached_image

    parser = argparse.ArgumentParser(prog="python -m bench.kernel_tls_vm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--boots", type=int, default=2)
    parser.add_argument("--kernel", default="6.1", help="the guest kernel series (a kernel of the cached image)")
    parser.add_argument("--debs", type=Path, default=DEBS, help="stunnel4 and libwrap0 .debs; none: no stunnel path")
    parser.add_argument("--variant", action="append", help="passed to bench.kernel_tls (default: its own)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--rr-seconds", type=float, default=4.0)
    parser.add_argument("--bulk-bytes", type=int, default=8_000_000)
    parser.add_argument("--ready-timeout", type=float, default=600.0)
    parser.add_argument("--memory", type=int, default=2048, help="guest MiB (two labs)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds for the guest's run")
    parser.add_argument("--parallel", action="store_true", help="boot the guests at once, not one after another")
    parser.add_argument("--out", type=Path, default=None)
    opts = parser.parse_args(argv)
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    for signum in (signal.SIGTERM, signal.SIGHUP):   # end through the finally blocks: the guest is powered off
        signal.signal(signum, lambda number, _frame: sys.exit(128 + number))
    image = cached_image(opts.kernel)
    if image is None:
        log(f"no cached VM image with a {opts.kernel} kernel: run the vm tier once (`make test-vm`, or "
            f"`python -m tests.vm.images`) to build it")
        return 1
    out = opts.out or REPO / "bench" / "results" / f"kernel-tls-{time.strftime('%Y%m%d-%H%M%S')}.json"
    boots: list[dict] = []

    def save(result: dict) -> dict:
        boots.append(result)
        rr = [{**r, "boot": b["host"]["boot"]} for b in boots for r in b["rr"]]
        bulk = [{**r, "boot": b["host"]["boot"]} for b in boots for r in b["bulk"]]
        document = {"image": image.path.name, "boots": sorted(boots, key=lambda b: b["host"]["boot"]),
                    "summary": kernel_tls.summarise(rr, bulk, boots[0]["paths"])}
        out.write_text(json.dumps(document, indent=1) + "\n")   # after every boot: a later failure keeps it
        return document

    if opts.parallel:   # each boot's A/B stays interleaved within it; the boots share the host's cores
        with concurrent.futures.ThreadPoolExecutor(opts.boots) as pool:
            for future in [pool.submit(one_boot, image, opts, index, log) for index in range(opts.boots)]:
                try:
                    document = save(future.result())
                except Exception as exc:   # the other boots still count
                    log(f"a boot failed: {exc}")
        if not boots:
            return 1
    else:
        for index in range(opts.boots):
            document = save(one_boot(image, opts, index, log))
    for b in boots:
        log(f"boot {b['host']['boot']}: host loadavg {[s[1][0] for s in b['host']['loadavg']]}, "
            f"ulp {json.dumps(b['ulp'])}, errors {b['errors']}")
        log(kernel_tls.report(b["summary"]))
    print(kernel_tls.report(document["summary"]))
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
