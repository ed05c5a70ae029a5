"""Attack: plaintext into a STRICT workload whose server runs in a container cgroup (issue 14, item 2).

Kubernetes puts every container in a child cgroup of the pod cgroup; processes never run in the pod
cgroup itself. The registry names the pod cgroup, and STRICT is set for it — so a check that looks
only at the listening socket's own cgroup finds no mode for the container's cgroup and lets plaintext
in. The attacker sends plaintext SYNs to a server in a container cgroup of a STRICT pod from three
places: a process on another node, a process on the pod's own node, and a process in an un-meshed
pod's network namespace. All must be dropped and counted for the workload; the same server must
still be reachable through the mesh. A PERMISSIVE workload's plaintext is counted for the workload
too (the counters of docs/policy.md), wherever in its cgroup subtree the server runs.
"""

from __future__ import annotations

import os
import textwrap
import time
import uuid

import pytest

from agent.lab import lab as labops
from tests.e2e.conftest import Lab
from tests.hostile.conftest import admin_get, plaintext_connect

PORT = 7420
RELOAD = 2.0 + 3.0


@pytest.fixture(scope="module")
def lab(bpf_capable):
    """2 nodes x 2 pods, kubelet-shaped (docs/lab.md): the servers run in each pod's app container."""
    name = f"hc{uuid.uuid4().hex[:6]}"
    lab = None
    try:
        lab = Lab(name, labops.lab_up(name, 2, 2, "hc.tcpmesh"))
        for pod in ("n2p1", "n2p2"):
            assert lab.pod(pod).exec_cgroup.startswith(lab.pod(pod).cgroup + "/"), "the lab's pods must be kubelet-shaped"
            lab.start_server(pod, PORT, "digest")
        yield lab
    finally:
        if lab is not None:
            lab.stop_apps()
        labops.lab_down(name)


def strict(lab, pod: str) -> None:
    path = f"{lab.plan.state_dir}/policies/strict-{pod}.yaml"
    with open(path + ".tmp", "w") as f:
        f.write(textwrap.dedent(f"""\
            kind: PeerAuthentication
            metadata: {{name: strict-{pod}, namespace: lab}}
            spec:
              selector: {{workload: {pod}}}
              mtls: {{mode: STRICT}}
            """))
    os.replace(path + ".tmp", path)


def plaintext_counter(lab, kind: str, workload: str) -> float:
    status, body = admin_get(lab.node(2), "/metrics")
    assert status == 200
    for line in body.splitlines():
        if line.startswith(f"tcpmesh_plaintext_{kind}_total{{") and f'workload="{workload}"' in line:
            return float(line.split()[-1])
    return 0.0


def attackers(lab) -> dict[str, str]:
    """Where plaintext comes from: another node, the pod's own node, an un-meshed pod's netns."""
    return {"another node": lab.node(1).netns, "its own node": lab.node(2).netns,
            "an un-meshed pod": lab.pod("n1p2").netns}


def meshed_reply(lab, pod: str) -> bool:
    result = lab.run_client("n1p1", f"{lab.pod(pod).ip}:{PORT}", 1000, "digest", name="hc-meshed")
    return "error" not in result and result["reply"].split()[:1] == [result["sent_sha256"]]


def test_plaintext_into_a_container_of_a_strict_pod_is_dropped_and_counted(lab):
    target = (lab.pod("n2p1").ip, PORT)
    strict(lab, "n2p1")
    deadline = time.monotonic() + RELOAD
    while "STRICT" not in open(lab.node(2).log_file).read().split("workload lab/n2p1 inbound mode:")[-1][:12]:
        assert time.monotonic() < deadline, "the agent never set n2p1 STRICT"
        time.sleep(0.2)
    before = plaintext_counter(lab, "rejected", "n2p1")
    outcomes = {who: plaintext_connect(netns, target) for who, netns in attackers(lab).items()}
    assert outcomes == {who: "TimeoutError" for who in outcomes}, \
        f"plaintext into a container cgroup of a STRICT pod: {outcomes}"
    assert plaintext_counter(lab, "rejected", "n2p1") >= before + len(outcomes), "the drops were not counted"
    assert meshed_reply(lab, "n2p1"), "the STRICT workload must stay reachable through the mesh"


def test_plaintext_into_a_container_of_a_permissive_pod_is_counted_for_the_workload(lab):
    target = (lab.pod("n2p2").ip, PORT)
    before = plaintext_counter(lab, "accepted", "n2p2")
    assert plaintext_connect(lab.node(2).netns, target) == "connected"
    assert plaintext_counter(lab, "accepted", "n2p2") >= before + 1, \
        "plaintext into a container of a PERMISSIVE pod was not counted for its workload"
