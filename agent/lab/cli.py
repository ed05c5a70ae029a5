"""``tcpmesh lab``: the click group for local namespace clusters. Thin: parses options, calls agent.lab.lab,
prints. A ``TcpmeshError`` propagates to the root CLI (agent/cli.py), which prints it without a
traceback; ``python -m agent.lab`` does the same. ``exec`` is the exception: it reports its own
errors with exit code 125 (lab problem) or 127 (command not found), as env(1) does.
"""

from __future__ import annotations

import json
import os
import sys

import click

from agent.errors import TcpmeshError
from agent.lab.topology import DEFAULT_LAB_NAME, LAB_NAME_ENV, DEFAULT_NAMESPACE, DEFAULT_STATE_ROOT, DEFAULT_TRUST_DOMAIN

NAME_HELP = ("Lab name; several labs can run at once under different names. "
             "Export TCPMESH_LAB=NAME to name it once for every `tcpmesh lab` command.")
STATE_ROOT_HELP = "Directory that holds one state dir per lab."


def _name_option(fn):
    fn = click.option("--state-root", default=DEFAULT_STATE_ROOT, show_default=True, hidden=True,
                      help=STATE_ROOT_HELP)(fn)
    return click.option("--name", default=DEFAULT_LAB_NAME, show_default=True, envvar=LAB_NAME_ENV, show_envvar=True,
                        help=NAME_HELP)(fn)


@click.group()
def lab() -> None:
    """A local multi-node cluster made of network namespaces (needs root).

    \b
    Node i lives in netns tcpmesh-<name>-node<i> at 10.76.0.<i> on a shared bridge
    (admin port 15020 there); pod n<i>p<j> lives in netns tcpmesh-<name>-n<i>p<j> and in cgroup
    <cgroup2>/tcpmesh-lab-<name>/node<i>/pods/n<i>p<j> (its processes in the container
    cgroup .../n<i>p<j>/app), with IP 10.77.<i>.<10+j>. State, configs and logs are under
    /run/tcpmesh-lab/<name>/ (docs/lab.md).

    \b
      tcpmesh lab up --nodes 2 --pods-per-node 2
      tcpmesh lab exec n1p1 -- python3 -c 'print("hello from a pod")'
      tcpmesh lab status
      tcpmesh lab down
    """


@lab.command()
@click.option("--nodes", type=click.IntRange(1, 254), default=2, show_default=True, help="Number of nodes.")
@click.option("--pods-per-node", type=click.IntRange(0, 244), default=2, show_default=True,
              help="Pods on every node.")
@_name_option
@click.option("--trust-domain", default=DEFAULT_TRUST_DOMAIN, show_default=True,
              help="SPIFFE trust domain of the lab's CA and identities.")
@click.option("--namespace", default=DEFAULT_NAMESPACE, show_default=True, help="Namespace of every pod.")
@click.option("--service-account", "service_accounts", multiple=True, metavar="POD=SA",
              help="Give a pod a service account other than its name (repeatable), e.g. n1p1=client.")
@click.option("--no-agents", is_flag=True, help="Build the network and files only; start no agents.")
@click.option("--capture-mode", default="ebpf-connect", show_default=True,
              help="capture.mode written into every agent config (ebpf-connect or none).")
@click.option("--ready-timeout", type=float, default=60.0, show_default=True,
              help="Seconds to wait for every agent's /readyz.")
@click.option("--flat-pods", is_flag=True,
              help="Run each pod's processes in the pod cgroup itself, not in a container cgroup below it "
                   "(the default shape is the kubelet's: pod cgroup, one child per container).")
@click.option("--identity", type=click.Choice(["issuer", "node-ca", "node_ca"]), default="issuer", show_default=True,
              help="issuer: two issuer replicas in a namespace of their own sign every SVID; each node holds only "
                   "its node credential and gets SVIDs for the identities it runs (docs/identity.md). node-ca "
                   "(legacy, for migration tests): each node holds a node intermediate that can sign any identity.")
def up(nodes: int, pods_per_node: int, name: str, state_root: str, trust_domain: str, namespace: str,
       service_accounts: tuple[str, ...], no_agents: bool, capture_mode: str, ready_timeout: float,
       flat_pods: bool, identity: str) -> None:
    """Create the namespaces, veths, routes, cgroups, CA, configs and registry; start one agent per node.

    Each agent runs as `python -m agent run --config <state dir>/nodes/<node>/config.yaml` inside its
    node's netns and cgroup; its output goes to <state dir>/logs/<node>.log. On any failure the lab
    is torn down again (logs are kept); on Ctrl-C, SIGTERM or SIGHUP while it is built, wholly.

    The lab lives until `tcpmesh lab down`, unless TCPMESH_LAB_OWNER_PID names its owner: once that
    process is gone, the next `lab up` takes the lab down. Every `lab up` first reaps such labs
    (it logs which and why); a lab whose owner lives, or that has none, is never touched.
    """
    from agent.lab.interrupt import interrupt_tears_down
    from agent.lab.lab import lab_up
    from agent.lab.owner import owner_pid_from_env

    accounts = {}
    for item in service_accounts:
        pod, sep, account = item.partition("=")
        if not sep:
            raise click.BadParameter(f"{item!r} is not POD=SA", param_hint="--service-account")
        accounts[pod] = account
    with interrupt_tears_down():   # Ctrl-C, SIGTERM or SIGHUP while it is built: the half-built lab is removed
        plan = lab_up(name, nodes, pods_per_node, trust_domain, agents_enabled=not no_agents, namespace=namespace,
                      service_accounts=accounts, capture_mode=capture_mode, ready_timeout=ready_timeout,
                      state_root=state_root, flat_pods=flat_pods, identity=identity.replace("-", "_"),
                      owner_pid=owner_pid_from_env(os.environ))
    agents = "no agents" if no_agents else f"{len(plan.nodes)} agents ready"
    click.echo(f"lab {name!r} is up: {len(plan.nodes)} nodes, {len(plan.pods)} pods, {agents}; "
               f"state in {plan.state_dir}")
    click.echo(f"try: tcpmesh lab status --name {name}")


@lab.command("exec", context_settings={"ignore_unknown_options": True})
@click.argument("pod")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@_name_option
def exec_(pod: str, command: tuple[str, ...], name: str, state_root: str) -> None:
    """Run COMMAND inside POD's netns and cgroup (or a node's netns, e.g. node1).

    Put `--` before COMMAND. Stdio, signals and the exit code are the command's own: this process
    becomes the command. Exit code 125 means the lab or pod was not found, 127 that COMMAND was not.

    \b
      tcpmesh lab exec n2p1 -- python3 -m http.server 8080
      tcpmesh lab exec n1p1 -- python3 -c 'import urllib.request as u; print(u.urlopen("http://10.77.2.11:8080").status)'
    """
    from agent.lab.lab import CommandNotFound, exec_replacing_process

    sys.stdout.flush()
    sys.stderr.flush()
    try:
        exec_replacing_process(name, pod, command, state_root=state_root)
    except TcpmeshError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(127 if isinstance(exc, CommandNotFound) else 125)


@lab.command()
@_name_option
@click.option("--json", "as_json", is_flag=True, help="Print the stable JSON form (schema in docs/lab.md).")
def status(name: str, state_root: str, as_json: bool) -> None:
    """Show the lab's nodes (netns, addresses, agent pid and liveness, each agent's `tcpmesh status`
    summary) and pods (IP, identity, cgroup), and how to point other commands at a node's agent."""
    from agent.lab.lab import lab_status

    doc = lab_status(name, state_root=state_root)
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    click.echo(f"lab {doc['name']} ({doc['phase']}), trust domain {doc['trust_domain']}, state {doc['state_dir']}")
    click.echo(f"{'NODE':8} {'NETNS':28} {'WIRE':11} {'ADMIN':17} AGENT")
    for node in doc["nodes"]:
        agent = node["agent"]
        state = "-" if agent["pid"] is None else f"{agent['pid']} ({'alive' if agent['alive'] else 'dead'})"
        click.echo(f"{node['name']:8} {node['netns']:28} {node['wire_address']:11} {node['admin_address']:17} {state}")
    for node in doc["nodes"]:
        status = node["agent"]["status"]
        if status and "policy" in status:
            click.echo(f"  {node['name']}: {_status_summary(status)}")
    click.echo(f"{'POD':8} {'NODE':8} {'IP':12} SPIFFE ID")
    for pod in doc["pods"]:
        click.echo(f"{pod['name']:8} {pod['node']:8} {pod['ip']:12} {pod['spiffe_id']}")
    click.echo("a node's agent, from this shell (`tcpmesh status`, `flows`, `workload list`, `cert inspect`, "
               "`policy explain`):")
    for node in doc["nodes"]:
        click.echo(f"  export TCPMESH_SOCKET={node['admin_socket']}   # {node['name']}, "
                   f"or: --lab {doc['name']} --node {node['name']}")
    for problem in doc["problems"]:
        click.echo(f"problem: {problem}", err=True)


def _status_summary(status: dict) -> str:
    policy = status["policy"]
    words = ["ready" if status["ready"] else "NOT READY", status["capture_mode"],
             f"{sum(w['captured'] for w in status['workloads'])}/{len(status['workloads'])} workloads captured",
             f"{len(status['identities'])} identities",
             f"policy {policy['authorization'] + policy['peer_authentication']} objects in force"
             if policy["in_force"] else "NO POLICY SET IN FORCE"]
    if policy.get("refused"):
        words.append(f"CHANGE REFUSED: {policy['refused']['error']}")
    return ", ".join(words)


ARCHIVE_ROOT = "/var/log/tcpmesh-lab"


@lab.command()
@_name_option
@click.option("--archive-dir", default=ARCHIVE_ROOT, show_default=True, type=click.Path(file_okay=False),
              envvar="TCPMESH_LAB_ARCHIVE_DIR", show_envvar=True,
              help="Where the nodes' access/audit logs and keys are kept, in <dir>/<name>-<UTC time>/<node>/.")
@click.option("--no-archive", is_flag=True, help="Delete the access logs with the lab instead.")
def down(name: str, state_root: str, archive_dir: str, no_archive: bool) -> None:
    """Stop the lab's agents and remove its namespaces, cgroups and state dir.

    The nodes' access/audit logs (and the keys that verify them) are an audit trail: they are first
    copied to --archive-dir, and the path is printed (`tcpmesh audit verify --key` checks them there).
    Also cleans up after a crashed `lab up` (no state file) by finding tcpmesh-<name>-* namespaces
    and the lab's cgroup directory. Only PIDs the lab recorded are signalled. Safe to run twice.
    """
    from agent.lab.lab import lab_down

    report = lab_down(name, state_root=state_root, archive_root=None if no_archive else archive_dir)
    if not (report["stopped_pids"] or report["removed_netns"] or report["state_file"]):
        click.echo(f"lab {name!r}: nothing left to remove")
    else:
        click.echo(f"lab {name!r} is down: stopped {len(report['stopped_pids'])} agents, "
                   f"removed {len(report['removed_netns'])} namespaces")
    archive = report.get("archive")
    if archive:
        click.echo(f"access logs kept in {archive}/<node>/ (with each node's audit.key; check one with "
                   f"`tcpmesh audit verify --key {archive}/node1/audit.key {archive}/node1/access.log`)")
    for problem in report["problems"]:
        click.echo(f"note: {problem}", err=True)


@lab.group("service")
def service() -> None:
    """Services of the lab: virtual addresses in front of pods (registry `services:` + nftables DNAT on every node)."""


def _port_pair(text: str) -> tuple[int, int]:
    port, _, target = text.partition(":")
    try:
        return int(port), int(target or port)
    except ValueError:
        raise click.BadParameter(f"{text!r}: give PORT or PORT:TARGET_PORT, e.g. 6379 or 80:8080") from None


@service.command("add")
@_name_option
@click.argument("service_name")
@click.option("--address", "addresses", multiple=True, required=True, help="Virtual address (repeat for more).")
@click.option("--port", "ports", multiple=True, required=True, help="PORT or PORT:TARGET_PORT (repeat for more).")
@click.option("--endpoint", "endpoints", multiple=True, help="A pod (n1p2); POD=notready keeps it but sends it "
                                                             "no new connections. Repeat for more.")
@click.option("--namespace", default=None, help="The Service's namespace (default: the lab's).")
def service_add(name: str, state_root: str, service_name: str, addresses: tuple[str, ...], ports: tuple[str, ...],
                endpoints: tuple[str, ...], namespace: str | None) -> None:
    """Add a Service, or replace the one of that name (e.g. to mark an endpoint not ready)."""
    from agent.lab.lab import load_lab
    from agent.lab.services import lab_service_set, service_document

    plan, _ = load_lab(name, state_root)
    parsed = [(e.split("=")[0], not e.endswith("=notready")) for e in endpoints]
    lab_service_set(plan, service_document(plan, service_name, addresses, [_port_pair(p) for p in ports], parsed,
                                           namespace))
    click.echo(f"service {namespace or plan.namespace}/{service_name} set")


@service.command("del")
@_name_option
@click.argument("service_name")
@click.option("--namespace", default=None, help="The Service's namespace (default: the lab's).")
def service_del(name: str, state_root: str, service_name: str, namespace: str | None) -> None:
    """Delete a Service (its nftables rules and its registry entry)."""
    from agent.lab.lab import load_lab
    from agent.lab.services import lab_service_del

    plan, _ = load_lab(name, state_root)
    lab_service_del(plan, service_name, namespace)


@service.command("list")
@_name_option
def service_list(name: str, state_root: str) -> None:
    """The lab's Services: addresses, ports and endpoints (ready or not)."""
    from agent.lab.lab import load_lab
    from agent.lab.services import read_services

    plan, _ = load_lab(name, state_root)
    for s in read_services(plan):
        ports = ",".join(f"{p['port']}:{p['target_port']}" for p in s["ports"])
        eps = ",".join(e["workload"] + ("" if e.get("ready", True) else "(not ready)") for e in s["endpoints"])
        click.echo(f"{s['namespace']}/{s['name']:20} {','.join(s['addresses']):16} {ports:12} {eps or '-'}")
