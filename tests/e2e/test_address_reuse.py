"""An address reused by a new pod (docs/registry.md "An address reused by a new pod"), on the lab:
pod A leaves the registry and pod B, another identity, takes A's address — on the client side
(n1p2 → n1p2b) and the server side (n2p1 → n2p1b) at once, through one version of the registry file.

What must not survive A: its authorization (a DENY naming A's identity no longer applies to the
address; a DENY naming B's does, at once), its identity on either end of a flow (both nodes record
B's workload and principal, with mutual TLS — node1 dials the server's node expecting B's identity,
node2 sees B's certificate on the tunnel), and its metric series.
"""

from __future__ import annotations

import os

import yaml

from tests.e2e.conftest import module_lab
from tests.e2e.test_policy import wait_decision, write_policy
from tests.e2e.test_workloads_at_runtime import listed, wait_until

PORT = 7200  # test_policy's helpers dial n2p1's address on this port


reuse_lab = module_lab("reuse_lab", "ru", 2, 2, "ru.tcpmesh", servers=[("n2p1", PORT, "digest")])


def deny(name: str, workload: str, principal: str) -> str:
    return f"""\
        kind: AuthorizationPolicy
        metadata: {{name: {name}, namespace: lab}}
        spec:
          selector: {{workload: {workload}}}
          action: DENY
          rules:
            - from: [{{principals: ["{principal}"]}}]
        """


def reuse_addresses(lab, renames: dict[str, tuple[str, str]]) -> None:
    """One new version of the registry file: each pod of ``renames`` becomes another workload
    (name, service account) at the same address and cgroup."""
    path = lab.plan.registry_file
    doc = yaml.safe_load(open(path).read())
    for entry in doc["workloads"]:
        if entry["name"] in renames:
            entry["name"], entry["service_account"] = renames[entry["name"]]
    with open(path + ".tmp", "w") as f:
        f.write(yaml.safe_dump(doc))
    os.replace(path + ".tmp", path)


def series_naming(lab, node: int, names: set[str]) -> list[str]:
    return [line for line in lab.metrics_text(node).splitlines() if not line.startswith("#")
            and any(f'workload="{name}"' in line for name in names)]


def test_a_reused_address_is_the_new_pods_on_both_ends(reuse_lab):
    lab = reuse_lab
    old_client, old_server = lab.pod("n1p2"), lab.pod("n2p1")
    write_policy(lab, "old-client.yaml", deny("old-client", "n2p1", old_client.spiffe_id))
    wait_decision(lab, "n1p2", allowed=False)
    assert series_naming(lab, 1, {"n1p2"}) and series_naming(lab, 2, {"n2p1"})

    reuse_addresses(lab, {"n1p2": ("n1p2b", "reuser-client"), "n2p1": ("n2p1b", "reuser-server")})
    for node in (1, 2):
        wait_until(lambda: {"n1p2b", "n2p1b"} <= set(listed(lab, node)) and "n1p2" not in listed(lab, node))
    new_client = "spiffe://ru.tcpmesh/ns/lab/sa/reuser-client"
    new_server = "spiffe://ru.tcpmesh/ns/lab/sa/reuser-server"

    # the address is B's now: A's DENY is not B's, and the flow is B to B on both nodes
    result = wait_decision(lab, "n1p2", allowed=True)
    port = result["local"][1]
    source = lab.wait_flow(1, lambda f: f.get("source_port") == port)
    destination = lab.wait_flow(2, lambda f: f["flow_id"] == source["flow_id"])
    for flow in (source, destination):
        assert (flow["source_workload"], flow["source_principal"]) == ("n1p2b", new_client), flow
        assert (flow["destination_workload"], flow["destination_principal"]) == ("n2p1b", new_server), flow
        assert flow["security"] == "mutual_tls" and flow["response_flags"] == "-", flow
        assert flow["source_ip"] == old_client.ip and flow["destination_ip"] == old_server.ip, flow
    assert not series_naming(lab, 1, {"n1p2", "n2p1"}), "node1 kept series of the departed pods"
    assert not series_naming(lab, 2, {"n1p2", "n2p1"}), "node2 kept series of the departed pods"

    # B's own authorization applies at once: a DENY naming B's identities at B's workload
    write_policy(lab, "new-client.yaml", deny("new-client", "n2p1b", new_client))
    wait_decision(lab, "n1p2", allowed=False)
    wait_decision(lab, "n1p1", allowed=True)
