"""The Kubernetes source finds the pod cgroups kubelet makes — built for real under a test cgroup
(issue #16 part 3): both cgroup drivers, all three QoS classes, each pod with its containers as
child cgroups (the pause sandbox and an application container, a process running in the latter).

systemd driver:  kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid with _>.slice/cri-containerd-<id>.scope
                 (Guaranteed: kubepods.slice/kubepods-pod<uid with _>.slice/…)
cgroupfs driver: kubepods/<qos>/pod<uid>/<id>   (Guaranteed: kubepods/pod<uid>/<id>)

The workload is the pod cgroup — never a container's — so capture and STRICT cover every container
below it; the QoS class from the pod's status is tried first, and a wrong or missing one still finds it.
"""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import pytest

from agent.registry.kubernetes.cgroups import find_pod_cgroup

QOS = ("guaranteed", "burstable", "besteffort")


def pod_dir(root: Path, driver: str, qos: str, uid: str) -> Path:
    if driver == "systemd":
        under = uid.replace("-", "_")
        if qos == "guaranteed":
            return root / "kubepods.slice" / f"kubepods-pod{under}.slice"
        return root / "kubepods.slice" / f"kubepods-{qos}.slice" / f"kubepods-{qos}-pod{under}.slice"
    return root / "kubepods" / (f"pod{uid}" if qos == "guaranteed" else f"{qos}/pod{uid}")


def container_dir(pod: Path, driver: str, container_id: str) -> Path:
    return pod / (f"cri-containerd-{container_id}.scope" if driver == "systemd" else container_id)


@pytest.mark.parametrize("driver", ["systemd", "cgroupfs"])
def test_pods_of_every_qos_class_are_found_at_the_pod_level(test_cgroup, driver):
    pods = {qos: str(uuid.uuid4()) for qos in QOS}
    sleepers = []
    try:
        for qos, uid in pods.items():
            pod = pod_dir(test_cgroup, driver, qos, uid)
            for _ in ("sandbox", "app"):
                container_dir(pod, driver, uuid.uuid4().hex + uuid.uuid4().hex).mkdir(parents=True)
            app = sorted(p for p in pod.iterdir() if p.is_dir())[-1]
            sleeper = subprocess.Popen(["sleep", "60"])
            sleepers.append(sleeper)
            (app / "cgroup.procs").write_text(str(sleeper.pid))
        for qos, uid in pods.items():
            expected = str(pod_dir(test_cgroup, driver, qos, uid))
            assert find_pod_cgroup(str(test_cgroup), uid, qos.capitalize()) == expected
            assert find_pod_cgroup(str(test_cgroup), uid, "") == expected  # QoS unknown: every class tried
            wrong = next(q for q in QOS if q != qos)
            assert find_pod_cgroup(str(test_cgroup), uid, wrong) == expected
            in_subtree = [p for p in Path(expected).rglob("cgroup.procs") if p.read_text().split()]
            assert in_subtree, f"the pod cgroup {expected} must hold its container's process below it"
        assert find_pod_cgroup(str(test_cgroup), str(uuid.uuid4()), "burstable") is None
    finally:
        for sleeper in sleepers:
            sleeper.kill()
            sleeper.wait()
