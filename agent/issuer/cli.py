"""``tcpmesh issuer …``: run the issuer, make the bootstrap token key, make one-time bootstrap tokens.

Thin: parses options and calls ``run`` / ``tokens``."""

from __future__ import annotations

import asyncio
import logging
import sys
import time

import click

from agent.issuer.tokens import DEFAULT_TOKEN_TTL_SECONDS, MAX_TOKEN_TTL_SECONDS


@click.group()
def issuer() -> None:
    """The issuer: signs SVIDs only for identities the registry places on the asking node.

    \b
      tcpmesh ca issue-issuer --ca ./root-ca --out /etc/tcpmesh/issuer
      tcpmesh issuer token-key --out /etc/tcpmesh/issuer/token.key
      tcpmesh issuer run --config /etc/tcpmesh/issuer.yaml
      tcpmesh issuer token node1 --key /etc/tcpmesh/issuer/token.key    (one join of node1)
    """


@issuer.command("run")
@click.option("--config", "config_path", default="/etc/tcpmesh/issuer.yaml", show_default=True,
              type=click.Path(dir_okay=False), help="Issuer config file (YAML).")
@click.option("--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"]))
def issuer_run(config_path: str, log_level: str) -> None:
    """Run the issuer until SIGTERM."""
    from agent.issuer.config import load_issuer_config
    from agent.issuer.run import run_issuer

    config = load_issuer_config(config_path)
    logging.basicConfig(level=getattr(logging, log_level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(run_issuer(config))


@issuer.command("token-key")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="File to create (0600).")
def issuer_token_key(out: str) -> None:
    """Create the key bootstrap tokens are made and checked with (shared by every issuer replica)."""
    from agent.issuer.tokens import create_token_key

    create_token_key(out)
    click.echo(f"created token key {out} (mode 0600); copy it to every issuer replica's tokens.key_file")


@issuer.command("token")
@click.argument("node")
@click.option("--key", "key_file", required=True, type=click.Path(dir_okay=False, exists=True))
@click.option("--ttl", "ttl_seconds", default=DEFAULT_TOKEN_TTL_SECONDS, show_default=True,
              type=click.IntRange(1, MAX_TOKEN_TTL_SECONDS), help="Seconds until the token expires.")
def issuer_token(node: str, key_file: str, ttl_seconds: int) -> None:
    """Print a one-time bootstrap token for NODE (its agent's identity.issuer.bootstrap_token_file)."""
    from agent.issuer.tokens import load_token_key, make_token

    click.echo(make_token(load_token_key(key_file), node, time.time(), ttl_seconds))
