"""``tcpmesh workload add|del|list`` (change the running agent's workloads), ``tcpmesh identity reload`` (switch its
identity.mode, agent.control.identity_switch) and ``tcpmesh status`` (the
node's state, agent.control.status), through the agent's admin socket (which agent: agent.control.target)."""

from __future__ import annotations

import json
import os
import sys

import click

from agent.admin_client import ask
from agent.table import render
from agent.control.target import resolve_socket, target_options


def reload_request(environ) -> dict:
    """identity.reload, with this process's config variables when systemd started it for a unit (INVOCATION_ID):
    the agent takes them only from its own unit's ExecReload (agent.control.config_changes.reload_environment)."""
    request: dict = {"op": "identity.reload"}
    if environ.get("INVOCATION_ID"):
        from agent.config import environment_fields

        request["unit_environment"] = {"invocation_id": environ["INVOCATION_ID"],
                                       "variables": {n: environ[n] for n in environment_fields() if n in environ}}
    return request


def _call(target: dict, payload: dict) -> dict:
    return ask(resolve_socket(**target), payload)


def _target(socket_path, config_path, target_lab, target_node) -> dict:
    return {"socket_path": socket_path, "config_path": config_path, "lab": target_lab, "node": target_node}


@click.group()
def workload() -> None:
    """Add, remove and list workloads of a running agent (no restart needed)."""


@workload.command("add")
@click.option("--name", required=True)
@click.option("--namespace", required=True)
@click.option("--service-account", required=True)
@click.option("--ip", required=True, help="The workload's IPv4 address.")
@click.option("--node", required=True, help="The node the workload runs on.")
@click.option("--cgroup", help="The workload's cgroup v2 directory (needed on its own node for ebpf-connect).")
@lambda fn: target_options(fn, node_flag="--lab-node")
def add(name, namespace, service_account, ip, node, cgroup, socket_path, config_path, target_lab, target_node) -> None:
    """Register a workload with the agent; on its own node it is captured at once."""
    entry = {"name": name, "namespace": namespace, "service_account": service_account, "ip": ip, "node": node}
    if cgroup:
        entry["cgroup"] = cgroup
    answer = _call(_target(socket_path, config_path, target_lab, target_node), {"op": "workload.add", "workload": entry})
    click.echo(f"added {answer['workload']} ({answer['spiffe_id']})")


@workload.command("del")
@click.argument("key", metavar="NAMESPACE/NAME")
@target_options
def delete(key, socket_path, config_path, target_lab, target_node) -> None:
    """Remove a workload added with `workload add`; it is no longer captured."""
    answer = _call(_target(socket_path, config_path, target_lab, target_node), {"op": "workload.del", "key": key})
    click.echo(f"removed {answer['workload']}")


@workload.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@target_options
def list_(as_json, socket_path, config_path, target_lab, target_node) -> None:
    """The agent's workloads, one row each: WORKLOAD (namespace/name), IP, the NODE it runs on, SOURCE
    (file, kubernetes or runtime: `workload add`), STATE (captured or NOT CAPTURED and why on this
    node; remote for other nodes' workloads) and its SPIFFE ID."""
    workloads = _call(_target(socket_path, config_path, target_lab, target_node), {"op": "workload.list"})["workloads"]
    if as_json:
        click.echo(json.dumps(workloads, indent=1))
        return
    rows = []
    for w in workloads:
        state = ("captured" if w["captured"] else f"NOT CAPTURED: {w['problem']}") if w["local"] else "remote"
        rows.append([f"{w['namespace']}/{w['name']}", w["ip"], w["node"], w["source"], state, w["spiffe_id"]])
    for line in render(("WORKLOAD", "IP", "NODE", "SOURCE", "STATE", "SPIFFE ID"), rows):
        click.echo(line)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="The agent's status document (schema: docs/telemetry.md).")
@target_options
def status(as_json, socket_path, config_path, target_lab, target_node) -> None:
    """One node's state: ready, capture mode, workloads, identities and expiry, the policy set in force
    and the last refused change (file:line: field: problem, and the valid edits it holds back),
    registry health, issuer reachability. Exit code 1 when there is a problem to act on."""
    from agent.control.status import format_status

    doc = _call(_target(socket_path, config_path, target_lab, target_node), {"op": "status"})["status"]
    click.echo(json.dumps(doc, indent=1) if as_json else format_status(doc))
    if doc["problems"]:
        sys.exit(1)


RELOAD_TIMEOUT_SECONDS = 120.0  # a join and a batch of issuances at the issuer, each bounded by its own timeout


@click.group()
def identity() -> None:
    """The running agent's identity source (docs/identity.md "Migrating to the issuer")."""


@identity.command("reload")
@click.option("--json", "as_json", is_flag=True, help="The agent's answer as JSON.")
@target_options
def identity_reload(as_json, socket_path, config_path, target_lab, target_node) -> None:
    """Switch the agent to the identity.mode its config file says now, without a restart.

    Edit the config file first (identity.mode: issuer and identity.issuer.*, as for a start in issuer
    mode), then run this: the agent joins the issuer, re-issues every local SVID from it and only then
    swaps; open connections keep flowing on their certificates, new ones use the new SVIDs. If the join
    or an issuance fails nothing changes and the error says what to fix. The file already holds the
    new mode, so a later restart stays on it. Other identity source settings (issuer addresses, token,
    node CA directory) switch the same way; any other changed field is named as needing a restart. A
    file that does not validate is refused and the last good config keeps running. Exit code 2 when
    refused. (With config_file.watch on, the agent does this itself when the file changes; SIGHUP does it too.)
    Run by systemd as the unit's ExecReload, it also hands the agent the unit's environment as systemd reads it
    now (/etc/default/tcpmesh): a changed TCPMESH_<SECTION>_<FIELD> is named as needing a restart."""
    from agent.admin_client import ask as ask_agent

    path = resolve_socket(**_target(socket_path, config_path, target_lab, target_node))
    answer = ask_agent(path, reload_request(os.environ), timeout=RELOAD_TIMEOUT_SECONDS)
    answer.pop("ok", None)
    click.echo(json.dumps(answer, indent=1) if as_json else answer["message"])
