"""Which agent a command talks to: the same four ways for every command that asks a running agent
(`tcpmesh status`, `flows`, `workload`, `cert inspect`, `policy explain`).

In order: ``--socket PATH``; ``--lab NAME --node NODE`` (a lab node's agent, straight from the host:
the admin socket is a file, so no `lab exec` is needed; without --lab, $TCPMESH_LAB names the lab);
``--config FILE`` (its admin.socket — read on its own when the file does not validate: it may hold the
very edit the running agent refuses, and `tcpmesh identity reload` must reach the agent to say why); the environment variable ``TCPMESH_SOCKET`` (`tcpmesh lab status` prints it for each node); else
/run/tcpmesh/agent.sock. Always the admin socket (root only, 0600); HTTP only where a command offers
``--admin URL`` and it is given. Imports the lab lazily, and only for ``--lab``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Mapping

import click
import yaml

from agent.config import DEFAULT_ADMIN_SOCKET
from agent.errors import ConfigError, TcpmeshError

SOCKET_ENV = "TCPMESH_SOCKET"


def resolve_socket(socket_path: str | None = None, config_path: str | None = None, lab: str | None = None,
                   node: str | None = None, environ: dict[str, str] | None = None) -> str:
    """The admin socket path the options (and the environment) point at."""
    environ = os.environ if environ is None else environ
    if socket_path:
        return socket_path
    if lab or node:
        return lab_node_socket(lab, node, environ=environ)
    if config_path:
        return config_socket(config_path, environ)
    return environ.get(SOCKET_ENV) or DEFAULT_ADMIN_SOCKET


def config_socket(config_path: str, environ: Mapping[str, str]) -> str:
    """admin.socket of the agent config ``config_path`` (with its ``TCPMESH_ADMIN_SOCKET`` override).

    A file that is read but does not validate (a bad edit: a typo in a field, broken YAML) still names
    the socket of the agent that started from it: the running agent must be asked — `tcpmesh identity
    reload` especially, whose refusal names the file, the field and the fix and says that nothing
    changed. Only a file that cannot be read at all is an error here."""
    from agent.config import admin_socket_setting, load_config

    try:
        return load_config(config_path, environ).admin.socket
    except ConfigError as invalid:
        refused = invalid
    try:
        text = Path(config_path).read_text()
    except OSError:
        raise refused from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError:
        doc = None
    return admin_socket_setting(doc, environ)


def lab_node_socket(lab: str | None, node: str | None, state_root: str | None = None,
                    environ: dict[str, str] | None = None) -> str:
    """The admin socket of ``node`` of lab ``lab`` (when None: $TCPMESH_LAB, as for `tcpmesh lab`, else the
    default lab); names the nodes if unknown."""
    from agent.lab.files import admin_socket_path
    from agent.lab.lab import load_lab
    from agent.lab.topology import DEFAULT_LAB_NAME, DEFAULT_STATE_ROOT, LAB_NAME_ENV

    environ = os.environ if environ is None else environ
    plan, _ = load_lab(lab or environ.get(LAB_NAME_ENV) or DEFAULT_LAB_NAME, state_root or DEFAULT_STATE_ROOT)
    names = [n.name for n in plan.nodes]
    if node is None:
        if len(names) != 1:
            raise TcpmeshError(f"lab {plan.name!r} has {len(names)} nodes: add --node ({', '.join(names)})")
        node = names[0]
    if node not in names:
        raise TcpmeshError(f"lab {plan.name!r} has no node named {node!r}; its nodes: {', '.join(names)}")
    return admin_socket_path(plan.node(node))


def target_options(fn: Callable, node_flag: str = "--node") -> Callable:
    """--socket, --config, --lab, --node: where the agent is (resolve_socket with them). A command that
    has a --node of its own (`workload add`) names the lab node with ``node_flag`` instead."""
    fn = click.option(node_flag, "target_node", metavar="NODE",
                      help="With --lab: that node's agent (e.g. node1).")(fn)
    fn = click.option("--lab", "target_lab", metavar="NAME",
                      help="The agent of a `tcpmesh lab` node, from the host (with --node; default $TCPMESH_LAB, "
                            "else the lab named lab).")(fn)
    fn = click.option("--config", "config_path", type=click.Path(dir_okay=False),
                      help="Agent config file; its admin.socket is used.")(fn)
    return click.option("--socket", "socket_path", metavar="PATH",
                        help=f"Admin socket of the agent (default: ${SOCKET_ENV}, else {DEFAULT_ADMIN_SOCKET}).")(fn)
