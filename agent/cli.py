"""The ``tcpmesh`` command line. Thin: parses arguments, calls into the package, prints errors
without tracebacks for anything an operator can fix (``TcpmeshError``).

The subcommand groups are imported only when invoked (``LAZY_COMMANDS``; `--help` lists them unimported): ``tcpmesh run`` is the
long-running agent, and importing every tool (lab, demo, doctor: pyroute2 and more) would cost it
about 12 MiB of resident memory for nothing (docs/performance-notes.md).
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import sys

from typing import Any

import click

from agent import __version__
from agent.errors import TcpmeshError

# command name → ("module:attribute" of the subcommand imported on first use, its one-line help).
# The help is repeated here so that `tcpmesh --help` lists every command without importing any
# (cryptography, pyroute2, the lab); tests/unit/test_cli_import_cost.py keeps it equal to the command's.
LAZY_COMMANDS = {
    "ca": ("agent.identity.cli:ca", "Manage the mesh's certificate authorities."),
    "cert": ("agent.telemetry.cli:cert", "Inspect the certificates a running agent serves."),
    "lab": ("agent.lab.cli:lab", "A local multi-node cluster made of network namespaces (needs root)."),
    "workload": ("agent.control.cli:workload",
                 "Add, remove and list workloads of a running agent (no restart needed)."),
    "status": ("agent.control.cli:status",
               "One node's state: ready, capture mode, workloads, identities and expiry, the policy set in "
               "force and the last refused change (file:line: field: problem, and the valid edits it holds "
               "back), registry health, issuer reachability."),
    "identity": ("agent.control.cli:identity",
                 'The running agent\'s identity source (docs/identity.md "Migrating to the issuer").'),
    "policy": ("agent.control.policy_cli:policy", "Validate and explain L4 authorization policies."),
    "demo": ("agent.demo.run:demo", "Run tcpmesh on a built-in 2-node lab and show intercepted mTLS flows."),
    "doctor": ("agent.host.doctor:doctor",
               "Check this host: every kernel feature each capture mode needs, and which mode the agent would use."),
    "flows": ("agent.telemetry.cli:flows",
              "Open and recently closed TCP flows on this node, with the client process of each."),
    "audit": ("agent.audit.cli:audit", "Work with the access/audit log (JSON lines chained with HMAC-SHA256)."),
    "issuer": ("agent.issuer.cli:issuer",
               "The issuer: signs SVIDs only for identities the registry places on the asking node."),
}


class Cli(click.Group):
    """Turns TcpmeshError into a one-line message and exit code 2; loads LAZY_COMMANDS on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*self.commands, *LAZY_COMMANDS})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self.commands and name in LAZY_COMMANDS:
            module, attribute = LAZY_COMMANDS[name][0].split(":")
            self.add_command(getattr(importlib.import_module(module), attribute), name)
        return self.commands.get(name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """click's command list, but a lazy command not loaded yet shows its LAZY_COMMANDS help unimported."""
        names = self.list_commands(ctx)
        limit = formatter.width - 6 - max((len(n) for n in names), default=0)
        rows = []
        for name in names:
            command = self.commands.get(name)
            if command is None:
                rows.append((name, click.Command(name, help=LAZY_COMMANDS[name][1]).get_short_help_str(limit)))
            elif not command.hidden:
                rows.append((name, command.get_short_help_str(limit)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except TcpmeshError as exc:
            click.echo(f"tcpmesh: error: {exc}", err=True)
            sys.exit(2)


@click.group(cls=Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tcpmesh")
def main() -> None:
    """tcpmesh: mutual TLS, workload identity and L4 telemetry for raw TCP — no sidecars.

    One agent per node captures its pods' outbound TCP connections with eBPF and tunnels them
    with mTLS to the destination node's agent. Start with `tcpmesh demo`.
    """
    click.get_current_context().meta[ISSUER_WAIT_KEY] = _wait_until_root  # `ca rotate reissue --wait-issuer`


ISSUER_WAIT_KEY = "tcpmesh.issuer.wait_until_root"   # agent.identity.cli reads it (identity may not import issuer)


def _wait_until_root(*args: Any, **kwargs: Any) -> list[str]:
    from agent.issuer.client import wait_until_root

    return wait_until_root(*args, **kwargs)


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Access records do not go through logging: agent.audit.writer writes them (access_log.path).


@main.command()
@click.option("--config", "config_path", default="/etc/tcpmesh/config.yaml", show_default=True,
              type=click.Path(dir_okay=False), help="Agent config file (YAML).")
def run(config_path: str) -> None:
    """Run the node agent: load capture, start the proxies and the admin endpoint.

    Stops on SIGTERM or SIGINT: open connections drain, exit code 0. Capture stays in place, so
    pods fail closed (refused) until the agent runs again; `tcpmesh cleanup` removes it.
    """
    from agent.app import Agent
    from agent.config import load_agent_config

    config = load_agent_config(config_path)
    _setup_logging(config.log_level)
    run_event_loop(Agent(config, config_path).run(), config.proxy.event_loop)


def run_event_loop(main_coroutine, event_loop: str) -> None:
    """Run the agent on uvloop (about 1.7x the standard loop for this data path) or asyncio."""
    if event_loop == "uvloop":
        import uvloop

        uvloop.run(main_coroutine)
    else:
        asyncio.run(main_coroutine)


@main.command()
@click.option("--config", "config_path", default="/etc/tcpmesh/config.yaml", show_default=True,
              type=click.Path(dir_okay=False), help="Agent config file (YAML).")
@click.option("--dry-run", is_flag=True, help="List what would be removed; change nothing.")
@click.option("--systemd-stop-post", "stop_post_unit", default="", metavar="UNIT",
              help="As ExecStopPost of UNIT: clean up only for a stop job, never on a restart, a failure or a "
                   "shutdown (docs/install-systemd.md).")
def cleanup(config_path: str, dry_run: bool, stop_post_unit: str) -> None:
    """Remove everything tcpmesh made on this node, in any capture mode.

    Detaches every tcpmesh program from the cgroups under capture.cgroup_scope (default: the
    whole cgroup_root), unpins capture.bpffs_dir, and removes the tc filters, rules and TPROXY
    rules of the other modes in this network namespace. Stop the agent first. Safe to run twice.
    """
    from agent.host.cleanup import run_cleanup
    from agent.config import load_config

    if stop_post_unit:
        from agent.service.stop_post import ask_systemd, decide

        decision = decide(stop_post_unit, ask_systemd(stop_post_unit))
        click.echo(decision.reason)
        if not decision.cleanup:
            return
    report = run_cleanup(load_config(config_path), dry_run=dry_run)
    for line in report.removed:
        click.echo(line)
    for note in report.notes:
        click.echo(f"note: {note}")
    if not report.removed:
        click.echo("nothing of tcpmesh left to remove")
    for problem in report.problems:
        click.echo(f"problem: {problem}", err=True)
    if report.problems:
        sys.exit(1)
