"""``tcpmesh policy check|explain``: validate policy files offline, and explain a decision."""

from __future__ import annotations

import json

import click

from agent.errors import TcpmeshError
from agent.identity.spiffe import SpiffeId
from agent.policy.engine import Request, decide
from agent.policy.loader import load_paths


@click.group()
def policy() -> None:
    """Validate and explain L4 authorization policies."""


@policy.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True))
def check(paths: tuple[str, ...]) -> None:
    """Validate policy files (or directories) offline; exit 2 naming file, line and field on error."""
    policies = load_paths(list(paths))
    for p in policies.authorization:
        click.echo(f"ok  AuthorizationPolicy {p.key}  {p.action.value}{' (dry-run)' if p.dry_run else ''}  "
                   f"selects {p.workload or 'every workload of ' + p.namespace}  {len(p.rules)} rule(s)  "
                   f"[{p.origin.file}:{p.origin.line}]")
    for p in policies.peer_authentication:
        click.echo(f"ok  PeerAuthentication {p.key}  {p.mode.value}  selects "
                   f"{p.workload or 'every workload of ' + p.namespace}  [{p.origin.file}:{p.origin.line}]")


@policy.command()
@click.option("--from", "source", required=True, help="Client SPIFFE ID, or 'plaintext'.")
@click.option("--to", "target", required=True, help="Destination workload: NAMESPACE/NAME.")
@click.option("--port", required=True, type=click.IntRange(1, 65535))
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="Agent config: its policy.dir, default_action and root_namespace are used.")
@click.option("--dir", "policy_dir", type=click.Path(exists=True), help="Policy directory (overrides --config).")
@click.option("--default-action", type=click.Choice(["ALLOW", "DENY"]), help="Overrides the config's.")
@click.option("--json", "as_json", is_flag=True)
def explain(source, target, port, config_path, policy_dir, default_action, as_json) -> None:
    """Print the decision for one connection, the policy and rule that made it, and the policies considered."""
    root_namespace, default = "tcpmesh-system", "ALLOW"
    if config_path:
        from agent.config import load_config

        config = load_config(config_path)
        policy_dir = policy_dir or config.policy.dir
        root_namespace, default = config.policy.root_namespace, config.policy.default_action
    if not policy_dir:
        raise TcpmeshError("pass --dir with the policy directory, or --config with the agent's config")
    namespace, _, workload = target.partition("/")
    if not workload:
        raise TcpmeshError(f"--to {target!r}: use NAMESPACE/NAME")
    principal = None if source == "plaintext" else SpiffeId.parse(source)
    policies = load_paths([policy_dir])
    decision = decide(policies, Request(principal.uri if principal else None, principal.namespace if principal else None,
                                        workload, namespace, port),
                      default_allow=(default_action or default) == "ALLOW", root_namespace=root_namespace)
    if as_json:
        click.echo(json.dumps({"allowed": decision.allowed, "reason": decision.reason, "policy": decision.policy,
                               "rule": decision.rule_index, "dry_run": decision.dry_run,
                               "audited_by": list(decision.audited_by), "considered": list(decision.considered)},
                              indent=1))
        return
    by_key = {p.key: p for p in policies.authorization}
    click.echo(f"{'ALLOW' if decision.allowed else 'DENY'}  {source} -> {target}:{port}")
    click.echo(f"  because: {decision.reason}")
    if decision.policy and decision.policy in by_key:
        origin = by_key[decision.policy].origin
        click.echo(f"  policy:  {decision.policy} ({origin.file}:{origin.line})"
                   + (f", rule {decision.rule_index}" if decision.rule_index is not None else ""))
    if decision.dry_run:
        click.echo(f"  dry-run: would {decision.dry_run}")
    if decision.audited_by:
        click.echo(f"  audited by: {', '.join(decision.audited_by)}")
    others = [k for k in decision.considered if k != decision.policy]
    click.echo("  also considered: " + (", ".join(f"{k} ({by_key[k].action.value}"
                                                 f"{', dry-run' if by_key[k].dry_run else ''})" for k in others)
                                        or "none"))
