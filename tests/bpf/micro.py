"""The capture's micro-measurement: BPF ns per program run, captured vs straight, nothing else on the path.

    sudo .venv/bin/python -m tests.bpf.micro [--connects 2000] [--blocks 3] [--json]

Not a test (no assertion, never collected): a quieter figure than the bench for docs/capture-costs.md
("What the capture costs"). It builds the bpf tier's world — a node netns and a pod netns joined by
a veth, a per-run cgroup under the cgroup v2 mount with pods/a (the pod, below the guard's pods/)
and proxy/ —, loads the program set of this source tree into a private pin directory, attaches the
pod hooks, the guard and the getsockopt hook, and runs a listener in the node netns (proxy cgroup)
that reads each accepted connection's origin once, as the outbound proxy does. A client process in
the pod makes ``connects`` sequential connect+close to a captured destination (``captured``), then
as many straight to the redirect address (``straight``), ``blocks`` times, interleaved, with BPF
run-time statistics on. Printed per variant: ns per run and runs per connection of each tcpmesh
program (medians over the blocks, min-max), the pod-side BPF time per connection, and connect() p50.
Everything it made is removed at the end, also after a failure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import uuid
from pathlib import Path

from tests.bpf.bpfworld import NODE_IP, REDIRECT_PORT, OriginAcceptor, _enter, mesh_capture, plumb_node_and_pod, remove_namespaces

CAPTURED = ("10.77.2.10", 5432)
STRAIGHT = (NODE_IP, REDIRECT_PORT)

_LOOP = r"""
import json, socket, sys, time
ip, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
times = []
for _ in range(count):
    s = socket.socket()
    s.settimeout(2)
    t = time.perf_counter_ns()
    try:
        s.connect((ip, port))
        times.append(time.perf_counter_ns() - t)
    except OSError:
        pass
    s.close()
times.sort()
print(json.dumps({"ok": len(times), "p50_us": times[len(times) // 2] / 1000 if times else None}), flush=True)
"""


def _loop(pod_ns: str, cgroup: Path, target: tuple[str, int], count: int) -> dict:
    out = subprocess.run([sys.executable, "-c", _LOOP, target[0], str(target[1]), str(count)],
                         preexec_fn=_enter(f"/run/netns/{pod_ns}", cgroup), capture_output=True, text=True,
                         timeout=120)
    if out.returncode != 0:
        raise RuntimeError(f"client loop failed: {out.stderr.strip()[-400:]}")
    return json.loads(out.stdout)


def measure(connects: int, blocks: int, max_connections: int = 65536) -> dict:
    from agent.bpf import pins
    from agent.host.checks import find_cgroup2_mount
    from bench import bpfstats
    from tests.conftest import remove_cgroup_tree

    tag = uuid.uuid4().hex[:6]
    root = Path(find_cgroup2_mount()) / f"tcpmesh-micro-{os.getpid()}-{tag}"
    bpffs = Path(pins.BPFFS_MOUNT) / f"tcpmesh-micro-{os.getpid()}-{tag}"
    node_ns = pod_ns = None
    capture = acceptor = None
    try:
        for sub in ("pods/a", "proxy"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        node_ns, pod_ns = f"tmmic-n-{tag}", f"tmmic-p-{tag}"
        plumb_node_and_pod(node_ns, pod_ns, f"tmmh{tag}", f"tmmp{tag}")
        capture = mesh_capture(NODE_IP, REDIRECT_PORT, ["10.77.0.0/16"], f"/tmp/tcpmesh-micro-{tag}",
                               bpffs_dir=bpffs, max_connections=max_connections)
        capture.load()
        capture.attach_proxy(root / "proxy")
        capture.attach_guard(root / "pods")
        capture.attach_pod(root / "pods" / "a")
        acceptor = OriginAcceptor(f"/run/netns/{node_ns}", root / "proxy", backlog=4096)
        names = bpfstats.programs([root / "pods" / "a", root / "proxy"])
        _loop(pod_ns, root / "pods" / "a", CAPTURED, 200)  # warm-up
        _loop(pod_ns, root / "pods" / "a", STRAIGHT, 200)
        samples: dict[str, list[dict]] = {"captured": [], "straight": []}
        with bpfstats.enabled() as on:
            if not on:
                raise RuntimeError("BPF run-time statistics cannot be enabled here")
            for _ in range(blocks):
                for variant, target in (("captured", CAPTURED), ("straight", STRAIGHT)):
                    before = bpfstats.snapshot(names)
                    loop = _loop(pod_ns, root / "pods" / "a", target, connects)
                    programs = bpfstats.delta(names, before, bpfstats.snapshot(names))
                    for entry in programs.values():
                        entry["runs_per_connection"] = entry["runs"] / max(loop["ok"], 1)
                    samples[variant].append({"loop": loop, "programs": programs})
        result = _summary(samples, sum(origin is not None for origin in acceptor.origins))
        result["counters"] = {k: v for k, v in capture.counters().items() if v}
        return result
    finally:
        if acceptor is not None:
            acceptor.close()
        if capture is not None:
            capture.detach_all()
            capture.close()
        remove_namespaces(pod_ns, node_ns)
        if root.exists():
            remove_cgroup_tree(root)
        pins.remove_tree(bpffs)


POD_SIDE = ("tcpmesh_conn4", "tcpmesh_guard4", "tcpmesh_sockops", "tcpmesh_inb4", "tcpmesh_peer4")


def _summary(samples: dict[str, list[dict]], origins: int) -> dict:
    def spread(values: list[float]) -> dict:
        return {"median": round(statistics.median(values), 1), "min": round(min(values), 1),
                "max": round(max(values), 1)}

    out: dict = {"origins_read": origins}
    for variant, blocks in samples.items():
        names = sorted({n for b in blocks for n in b["programs"]})
        out[variant] = {
            "connect_p50_us": spread([b["loop"]["p50_us"] for b in blocks]),
            "programs": {n: {"ns_per_run": spread([b["programs"][n]["ns_per_run"] or 0 for b in blocks]),
                             "runs_per_connection": round(statistics.median(
                                 b["programs"][n]["runs_per_connection"] for b in blocks), 2)}
                         for n in names},
            "pod_side_ns_per_connection": spread([
                sum(b["programs"][n]["ns"] for n in POD_SIDE if n in b["programs"]) / max(b["loop"]["ok"], 1)
                for b in blocks]),
        }
    out["capture_pod_side_ns_per_connection"] = round(
        out["captured"]["pod_side_ns_per_connection"]["median"]
        - out["straight"]["pod_side_ns_per_connection"]["median"], 1)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bpf.micro", description=__doc__.split("\n")[0])
    parser.add_argument("--connects", type=int, default=2000, help="connects per variant and block")
    parser.add_argument("--blocks", type=int, default=3, help="interleaved captured/straight blocks")
    parser.add_argument("--max-connections", type=int, default=65536, help="TCPMESH_MAX_CONNS (map sizes)")
    parser.add_argument("--json", action="store_true", help="print the raw summary as JSON")
    args = parser.parse_args(argv)
    result = measure(args.connects, args.blocks, args.max_connections)
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    for variant in ("captured", "straight"):
        v = result[variant]
        print(f"{variant}: connect() p50 {v['connect_p50_us']['median']} µs "
              f"({v['connect_p50_us']['min']}-{v['connect_p50_us']['max']}), pod-side BPF "
              f"{v['pod_side_ns_per_connection']['median']} ns/connection")
        for name, p in v["programs"].items():
            r = p["ns_per_run"]
            if not p["runs_per_connection"]:
                continue
            print(f"  {name:16s} {r['median']:8.1f} ns/run ({r['min']}-{r['max']}) x {p['runs_per_connection']}")
    print(f"capture work, pod side: {result['capture_pod_side_ns_per_connection']} ns per connection; "
          f"origins read by the listener: {result['origins_read']}; counters: {result['counters']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
