"""Host side of the kTLS prototype: boots ONE Debian 12 guest (kernel 6.1) from the VM tier's cached
image (tests/vm; never builds one), hands it this directory, bench/loadgen.c and the stunnel .debs
on a small ext4 disk, runs ktls_bench.py's `run` inside, saves the JSON under results/ and prints the
ratios. Run as root from the repository's root: `nice -n 19 python3 bench/prototypes/ktls/run_vm.py`
(README.md beside it).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent.parent
GUEST_PYTHON = "/opt/tcpmesh-test/bin/python"   # the image's test venv: it has `cryptography`


def cached_image(series: str):
    """The newest cached image with a kernel of ``series`` (no build: that is the vm tier's job)."""
    from tests.vm.images import cache_dir, cached_image as newest

    image = newest(series)
    if image is None:
        sys.exit(f"no cached VM image with a {series} kernel under {cache_dir()}/images: run the vm tier once "
                 f"(`make test-vm`, or `python -m tests.vm.images`) to build it")
    return image


def payload_disk(dest: Path, debs: Path | None) -> Path:
    staging = dest.with_suffix(".d")
    staging.mkdir(parents=True)
    shutil.copy2(HERE / "ktls_bench.py", staging / "ktls_bench.py")
    shutil.copy2(REPO / "bench" / "loadgen.c", staging / "loadgen.c")
    if debs and debs.is_dir():
        shutil.copytree(debs, staging / "debs")
    subprocess.run(["truncate", "-s", "64M", str(dest)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(staging), str(dest)], check=True)
    shutil.rmtree(staging)
    return dest


def summarise(result: dict) -> str:
    """Median over rounds of p50, p99, relay CPU per round trip, and of the added p50 (path minus the
    direct path of the same round and layout); ratios of added p50 and of CPU."""
    rr = result["rr"]
    lines = []
    for layout in sorted({r["layout"] for r in rr["direct"]}):
        direct = {r["round"]: r["p50"] for r in rr["direct"] if r["layout"] == layout}
        direct_mean = {r["round"]: r.get("mean", 0) for r in rr["direct"] if r["layout"] == layout}
        rows = {}
        for name, runs in rr.items():
            mine = [r for r in runs if r["layout"] == layout]
            rows[name] = {"p50": statistics.median(r["p50"] for r in mine),
                          "p99": statistics.median(r["p99"] for r in mine),
                          "added": statistics.median(r["p50"] - direct[r["round"]] for r in mine),
                          "added_min": min(r["p50"] - direct[r["round"]] for r in mine),
                          "added_mean": statistics.median(r.get("mean", 0) - direct_mean[r["round"]] for r in mine),
                          "cpu": statistics.median(r["relay_cpu_us_per_rt"] for r in mine),
                          "p50_min": min(r["p50"] for r in mine),
                          "cpu_min": min(r["relay_cpu_us_per_rt"] for r in mine)}
        lines.append(f"layout {layout}: path  p50  p99  added-p50  added-mean  relay-CPU/rt (us, medians of {len(direct)})")
        for name, row in rows.items():
            lines.append(f"  {name:8} {row['p50']:8.1f} {row['p99']:8.1f} {row['added']:8.1f} {row['added_mean']:8.1f} "
                         f"{row['cpu']:8.1f}   least disturbed run: p50 {row['p50_min']:.1f}, "
                         f"added {row['p50_min'] - rows['direct']['p50_min']:.1f}, relay CPU {row['cpu_min']:.1f}")
        for a, b in (("ktls", "user"), ("user", "stunnel"), ("ktls", "stunnel"), ("plain", "stunnel"), ("ktls", "plain")):
            if a in rows and b in rows and rows[b]["added"] > 0 and rows[b]["cpu"] > 0:
                lines.append(f"  {a} / {b}: added p50 x{rows[a]['added'] / rows[b]['added']:.2f} "
                             f"(least disturbed runs: x{(rows[a]['p50_min'] - rows['direct']['p50_min']) / (rows[b]['p50_min'] - rows['direct']['p50_min']):.2f}, "
                             f"relay CPU x{rows[a]['cpu_min'] / rows[b]['cpu_min']:.2f}), "
                             f"added mean x{rows[a]['added_mean'] / max(rows[b]['added_mean'], 1e-9):.2f}, "
                             f"relay CPU x{rows[a]['cpu'] / rows[b]['cpu']:.2f}")
    for name, check in result["checks"].items():
        lines.append(f"check {name}: {check}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--kernel", default="6.1")
    parser.add_argument("--debs", type=Path, default=Path("/tmp/ktls-debs"),
                        help="stunnel4 and libwrap0 .debs (`apt-get download stunnel4 libwrap0`)")
    parser.add_argument("--args", default="", help="extra arguments for ktls_bench.py run")
    opts = parser.parse_args()
    sys.path.insert(0, str(REPO))       # the vm tier's machinery (tests/vm), reused as is
    from tests.vm.machine import Machine, close_all, new_run_dir

    image = cached_image(opts.kernel)
    run_dir = new_run_dir("tcpmesh-ktls-")
    machines: list[Machine] = []
    try:
        disk = payload_disk(run_dir / "payload.img", opts.debs)
        machine = Machine("ktls", image, opts.kernel, run_dir, memory_mb=1024, cpus=2, checkout_disk=disk)
        machines.append(machine)
        machine.start()
        print(f"booted {machine.release} ({machine.accel}) in {machine.boot_seconds:.0f} s", flush=True)
        machine.run("mkdir -p /mnt/ktls && mount /dev/vdb /mnt/ktls")
        started = time.monotonic()
        done = machine.run(f"{GUEST_PYTHON} /mnt/ktls/ktls_bench.py run {opts.args}", timeout=1800, check=False)
        print(done.stderr[-4000:], file=sys.stderr)
        if done.rc != 0:
            print(done.stdout[-4000:])
            return 1
        result = json.loads(done.stdout)
        result["guest_seconds"] = round(time.monotonic() - started, 1)
        result["qemu_cpu_seconds"] = machine.cpu_seconds()
        out = HERE / "results" / f"{time.strftime('%Y%m%d-%H%M%S')}-{machine.release}.json"
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps({k: v for k, v in result.items() if k not in ("rr", "checks")}, indent=1))
        if any(result["rr"].values()):
            print(summarise(result))
        print(f"saved {out}")
        return 0
    finally:
        close_all(machines, run_dir)


if __name__ == "__main__":
    sys.exit(main())
