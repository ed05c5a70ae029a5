"""The lab's operations: ``lab_up``, ``lab_down``, ``lab_status``, ``lab_exec``. The one place that wires
topology (the plan), network, cgroups, files and agents together.

State lives under ``<state root>/<name>/`` (default /run/tcpmesh-lab/<name>, layout in docs/lab.md).
state.json is rewritten after every step of ``lab_up``, so a crash leaves a record of what was
started; ``lab_down`` also finds leftovers without it, by listing prefixed namespaces and the lab's
cgroup directory. ``lab_down`` only ever signals PIDs recorded in state.json, after checking them.

A lab made in-process records its owner (this process; agent/lab/owner.py). ``lab_up`` first reaps
every lab whose recorded owner is gone (a run cut by SIGKILL): ``reap_orphaned_labs`` runs the
``lab_down`` teardown on it, also killing what is left in its own cgroup tree, and logs which lab and why.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import shutil
import subprocess
from typing import Any, Mapping, NoReturn, Sequence

import yaml

from agent.host import checks
from agent.errors import TcpmeshError
from agent.lab import agents, cgroups, files, network, nsenter
from agent.lab import issuer as issuer_lab
from agent.lab import owner as lab_owner
from agent.lab.errors import LabError, LabNotFound
from agent.mounts import cgroup_root_path
from agent.lab.topology import (DEFAULT_LAB_NAME, DEFAULT_NAMESPACE, DEFAULT_STATE_ROOT, DEFAULT_TRUST_DOMAIN,
                                LabPlan, NodePlan, lab_bpffs_dir, lab_cgroup, lab_state_dir, plan_lab, validate_lab_name)

STATUS_VERSION = 1
DEFAULT_IDENTITY = "issuer"
IDENTITY_MODES = ("issuer", "node_ca")
STATUS_ASK_SECONDS = 3.0  # `lab status` asks each live agent for its status; a stuck one costs this much
OWNER_SELF = 0  # lab_up(owner_pid=...): this process owns the lab (PID 0 is never a process)
log = logging.getLogger(__name__)


class CommandNotFound(LabError):
    """``lab exec`` could not exec the command (not found or not executable)."""
LOGS_DIR = "logs"


# ---------------------------------------------------------------------------------------------- up

def lab_up(name: str = DEFAULT_LAB_NAME, nodes: int = 2, pods_per_node: int = 2,
           trust_domain: str = DEFAULT_TRUST_DOMAIN, *, agents_enabled: bool = True,
           namespace: str = DEFAULT_NAMESPACE, service_accounts: Mapping[str, str] | None = None,
           capture_mode: str = files.DEFAULT_CAPTURE_MODE, agent_argv: Sequence[str] | None = None,
           ready_timeout: float = agents.DEFAULT_READY_TIMEOUT, state_root: str = DEFAULT_STATE_ROOT,
           cgroup_root: str | None = None, flat_pods: bool = False, identity: str = DEFAULT_IDENTITY,
           svid_ttl_seconds: int | None = None, owner_pid: int | None = OWNER_SELF,
           reap_orphans: bool = True) -> LabPlan:
    """Build the lab, write its files, start (unless ``agents_enabled=False``) and wait for one agent per node.

    ``identity="issuer"``: the issuer runs (two replicas) in a namespace of its own and no node holds a
    signing key (agent/lab/issuer.py); ``svid_ttl_seconds`` shortens SVIDs (tests).

    Pods are kubelet-shaped (a pod cgroup with one child per container, processes only in the
    children) unless ``flat_pods`` (processes in the pod cgroup itself).

    ``owner_pid``: the process that will take the lab down (default this one; None: nobody, the lab
    lives until `lab down`). Once it is gone, the next ``lab_up`` reaps the lab (``reap_orphans``,
    which first reaps the orphans of others).

    On any failure everything is torn down again (agent logs are kept, but for an interrupt) and the error is
    re-raised.
    """
    cgroup2 = checks.host_cgroup2()  # resolved as capture.cgroup_root auto is (agent.mounts)
    checks.require(checks.netns_problem(), checks.cgroup2_problem(cgroup_root, cgroup2))
    cgroup_root = cgroup_root_path(cgroup_root, cgroup2)
    plan = plan_lab(name, nodes, pods_per_node, trust_domain, namespace=namespace,
                    service_accounts=service_accounts, cgroup_root=cgroup_root, state_root=state_root,
                    flat_pods=flat_pods)
    owner = lab_owner.owner_record(os.getpid() if owner_pid == OWNER_SELF else owner_pid) \
        if owner_pid is not None else None
    if reap_orphans:
        reap_orphaned_labs(state_root, cgroup_root=cgroup_root)
    _refuse_existing(plan)
    if identity not in IDENTITY_MODES:
        raise LabError(f"--identity {identity!r}: use issuer (nodes hold no signing key; the default) or node-ca "
                       "(legacy node intermediates)")
    ca_init = _ca_initialiser(required=agents_enabled)
    issuers: dict[str, agents.AgentRecord] = {}
    record = dict(nodes=nodes, pods_per_node=pods_per_node, service_accounts=dict(service_accounts or {}),
                  state_root=state_root, agents_requested=agents_enabled, capture_mode=capture_mode,
                  flat_pods=flat_pods, identity=identity, svid_ttl_seconds=svid_ttl_seconds, issuers=issuers,
                  created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  owner=owner.to_json() if owner else None)
    started: dict[str, agents.AgentRecord] = {}
    try:
        _prepare_state_dir(plan)
        _write_state(plan, record, phase="network", ca_dir=None, started=started)
        network.build_network(plan)
        for node in plan.nodes:
            cgroups.ensure_cgroup(node.agent_cgroup)
            for pod in node.pods:
                cgroups.ensure_cgroup(pod.cgroup)
                for container in pod.containers:
                    cgroups.ensure_cgroup(container)
        ca_dir = None
        if identity == "issuer":
            issuer_lab.build_network(plan)
            issuer_lab.provision(plan, svid_ttl_seconds)
            ca_dir = plan.ca_dir
        elif ca_init is not None:
            ca_init(plan.trust_domain, plan.ca_dir, [(n.name, files.node_ca_dir(n)) for n in plan.nodes])
            ca_dir = plan.ca_dir
        _write_files(plan, capture_mode, identity, svid_ttl_seconds)
        _write_state(plan, record, phase="agents", ca_dir=ca_dir, started=started)
        if identity == "issuer":
            procs_i = {}
            for replica in issuer_lab.replicas(plan):
                procs_i[replica.name], issuers[replica.name] = issuer_lab.start_replica(plan, replica)
                _write_state(plan, record, phase="agents", ca_dir=ca_dir, started=started)
            issuer_lab.wait_ready(plan, procs_i)
        if agents_enabled:
            procs = {}
            for node in plan.nodes:
                proc, started[node.name] = agents.start_agent(node, agent_argv)
                procs[node.name] = (node, proc)
                _write_state(plan, record, phase="agents", ca_dir=ca_dir, started=started)
            agents.wait_ready(procs, ready_timeout)   # issuer mode: ready means every pod's SVID is in
        _write_state(plan, record, phase="up", ca_dir=ca_dir, started=started)
    except BaseException as exc:
        try:   # the agents' logs are kept to explain a failure; an interrupt (Ctrl-C, SIGTERM) leaves nothing
            lab_down(name, state_root=state_root, cgroup_root=cgroup_root,
                     keep_logs=agents_enabled and not isinstance(exc, KeyboardInterrupt))
        except TcpmeshError as cleanup_error:
            raise LabError(f"{exc}\n(and cleaning up after it failed too: {cleanup_error})") from exc
        if isinstance(exc, TcpmeshError) and agents_enabled:
            raise LabError(f"{exc}\nlab {name!r} was torn down; agent logs were kept under "
                           f"{plan.state_dir}/{LOGS_DIR}/ (`tcpmesh lab down --name {name}` removes them)") from exc
        raise
    return plan


def _refuse_existing(plan: LabPlan) -> None:
    leftovers = _leftovers(plan.name, plan.state_dir, plan.cgroup)
    if leftovers:
        raise LabError(f"lab {plan.name!r} already exists ({'; '.join(leftovers)}): "
                       f"run `tcpmesh lab down --name {plan.name}` first, or pick another --name")


def _leftovers(name: str, state_dir: str, cgroup: str) -> list[str]:
    found = []
    if os.path.exists(os.path.join(state_dir, "state.json")):
        found.append(f"state file {state_dir}/state.json")
    netns = network.lab_netns_present(name)
    if netns:
        found.append(f"network namespaces {', '.join(netns)}")
    if os.path.isdir(cgroup):
        found.append(f"cgroup {cgroup}")
    pins_dir = lab_bpffs_dir(name)
    if os.path.isdir(pins_dir):
        found.append(f"pinned BPF objects {pins_dir}")
    return found


def _ca_initialiser(required: bool):
    """The lab's `tcpmesh ca init` plus one `tcpmesh ca issue-node` per node (each agent holds only its own)."""
    try:
        from agent.identity.ca import init_ca
        from agent.identity.node_ca import issue_node_files
    except ImportError as exc:
        if required:
            raise LabError(f"cannot create the lab's CA: agent.identity is not importable ({exc}); "
                           "use --no-agents to build the network only") from exc
        return None

    def init(trust_domain: str, root_dir: str, nodes: list[tuple[str, str]]) -> None:
        init_ca(trust_domain, root_dir)
        for node, out_dir in nodes:
            issue_node_files(root_dir, node, out_dir)

    return init


def _prepare_state_dir(plan: LabPlan) -> None:
    os.makedirs(plan.state_dir, mode=0o700, exist_ok=True)
    shutil.rmtree(os.path.join(plan.state_dir, LOGS_DIR), ignore_errors=True)  # logs of an earlier failed up
    os.makedirs(f"{plan.state_dir}/policies", exist_ok=True)  # policy.dir of every node: it must exist
    os.chmod(f"{plan.state_dir}/policies", 0o755)  # whatever the umask: the agent refuses a policy.dir others may write
    for node in plan.nodes:
        os.makedirs(node.state_dir, exist_ok=True)
        os.makedirs(os.path.dirname(node.log_file), exist_ok=True)


def _write_files(plan: LabPlan, capture_mode: str, identity: str = "node_ca",
                 svid_ttl_seconds: int | None = None) -> None:
    _atomic_write(plan.registry_file, yaml.safe_dump(files.registry_document(plan), sort_keys=False))
    for node in plan.nodes:
        section = (issuer_lab.agent_identity(plan, node, files.LAB_IDENTITY_POLL_SECONDS, svid_ttl_seconds)
                   if identity == "issuer" else None)
        _atomic_write(node.config_file, yaml.safe_dump(files.agent_config(plan, node, capture_mode, identity=section),
                                                       sort_keys=False))


def _write_state(plan: LabPlan, record: Mapping[str, Any], *, phase: str, ca_dir: str | None,
                 started: Mapping[str, agents.AgentRecord]) -> None:
    fields = {k: v for k, v in record.items() if k != "issuers"}
    doc = files.state_document(plan, phase=phase, ca_dir=ca_dir,
                               agents={n: r.to_json() for n, r in started.items()},
                               issuers={n: r.to_json() for n, r in record.get("issuers", {}).items()}, **fields)
    _atomic_write(plan.state_file, json.dumps(doc, indent=2) + "\n")


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)   # whatever the umask: the issuer refuses a registry others may write (agent/filetrust.py)
    os.replace(tmp, path)


# -------------------------------------------------------------------------------------------- down

def lab_down(name: str = DEFAULT_LAB_NAME, *, state_root: str = DEFAULT_STATE_ROOT, cgroup_root: str | None = None,
             keep_logs: bool = False, stop_timeout: float = agents.DEFAULT_STOP_TIMEOUT,
             archive_root: str | None = None, kill_strays: bool = False) -> dict[str, Any]:
    """Stop the recorded agents, remove the namespaces, the cgroup tree and the state dir. Safe to repeat.

    ``kill_strays`` (a reap: the owner is gone) also SIGKILLs whatever still runs in the lab's own
    cgroup tree after the agents stopped (the pods' processes of a run that was killed).

    With ``archive_root`` (what `tcpmesh lab down` passes), each node's access/audit log and its key
    are first copied to ``<archive_root>/<name>-<UTC time>/<node>/`` (report["archive"]): an audit trail
    outlives the lab.

    Works without state.json (after a crash) by listing. Raises LabError if something had to stay,
    e.g. a cgroup still holding processes the lab did not start (their PIDs are in the message).
    """
    validate_lab_name(name)
    checks.require(checks.root_problem())
    state_dir = lab_state_dir(state_root, name)
    state, problem = _read_state(state_dir)
    if state is not None:
        cgroup_root = state.get("inputs", {}).get("cgroup_root") or cgroup_root
    cgroup_root = cgroup_root or checks.find_cgroup2_mount() or ""
    records = {}
    if state is not None:
        try:
            records = {n: agents.AgentRecord.from_json(r) for n, r in (state.get("agents") or {}).items()}
        except (KeyError, TypeError, ValueError):
            problem = f"{state_dir}/state.json has unreadable agent records; no process was signalled"
    stopped = agents.stop_agents(records, stop_timeout)
    if state is not None:
        try:
            issuer_records = {n: agents.AgentRecord.from_json(r) for n, r in (state.get("issuers") or {}).items()}
        except (KeyError, TypeError, ValueError):
            issuer_records = {}
            problem = f"{state_dir}/state.json has unreadable issuer records; no issuer was signalled"
        stopped += agents.stop_agents(issuer_records, stop_timeout)
    killed = cgroups.kill_tree(lab_cgroup(cgroup_root, name)) if kill_strays and cgroup_root else []
    removed_netns = network.remove_network(name)
    busy = cgroups.remove_tree(lab_cgroup(cgroup_root, name)) if cgroup_root else []
    removed_pins = _remove_pins(name)  # after the cgroups: their removal released every attachment
    report: dict[str, Any] = {"name": name, "stopped_pids": stopped, "killed_pids": killed,
                              "removed_netns": removed_netns,
                              "removed_pins": removed_pins,
                              "busy_cgroups": [{"path": b.path, "pids": list(b.pids)} for b in busy],
                              "state_file": state is not None, "problems": [problem] if problem else []}
    if busy:
        raise LabError(_busy_message(name, busy))
    if os.path.isdir(state_dir):
        if archive_root:
            report["archive"] = archive_access_logs(state_dir, archive_root, name)
        _remove_state_dir(state_dir, keep_logs)
    return report


def reap_orphaned_labs(state_root: str = DEFAULT_STATE_ROOT, *, cgroup_root: str | None = None) -> list[dict[str, Any]]:
    """Take down every lab under ``state_root`` whose recorded owner is gone (agent/lab/owner.py), as
    ``lab_down`` does plus killing its cgroup's leftovers; log each (which lab, why, what was removed).
    A lab whose owner lives, or that records none, is never touched; a lab another process is reaping
    right now (its state dir is locked) is skipped. A lab that cannot be removed is logged, not raised:
    another run's leftovers must not stop this one. Returns one {name, reason, report | error} per lab."""
    reaped = []
    for name, reason in lab_owner.orphaned_labs(state_root):
        state_dir = lab_state_dir(state_root, name)
        try:
            fd = os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            continue   # removed meanwhile
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue   # another process is reaping it
            state, _ = _read_state(state_dir)
            reason = lab_owner.orphan_reason(state) if state is not None else None
            if reason is None:
                continue   # taken down meanwhile
            log.warning("reaping lab %r under %s: %s", name, state_root, reason)
            try:
                report = lab_down(name, state_root=state_root, cgroup_root=cgroup_root, kill_strays=True)
            except TcpmeshError as exc:
                log.error("could not reap lab %r: %s", name, exc)
                reaped.append({"name": name, "reason": reason, "error": str(exc)})
                continue
            log.warning("reaped lab %r: stopped agents %s, killed %s, removed %d namespaces", name,
                        report["stopped_pids"], report["killed_pids"], len(report["removed_netns"]))
            reaped.append({"name": name, "reason": reason, "report": report})
        finally:
            os.close(fd)
    return reaped


def archive_access_logs(state_dir: str, archive_root: str, name: str,
                        now: datetime.datetime | None = None) -> str | None:
    """Copy every node's log/ (the access log and its rotations) and audit.key to a new 0700 directory
    ``<archive_root>/<name>-<UTC time>/<node>/``; its path, or None when no node had any."""
    nodes_dir = os.path.join(state_dir, "nodes")
    stamp = (now or datetime.datetime.now(datetime.timezone.utc)).strftime("%Y%m%dT%H%M%SZ")
    target = os.path.join(archive_root, f"{name}-{stamp}")
    copied = False
    for node in sorted(os.listdir(nodes_dir)) if os.path.isdir(nodes_dir) else []:
        node_dir = os.path.join(nodes_dir, node)
        sources = []
        log_dir = os.path.join(node_dir, "log")
        if os.path.isdir(log_dir):
            sources += [os.path.join(log_dir, f) for f in sorted(os.listdir(log_dir))]
        sources += [p for p in [os.path.join(node_dir, "audit.key")] if os.path.isfile(p)]
        sources = [p for p in sources if os.path.isfile(p)]
        if not sources:
            continue
        os.makedirs(os.path.join(target, node), mode=0o700, exist_ok=True)
        os.chmod(target, 0o700)
        for path in sources:
            shutil.copy2(path, os.path.join(target, node, os.path.basename(path)))
        copied = True
    return target if copied else None


def _remove_pins(name: str) -> list[str]:
    """Unpin every node's programs and maps (/sys/fs/bpf/tcpmesh-lab-<name>); nothing if bpffs is absent."""
    from pathlib import Path

    from agent.bpf import pins

    return pins.remove_tree(Path(lab_bpffs_dir(name)))


def _busy_message(name: str, busy: list[cgroups.BusyCgroup]) -> str:
    lines = [f"lab {name!r}: these cgroups still hold processes the lab did not start, so they were kept:"]
    for b in busy:
        who = ", ".join(f"{pid} ({_comm(pid)})" for pid in b.pids) or "processes that are still exiting"
        lines.append(f"  {b.path}: {who}")
    lines.append(f"stop them (e.g. `kill {' '.join(str(p) for b in busy for p in b.pids)}`) and run "
                 f"`tcpmesh lab down --name {name}` again")
    return "\n".join(lines)


def _comm(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/comm").read().strip()
    except OSError:
        return "gone"


def _remove_state_dir(state_dir: str, keep_logs: bool) -> None:
    if not keep_logs:
        shutil.rmtree(state_dir)
        return
    for entry in os.listdir(state_dir):
        if entry != LOGS_DIR:
            path = os.path.join(state_dir, entry)
            shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.unlink(path)


def _read_state(state_dir: str) -> tuple[dict | None, str | None]:
    path = os.path.join(state_dir, "state.json")
    try:
        with open(path) as f:
            doc = json.load(f)
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError) as exc:
        return None, f"{path} is unreadable ({exc}); cleaned up by listing instead"
    if not isinstance(doc, dict):
        return None, f"{path} is not a JSON object; cleaned up by listing instead"
    return doc, None


# ----------------------------------------------------------------------------------------- restart

def lab_restart_agent(name: str, node_name: str, *, state_root: str = DEFAULT_STATE_ROOT,
                      agent_argv: Sequence[str] | None = None, ready_timeout: float = agents.DEFAULT_READY_TIMEOUT,
                      stop_timeout: float = agents.DEFAULT_STOP_TIMEOUT, wait: bool = True) -> agents.AgentRecord:
    """(Re)start one node's agent: stop the recorded one if it still runs (SIGTERM), start a new one in
    the node's netns and agent cgroup, record it in state.json and (unless ``wait=False``, for an agent
    that is expected to stay unready) wait until it is ready."""
    plan, state = load_lab(name, state_root)
    try:
        node = plan.node(node_name)
    except KeyError:
        raise LabError(f"lab {name!r} has no node named {node_name!r}; known: "
                       f"{', '.join(n.name for n in plan.nodes)}") from None
    records = dict(state.get("agents") or {})
    if node_name in records:
        agents.stop_agents({node_name: agents.AgentRecord.from_json(records[node_name])}, stop_timeout)
    argv = agent_argv or (tuple(records[node_name]["argv"][:-2]) if node_name in records else None)
    proc, record = agents.start_agent(node, argv)
    records[node_name] = record.to_json()
    state = {**state, "agents": records}
    _atomic_write(plan.state_file, json.dumps(state, indent=2) + "\n")
    if wait:   # issuer mode: ready means every pod's SVID is in (identity.issuer.first_svid_wait_seconds)
        agents.wait_ready({node_name: (node, proc)}, ready_timeout)
    return record


def lab_add_issuer(name: str, *, state_root: str = DEFAULT_STATE_ROOT) -> dict[str, agents.AgentRecord]:
    """Start the issuer in a ``--identity node-ca`` lab, for the migration (docs/identity.md "Migrating to the
    issuer"): its namespace and two replicas as ``lab up`` makes them, on the files the operator made with
    ``tcpmesh ca issue-issuer --out <state>/issuer/ca`` and ``tcpmesh issuer token-key --out
    <state>/issuer/token.key``. The nodes are left alone: each switches when its config says so."""
    plan, state = load_lab(name, state_root)
    if state.get("identity") == "issuer" or state.get("issuers"):
        raise LabError(f"lab {name!r} runs the issuer already")
    for needed in (f"{issuer_lab.directory(plan)}/ca/issuer.crt", f"{issuer_lab.directory(plan)}/token.key"):
        if not os.path.exists(needed):
            raise LabError(f"{needed} does not exist: make it first (`tcpmesh ca issue-issuer --ca {plan.ca_dir} --out "
                           f"{issuer_lab.directory(plan)}/ca`, `tcpmesh issuer token-key --out "
                           f"{issuer_lab.directory(plan)}/token.key`)")
    issuer_lab.build_network(plan)
    issuer_lab.write_replica_configs(plan, state.get("svid_ttl_seconds"))
    records: dict[str, agents.AgentRecord] = {}
    procs = {}
    for replica in issuer_lab.replicas(plan):
        procs[replica.name], records[replica.name] = issuer_lab.start_replica(plan, replica)
        state = {**state, "issuers": {n: r.to_json() for n, r in records.items()}}
        _atomic_write(plan.state_file, json.dumps(state, indent=2) + "\n")
    issuer_lab.wait_ready(plan, procs)
    return records


def lab_stop_issuer(name: str, replica: str, *, state_root: str = DEFAULT_STATE_ROOT) -> list[int]:
    """Stop one issuer replica of a ``--identity issuer`` lab (SIGTERM, its recorded PID checked first)."""
    plan, state = load_lab(name, state_root)
    records = dict(state.get("issuers") or {})
    if replica not in records:
        raise LabError(f"lab {name!r} runs no issuer replica {replica!r}; known: {', '.join(records) or 'none'}")
    return agents.stop_agents({replica: agents.AgentRecord.from_json(records[replica])})


def lab_start_issuer(name: str, replica: str, *, state_root: str = DEFAULT_STATE_ROOT) -> agents.AgentRecord:
    """(Re)start one issuer replica and wait until it serves."""
    plan, state = load_lab(name, state_root)
    chosen = next((r for r in issuer_lab.replicas(plan) if r.name == replica), None)
    if chosen is None or not (state.get("identity") == "issuer" or state.get("issuers")):
        raise LabError(f"lab {name!r} has no issuer replica {replica!r} (was it started with --identity issuer?)")
    records = dict(state.get("issuers") or {})
    if replica in records:
        agents.stop_agents({replica: agents.AgentRecord.from_json(records[replica])})
    proc, record = issuer_lab.start_replica(plan, chosen)
    records[replica] = record.to_json()
    _atomic_write(plan.state_file, json.dumps({**state, "issuers": records}, indent=2) + "\n")
    issuer_lab.wait_ready(plan, {replica: proc})
    return record


# ------------------------------------------------------------------------------------------ status

def load_lab(name: str = DEFAULT_LAB_NAME, state_root: str = DEFAULT_STATE_ROOT) -> tuple[LabPlan, dict]:
    """The plan and state.json of a lab that is up; LabNotFound (naming any leftovers) otherwise."""
    validate_lab_name(name)
    state_dir = lab_state_dir(state_root, name)
    state, problem = _read_state(state_dir)
    if state is None:
        cgroup_root = checks.find_cgroup2_mount() or ""
        leftovers = _leftovers(name, state_dir, lab_cgroup(cgroup_root, name))
        if leftovers or problem:
            raise LabError(f"lab {name!r} has no usable state file ({problem or 'missing'}) but leftovers exist "
                           f"({'; '.join(leftovers)}): run `tcpmesh lab down --name {name}`")
        raise LabNotFound(f"no lab named {name!r} ({state_dir}/state.json does not exist): "
                          f"start one with `tcpmesh lab up --name {name}`")
    return files.plan_from_state(state, f"{state_dir}/state.json"), state


def lab_status(name: str = DEFAULT_LAB_NAME, *, state_root: str = DEFAULT_STATE_ROOT) -> dict[str, Any]:
    """The lab as a JSON-ready dict (schema version ``STATUS_VERSION``, documented in docs/lab.md)."""
    plan, state = load_lab(name, state_root)
    records = {n: agents.AgentRecord.from_json(r) for n, r in (state.get("agents") or {}).items()}
    present = set(network.lab_netns_present(name))
    problems = [f"network namespace {ns} is missing" for ns in plan.netns_names if ns not in present]
    problems += [f"cgroup {cg} is missing" for cg in
                 [n.agent_cgroup for n in plan.nodes] + [c for p in plan.pods for c in (p.cgroup, *p.containers)]
                 if not os.path.isdir(cg)]
    nodes = []
    for node in plan.nodes:
        record = records.get(node.name)
        alive = record is not None and agents.is_recorded_process(record)
        if state.get("agents_requested") and state.get("phase") == "up" and not alive:
            problems.append(f"the agent of {node.name} is not running; see {node.log_file}")
        agent_status = _agent_status(node) if alive else None
        if agent_status is not None:
            problems += [f"{node.name}: {p}" for p in agent_status.get("problems", [])]
        nodes.append({
            "name": node.name, "netns": node.netns, "wire_address": node.wire_address,
            "wire_address6": node.wire_address6,
            "admin_address": node.admin_address, "admin_socket": files.admin_socket_path(node),
            "pod_cidr": node.pod_cidr, "cgroup": node.agent_cgroup,
            "config": node.config_file, "log": node.log_file,
            "agent": {"pid": record.pid if record else None, "alive": alive, "status": agent_status},
        })
    pods = [{"name": p.name, "node": p.node, "netns": p.netns, "ip": p.ip, "ip6": p.ip6, "namespace": p.namespace,
             "service_account": p.service_account, "spiffe_id": p.spiffe_id, "cgroup": p.cgroup,
             "containers": list(p.containers), "exec_cgroup": p.exec_cgroup}
            for p in plan.pods]
    return {
        "version": STATUS_VERSION, "name": plan.name, "phase": state.get("phase"),
        "trust_domain": plan.trust_domain, "agents": bool(state.get("agents_requested")),
        "capture_mode": state.get("capture_mode"), "state_dir": plan.state_dir,
        "registry_file": plan.registry_file, "ca_dir": state.get("ca_dir"),
        "wire": {"netns": plan.wire_netns, "bridge": plan.bridge, "subnet": plan.wire_subnet},
        "pod_gateway": plan.pod_gateway, "cgroup": plan.cgroup,
        "nodes": nodes, "pods": pods, "problems": problems,
    }


def _agent_status(node: NodePlan) -> dict[str, Any]:
    """The node agent's `tcpmesh status` document (agent.control.status), or {"problems": [why not]}."""
    from agent.admin_client import ask

    path = files.admin_socket_path(node)
    try:
        return ask(path, {"op": "status"}, timeout=STATUS_ASK_SECONDS)["status"]
    except TcpmeshError as exc:
        return {"problems": [f"no status from the agent: {exc}"]}


# -------------------------------------------------------------------------------------------- exec

def resolve_target(plan: LabPlan, target: str) -> tuple[str, str | None]:
    """(netns, cgroup) of a pod — its app container's cgroup, where a pod's processes live — or
    (netns, None) of a node (node commands stay in the caller's cgroup)."""
    for pod in plan.pods:
        if pod.name == target:
            return pod.netns, pod.exec_cgroup
    for node in plan.nodes:
        if node.name == target:
            return node.netns, None
    known = ", ".join([p.name for p in plan.pods] + [n.name for n in plan.nodes])
    raise LabError(f"lab {plan.name!r} has no pod or node named {target!r}; known: {known}")


def lab_exec(name: str, pod: str, argv: Sequence[str], *, state_root: str = DEFAULT_STATE_ROOT,
             **popen_kwargs: Any) -> subprocess.Popen:
    """Start ``argv`` inside pod ``pod`` (its netns and cgroup) — or a node's netns — and return the Popen."""
    plan, _ = load_lab(name, state_root)
    netns, cgroup = resolve_target(plan, pod)
    return nsenter.popen_in(list(argv), netns=netns, cgroup=cgroup, **popen_kwargs)


def exec_replacing_process(name: str, pod: str, argv: Sequence[str], *,
                           state_root: str = DEFAULT_STATE_ROOT) -> NoReturn:
    """Move this (single-threaded) process into the pod and exec ``argv``: stdio, signals and exit code pass through."""
    plan, _ = load_lab(name, state_root)
    netns, cgroup = resolve_target(plan, pod)
    nsenter.enter_in_process(netns, cgroup)
    try:
        os.execvp(argv[0], list(argv))
    except OSError as exc:
        raise CommandNotFound(f"cannot run {argv[0]!r} in {pod}: {exc.strerror}") from exc
