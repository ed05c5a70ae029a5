"""The lab's issuer (``lab up``, the default ``--identity issuer``): two replicas in a network namespace of their own, and
nodes that hold no signing key (docs/lab.md, docs/identity.md "The issuer").

    issuer netns  tcpmesh-<lab>-issuer   tmwire 10.76.0.250/24 on the lab bridge (port tmissuer)
    replicas      issuer-0 :15012 (metrics :15022), issuer-1 :15013 (metrics :15023), same files:
                  <state>/issuer/ca (issuer.crt, issuer.key, bundle.pem), token.key, spent/, the lab registry
    cgroup        <lab cgroup>/issuer
    per node      <node state>/credential/ (bundle.pem; the agent writes its node credential there at join)
                  <node state>/join-token  (a one-time bootstrap token for that node, 0600)

The root CA stays in <state>/ca (the operator's machine in a real cluster), never in a node's directory.
Replicas are started and stopped exactly as agents are (``agents.start_agent``'s checks on PIDs).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from agent.identity.files import write_file_atomic
from agent.lab import agents, cgroups, files, nsenter
from agent.lab import netns_plumbing as nl
from agent.lab.errors import LabError
from agent.lab.topology import WIRE_PREFIXLEN, WIRE_SUBNET_PREFIX, LabPlan, NodePlan, lab_netns_name

ISSUER_ADDRESS = f"{WIRE_SUBNET_PREFIX}.250"
REPLICAS = 2
FIRST_PORT = 15012
FIRST_METRICS_PORT = 15022
BRIDGE_PORT = "tmissuer"
TOKEN_TTL_SECONDS = 3600
MAX_NODES_WITH_ISSUER = 249
LAB_FIRST_SVID_WAIT_SECONDS = 60  # an agent turns ready once its pods have SVIDs (or after this)


@dataclass(frozen=True)
class Replica:
    name: str
    port: int
    metrics_port: int
    config_file: str
    log_file: str


def netns(plan: LabPlan) -> str:
    return lab_netns_name(plan.name, "issuer")


def directory(plan: LabPlan) -> str:
    return f"{plan.state_dir}/issuer"


def replicas(plan: LabPlan) -> tuple[Replica, ...]:
    return tuple(Replica(f"issuer-{i}", FIRST_PORT + i, FIRST_METRICS_PORT + i, f"{directory(plan)}/issuer-{i}.yaml",
                         f"{plan.state_dir}/logs/issuer-{i}.log") for i in range(REPLICAS))


def addresses(plan: LabPlan) -> list[str]:
    return [f"{ISSUER_ADDRESS}:{r.port}" for r in replicas(plan)]


def credential_dir(node: NodePlan) -> str:
    return f"{node.state_dir}/credential"


def token_file(node: NodePlan) -> str:
    return f"{node.state_dir}/join-token"


def agent_identity(plan: LabPlan, node: NodePlan, poll_seconds: float, svid_ttl_seconds: int | None) -> dict[str, Any]:
    """The ``identity`` section of a lab agent in issuer mode."""
    section: dict[str, Any] = {"mode": "issuer", "poll_seconds": poll_seconds,
                               "issuer": {"addresses": addresses(plan), "credential_dir": credential_dir(node),
                                          "bootstrap_token_file": token_file(node), "timeout_seconds": 3,
                                          # ready means every pod's SVID is in: nothing else in the lab waits
                                          "first_svid_wait_seconds": LAB_FIRST_SVID_WAIT_SECONDS}}
    if svid_ttl_seconds is not None:
        section.update(svid_ttl_seconds=svid_ttl_seconds, dev_short_ttl=svid_ttl_seconds < 60)
    return section


def issuer_config(plan: LabPlan, replica: Replica, svid_ttl_seconds: int | None) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "trust_domain": plan.trust_domain, "name": replica.name, "ca_dir": f"{directory(plan)}/ca",
        "listen": {"address": ISSUER_ADDRESS, "port": replica.port},
        "registry": {"source": "file", "file": plan.registry_file, "poll_seconds": 1},
        "tokens": {"key_file": f"{directory(plan)}/token.key", "spent_dir": f"{directory(plan)}/spent"},
        "metrics": {"address": ISSUER_ADDRESS, "port": replica.metrics_port},
    }
    if svid_ttl_seconds is not None:
        doc.update(max_svid_ttl_seconds=max(svid_ttl_seconds, 2), node_svid_ttl_seconds=max(4 * svid_ttl_seconds, 60),
                   dev_short_ttl=svid_ttl_seconds < 60)
    return doc


def provision(plan: LabPlan, svid_ttl_seconds: int | None) -> None:
    """Root (in the lab's ca dir), the issuer's directory and token key, and each node's token and bundle."""
    from agent.identity.ca import init_ca
    from agent.identity.issuer_ca import issue_issuer_files
    from agent.issuer.tokens import create_token_key, load_token_key, make_token

    if len(plan.nodes) > MAX_NODES_WITH_ISSUER:
        raise LabError(f"--identity issuer supports at most {MAX_NODES_WITH_ISSUER} nodes (the issuer takes "
                       f"{ISSUER_ADDRESS}); use fewer nodes")
    init_ca(plan.trust_domain, plan.ca_dir)
    os.makedirs(directory(plan), mode=0o700, exist_ok=True)
    issue_issuer_files(plan.ca_dir, f"{directory(plan)}/ca")
    create_token_key(f"{directory(plan)}/token.key")
    key = load_token_key(f"{directory(plan)}/token.key")
    root_pem = open(f"{plan.ca_dir}/ca.crt").read()
    for node in plan.nodes:
        os.makedirs(credential_dir(node), mode=0o700, exist_ok=True)
        write_file_atomic(Path(credential_dir(node), "bundle.pem"), root_pem.encode(), 0o644)
        token = make_token(key, node.name, time.time(), TOKEN_TTL_SECONDS) + "\n"
        write_file_atomic(Path(token_file(node)), token.encode(), 0o600)
    write_replica_configs(plan, svid_ttl_seconds)


def write_replica_configs(plan: LabPlan, svid_ttl_seconds: int | None) -> None:
    os.makedirs(directory(plan), mode=0o700, exist_ok=True)
    for replica in replicas(plan):
        config = yaml.safe_dump(issuer_config(plan, replica, svid_ttl_seconds), sort_keys=False)
        write_file_atomic(Path(replica.config_file), config.encode(), 0o600)


def build_network(plan: LabPlan) -> None:
    name = netns(plan)
    nl.ensure_netns(name)
    nl.set_up(name, "lo")
    nl.ensure_veth(name, "tmwire", plan.wire_netns, BRIDGE_PORT)
    nl.set_up(plan.wire_netns, BRIDGE_PORT, master=plan.bridge)
    nl.ensure_address(name, "tmwire", ISSUER_ADDRESS, WIRE_PREFIXLEN)
    nl.set_up(name, "tmwire")


def cgroup(plan: LabPlan) -> str:
    return f"{plan.cgroup}/issuer"


def start_replica(plan: LabPlan, replica: Replica) -> tuple[subprocess.Popen, agents.AgentRecord]:
    argv = [sys.executable, "-m", "agent", "issuer", "run", "--config", replica.config_file]
    cgroups.ensure_cgroup(cgroup(plan))
    os.makedirs(os.path.dirname(replica.log_file), exist_ok=True)
    with open(replica.log_file, "ab") as log:
        proc = nsenter.popen_in(argv, netns=netns(plan), cgroup=cgroup(plan), stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True, cwd=directory(plan))
    starttime = agents.process_starttime(proc.pid)
    if starttime is None:
        raise LabError(f"{replica.name} (pid {proc.pid}) vanished right after start; see {replica.log_file}")
    return proc, agents.AgentRecord(proc.pid, tuple(argv), starttime)


def wait_ready(plan: LabPlan, started: Mapping[str, subprocess.Popen], timeout: float = 60.0) -> None:
    """Until every replica's /metrics answers (it listens for agents before it serves metrics)."""
    by_name = {r.name: r for r in replicas(plan)}
    pending = dict(started)
    deadline = time.monotonic() + timeout
    while pending:
        for name, proc in list(pending.items()):
            replica = by_name[name]
            if proc.poll() is not None:
                raise LabError(f"{name} exited with code {proc.returncode}; its log is {replica.log_file}:\n"
                               f"{agents.log_tail(replica.log_file)}")
            try:
                status, _ = nsenter.http_get_in_netns(netns(plan), f"http://{ISSUER_ADDRESS}:{replica.metrics_port}/metrics",
                                                      timeout=1.0)
                if status == 200:
                    del pending[name]
            except OSError:
                pass
        if pending and time.monotonic() >= deadline:
            name = next(iter(pending))
            raise LabError(f"{name} was not ready after {timeout:.0f}s; its log is {by_name[name].log_file}:\n"
                           f"{agents.log_tail(by_name[name].log_file)}")
        time.sleep(0.2)
