"""``tcpmesh workload add|del|list``: change the running agent's workloads through its admin socket."""

from __future__ import annotations

import json

import click

from agent.config import DEFAULT_ADMIN_SOCKET
from agent.control.admin_socket import request
from agent.errors import TcpmeshError


def _socket_path(socket_path: str | None, config_path: str | None) -> str:
    if socket_path:
        return socket_path
    if config_path:
        from agent.config import load_config

        return load_config(config_path).admin.socket
    return DEFAULT_ADMIN_SOCKET


def _target_options(fn):
    fn = click.option("--config", "config_path", type=click.Path(dir_okay=False),
                      help="Agent config file; its admin.socket is used.")(fn)
    return click.option("--socket", "socket_path", help=f"Admin socket of the agent (default {DEFAULT_ADMIN_SOCKET}).")(fn)


def _call(socket_path: str | None, config_path: str | None, payload: dict) -> dict:
    answer = request(_socket_path(socket_path, config_path), payload)
    if not answer.get("ok"):
        raise TcpmeshError(answer.get("error", "the agent refused the request"))
    return answer


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
@_target_options
def add(name, namespace, service_account, ip, node, cgroup, socket_path, config_path) -> None:
    """Register a workload with the agent; on its own node it is captured at once."""
    entry = {"name": name, "namespace": namespace, "service_account": service_account, "ip": ip, "node": node}
    if cgroup:
        entry["cgroup"] = cgroup
    answer = _call(socket_path, config_path, {"op": "workload.add", "workload": entry})
    click.echo(f"added {answer['workload']} ({answer['spiffe_id']})")


@workload.command("del")
@click.argument("key", metavar="NAMESPACE/NAME")
@_target_options
def delete(key, socket_path, config_path) -> None:
    """Remove a workload added with `workload add`; it is no longer captured."""
    answer = _call(socket_path, config_path, {"op": "workload.del", "key": key})
    click.echo(f"removed {answer['workload']}")


@workload.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_target_options
def list_(as_json, socket_path, config_path) -> None:
    """The agent's workloads: where each comes from, and whether this node captures it."""
    workloads = _call(socket_path, config_path, {"op": "workload.list"})["workloads"]
    if as_json:
        click.echo(json.dumps(workloads, indent=1))
        return
    for w in workloads:
        state = ("captured" if w["captured"] else f"NOT CAPTURED: {w['problem']}") if w["local"] else "remote"
        click.echo(f"{w['namespace']}/{w['name']:<16} {w['ip']:<15} {w['node']:<8} {w['source']:<8} {state}  "
                   f"{w['spiffe_id']}")
