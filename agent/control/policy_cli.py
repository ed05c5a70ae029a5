"""``tcpmesh policy check|explain``: validate policy files offline (every error, not only the first),
and explain a decision — against the set a running agent enforces (asked through its admin socket,
op ``policy.explain``: which agent as for every command, agent.control.target), or against files
with ``--dir``. Lives in agent.control, not agent.policy, because asking an agent needs the target
resolution (which may read a lab), and agent.policy stays below both. The explanation's wording is
agent.policy.explain's.
"""

from __future__ import annotations

import json
import sys

import click

from agent.admin_client import ask
from agent.control.target import resolve_socket, target_options
from agent.errors import TcpmeshError
from agent.policy.explain import explain as explain_set, format_explanation, request_for
from agent.policy.loader import check_paths, load_paths


@click.group()
def policy() -> None:
    """Validate and explain L4 authorization policies."""


@policy.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True))
def check(paths: tuple[str, ...]) -> None:
    """Validate policy files (or directories) offline. Prints every valid object, then every error as
    file:line: field: problem (each file, document, rule, source and operation is checked on its
    own); exit 2 when there is any."""
    policies, errors = check_paths(list(paths))
    for p in policies.authorization:
        click.echo(f"ok  AuthorizationPolicy {p.key}  {p.action.value}{' (dry-run)' if p.dry_run else ''}  "
                   f"selects {p.workload or 'every workload of ' + p.namespace}  {len(p.rules)} rule(s)  "
                   f"[{p.origin.file}:{p.origin.line}]")
    for p in policies.peer_authentication:
        click.echo(f"ok  PeerAuthentication {p.key}  {p.mode.value}  selects "
                   f"{p.workload or 'every workload of ' + p.namespace}  [{p.origin.file}:{p.origin.line}]")
    for error in errors:
        click.echo(f"tcpmesh: error: {error}", err=True)
    if errors:
        files = len({e.file for e in errors})
        click.echo(f"{len(errors)} error(s) in {files} file(s); an agent refuses the whole directory until all are "
                   "fixed (the previous set stays in force)", err=True)
        sys.exit(2)


@policy.command()
@click.option("--from", "source", required=True, help="Client SPIFFE ID, or 'plaintext'.")
@click.option("--to", "target", required=True, help="Destination workload: NAMESPACE/NAME.")
@click.option("--port", required=True, type=click.IntRange(1, 65535))
@target_options
@click.option("--dir", "policy_dir", type=click.Path(exists=True),
              help="Explain against the files of this directory instead of asking the agent.")
@click.option("--default-action", type=click.Choice(["ALLOW", "DENY"]), help="With --dir: the default action "
                                                                          "(default ALLOW, or --config's).")
@click.option("--json", "as_json", is_flag=True)
def explain(source, target, port, socket_path, config_path, target_lab, target_node, policy_dir, default_action,
            as_json) -> None:
    """The decision for one connection, and for each policy selecting the destination exactly why it
    did or did not match.

    \b
    Without --dir it asks the running agent, and explains against the set that agent enforces now —
    also while a change is refused (it says which); the agent also checks that --to is one of its
    workloads. With --dir it loads those files (and --config's default_action and root namespace)."""
    request = request_for(source, target, port)
    if policy_dir is None:
        if default_action:
            raise TcpmeshError("--default-action goes with --dir; the agent explains with its own policy.default_action")
        doc = ask(resolve_socket(socket_path, config_path, target_lab, target_node),
                  {"op": "policy.explain", "from": source, "to": target, "port": port})
        _print_agent(doc, as_json)
        return
    root_namespace, default = "tcpmesh-system", "ALLOW"
    if config_path:
        from agent.config import load_config

        config = load_config(config_path)
        root_namespace, default = config.policy.root_namespace, config.policy.default_action
    doc = explain_set(load_paths([policy_dir]), request, default_allow=(default_action or default) == "ALLOW",
                      root_namespace=root_namespace)
    if as_json:
        click.echo(json.dumps(doc, indent=1))
        return
    click.echo(format_explanation(doc))
    click.echo(f"  (against the files in {policy_dir}, not asked from an agent: whether {target} exists is not checked)")


def _print_agent(doc: dict, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(doc, indent=1))
        return
    refused = doc.get("refused")
    if not doc["in_force"]:
        click.echo(f"DENY  {doc['source']} -> {doc['destination']}:{doc['port']}")
        click.echo(f"  because: no policy set is in force on node {doc['node']}: every connection is refused until "
                   f"the files in {doc['dir']} load ({refused['error'] if refused else 'not loaded yet'})")
        return
    click.echo(format_explanation(doc["explanation"]))
    click.echo(f"  (the set in force on node {doc['node']}: {doc['objects']} object(s) from {doc['dir']})")
    if refused:
        click.echo(f"  NOTE: the files on disk are not what is enforced: a change was refused ({refused['error']}); "
                   "this explains the previous set, which stays in force"
                   + (f"; held back with it: {', '.join(refused['held_back'])}" if refused["held_back"] else ""))
