"""``tcpmesh ca`` (root, node intermediates, root rotation). Thin: parses options, calls ``ca`` /
``node_ca`` / ``root_rotation``, reads agents' ``/debug/certs`` over HTTP (``fetch_certs``), prints.
A ``TcpmeshError`` propagates to the root CLI, which prints it in one line.

Must not import ``agent.config`` (it sits above identity): ``tcpmesh cert inspect``, which finds the
running agent from its config file, is ``agent.telemetry.cli``'s.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import click

from agent.errors import TcpmeshError
from agent.identity.ca import DEFAULT_CA_VALID_DAYS
from agent.identity.node_ca import DEFAULT_NODE_CA_VALID_DAYS

CERTS_PATH = "/debug/certs"
FETCH_TIMEOUT_SECONDS = 5.0


@click.group()
def ca() -> None:
    """Manage the mesh's certificate authorities.

    \b
    The root stays offline; every node gets its own intermediate:
      tcpmesh ca init --trust-domain cluster.local --out ./root-ca
      tcpmesh ca issue-node node1 --ca ./root-ca --out /etc/tcpmesh/node-ca   (on/for node1)
    Roots are rotated with overlap by `tcpmesh ca rotate`.
    """


@ca.command("init")
@click.option("--trust-domain", required=True, help="SPIFFE trust domain, e.g. cluster.local.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Directory to write ca.crt and ca.key (0600) into.")
@click.option("--valid-days", type=click.IntRange(1), default=DEFAULT_CA_VALID_DAYS, show_default=True)
@click.option("--force", is_flag=True, help="Overwrite an existing CA in --out.")
def ca_init(trust_domain: str, out_dir: str, valid_days: int, force: bool) -> None:
    """Create a root CA for --trust-domain in --out. Keep it offline: agents never need it."""
    from agent.identity.ca import init_ca

    files = init_ca(trust_domain, out_dir, overwrite=force, valid_days=valid_days)
    click.echo(f"created root CA for spiffe://{trust_domain}: {files.cert_path} (key {files.key_path}, mode 0600), "
               f"valid until {files.not_after.isoformat()}")
    click.echo(f"next: tcpmesh ca issue-node <node> --ca {out_dir} --out <node CA dir>")


@ca.command("issue-node")
@click.argument("node")
@click.option("--ca", "ca_dir", required=True, type=click.Path(file_okay=False, exists=True),
              help="The root CA directory (from `tcpmesh ca init`).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="The node CA directory to write (the agent's identity.node_ca_dir).")
@click.option("--valid-days", type=click.IntRange(1), default=DEFAULT_NODE_CA_VALID_DAYS, show_default=True,
              help="Lifetime of the intermediate (capped at the root's). Re-issue before it ends.")
@click.option("--force", is_flag=True, help="Replace a directory of another node or trust domain, and its bundle.")
def ca_issue_node(node: str, ca_dir: str, out_dir: str, valid_days: int, force: bool) -> None:
    """Issue NODE's intermediate (CA, pathlen 0, confined to the trust domain) into --out.

    Writes node.crt, node.key (0600) and bundle.pem (the root). Re-running it renews the
    intermediate; a running agent picks the new one up and re-issues its SVIDs without dropping
    connections.
    """
    from agent.identity.bundle import short_fingerprint
    from agent.identity.node_ca import issue_node_files

    files = issue_node_files(ca_dir, node, out_dir, valid_days=valid_days, force=force)
    click.echo(f"issued node CA for {node} (spiffe://{files.trust_domain}) in {files.directory}: serial "
               f"{files.serial:x}, valid until {files.not_after.isoformat()}; bundle: "
               f"{', '.join(short_fingerprint(fp) for fp in files.bundle.fingerprints)}")


@ca.command("issue-issuer")
@click.option("--ca", "ca_dir", required=True, type=click.Path(file_okay=False, exists=True),
              help="The root CA directory (from `tcpmesh ca init`).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="The issuer's directory (its ca_dir): issuer.crt, issuer.key (0600), bundle.pem.")
@click.option("--valid-days", type=click.IntRange(1), default=30, show_default=True)
def ca_issue_issuer(ca_dir: str, out_dir: str, valid_days: int) -> None:
    """Issue the issuer's issuing intermediate (pathlen 0, confined to the trust domain) into --out.

    Every issuer replica loads the same directory; no node holds it (docs/identity.md "The issuer").
    """
    from agent.identity.issuer_ca import issue_issuer_files

    written = issue_issuer_files(ca_dir, out_dir, valid_days=valid_days)
    click.echo(f"issued the issuing CA for spiffe://{written.trust_domain} in {written.directory}, "
               f"valid until {written.not_after.isoformat()}")


@ca.command("issue-node-credential")
@click.argument("node")
@click.option("--ca", "ca_dir", required=True, type=click.Path(file_okay=False, exists=True),
              help="The root CA directory (from `tcpmesh ca init`).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="The node's credential directory (identity.issuer.credential_dir).")
@click.option("--valid-days", type=click.IntRange(1), default=7, show_default=True)
def ca_issue_node_credential(node: str, ca_dir: str, out_dir: str, valid_days: int) -> None:
    """Issue NODE's node credential (spiffe://<td>/node/NODE, client only, cannot sign) into --out.

    The alternative to a one-time bootstrap token: the agent presents it to the issuer once and then
    renews a short-lived node SVID in the same directory.
    """
    from agent.identity.issuer_ca import issue_node_credential

    written = issue_node_credential(ca_dir, node, out_dir, valid_days=valid_days)
    click.echo(f"issued the node credential spiffe://{written.trust_domain}/node/{node} in {written.directory}, "
               f"valid until {written.not_after.isoformat()}")


@ca.group("rotate", invoke_without_command=True)
@click.pass_context
def ca_rotate(ctx: click.Context) -> None:
    """Rotate the root CA with overlap, in three steps that each keep traffic flowing.

    \b
      1. add-root    create the new root, add it to every node's bundle.pem
      2. reissue     give every node a new intermediate from the new root
      3. remove-old  leave only the new root in every bundle.pem
    Every agent must apply a step before the next one starts: pass --wait-admin URL for each
    agent and the command checks it before and waits for it after. `status` shows where each
    node stands. Steps refuse to run out of order and are safe to repeat.
    """
    if ctx.invoked_subcommand is None:
        from agent.identity.root_rotation import plan_text

        click.echo(plan_text())


def _rotation_options(fn):
    fn = click.option("--timeout", type=float, default=60.0, show_default=True,
                      help="Seconds to wait for the agents (with --wait-admin).")(fn)
    fn = click.option("--wait-admin", "admin_urls", multiple=True, metavar="URL",
                      help="An agent's admin endpoint, e.g. http://10.0.0.1:15020 (repeat for every agent).")(fn)
    fn = click.option("--node-dir", "node_dirs", multiple=True, required=True, type=click.Path(file_okay=False),
                      help="A node CA directory (identity.node_ca_dir), an issuer-mode node's credential directory "
                           "(identity.issuer.credential_dir) or the issuer's directory (its ca_dir); repeat for "
                           "every node and the issuer.")(fn)
    return click.option("--new-ca", "new_ca", required=True, type=click.Path(file_okay=False),
                        help="The new root CA directory (created by add-root if empty).")(fn)


def _run_step(step: str, new_ca: str, node_dirs: tuple[str, ...], admin_urls: tuple[str, ...], timeout: float,
              **kwargs: Any) -> None:
    from agent.identity import root_rotation
    from agent.identity.bundle import fingerprint
    from agent.identity.ca import load_ca

    index = root_rotation.STEPS.index(step)
    if admin_urls and index > 0:
        previous = root_rotation.STEPS[index - 1]
        new = fingerprint(load_ca(new_ca).certificate)
        root_rotation.wait_for_agents(previous, new, admin_urls, fetch_certs, timeout=0)  # a precondition, no waiting
    action = {root_rotation.ADD_ROOT: root_rotation.add_root, root_rotation.REISSUE: root_rotation.reissue,
              root_rotation.REMOVE_OLD: root_rotation.remove_old}[step]
    for line in action(new_ca, list(node_dirs), **kwargs):
        click.echo(line)
    new = fingerprint(load_ca(new_ca).certificate)
    if admin_urls:
        click.echo(f"waiting up to {timeout:.0f}s for {len(admin_urls)} agents to apply {step} ...")
        root_rotation.wait_for_agents(step, new, admin_urls, fetch_certs, timeout=timeout)
        click.echo(f"every agent has applied {step}")
    else:
        click.echo(f"before the next step, make sure every agent has applied {step} (`tcpmesh cert inspect` on each "
                   "node, or pass --wait-admin)")
    if index + 1 < len(root_rotation.STEPS):
        click.echo(f"next: tcpmesh ca rotate {root_rotation.STEPS[index + 1]} --new-ca {new_ca} "
                   + " ".join(f"--node-dir {d}" for d in node_dirs))


@ca_rotate.command("add-root")
@_rotation_options
@click.option("--valid-days", type=click.IntRange(1), default=None, help="Lifetime of a newly created root.")
def rotate_add_root(new_ca: str, node_dirs: tuple[str, ...], admin_urls: tuple[str, ...], timeout: float,
                    valid_days: int | None) -> None:
    """Step 1: create the new root (if --new-ca is empty) and add it to every bundle."""
    _run_step("add-root", new_ca, node_dirs, admin_urls, timeout, valid_days=valid_days)


@ca_rotate.command("reissue")
@_rotation_options
@click.option("--valid-days", type=click.IntRange(1), default=DEFAULT_NODE_CA_VALID_DAYS, show_default=True)
@click.option("--wait-issuer", "issuer_addresses", multiple=True, metavar="HOST:PORT",
              help="An issuer replica (repeat for every one): after its new intermediate is written, wait until each "
                   "answers under the new root before the nodes are told to renew.")
def rotate_reissue(new_ca: str, node_dirs: tuple[str, ...], admin_urls: tuple[str, ...], timeout: float,
                   valid_days: int, issuer_addresses: tuple[str, ...]) -> None:
    """Step 2: a new intermediate from the new root for every node CA directory and the issuer; issuer-mode
    nodes (credential directories) get the new root first in their bundle and renew at the issuer."""
    waiter = None
    if issuer_addresses:
        wait_until_root = click.get_current_context().meta.get(ISSUER_WAIT_KEY)
        if wait_until_root is None:
            raise TcpmeshError("--wait-issuer needs the tcpmesh CLI (`tcpmesh ca rotate reissue`), which knows the issuer")

        def waiter(new: str) -> list[str]:
            from agent.identity import root_rotation
            from agent.identity.node_ca import BUNDLE_FILE

            directories = root_rotation.issuer_dirs(node_dirs)
            if not directories:
                raise TcpmeshError("--wait-issuer: pass the issuer's directory with --node-dir too")
            bundle_pem = (directories[0] / BUNDLE_FILE).read_text()
            trust_domain = root_rotation.read_node_dir(directories[0])[1].trust_domain
            return wait_until_root(list(issuer_addresses), bundle_pem, trust_domain, new, timeout)
    _run_step("reissue", new_ca, node_dirs, admin_urls, timeout, valid_days=valid_days, wait_issuers=waiter)


@ca_rotate.command("remove-old")
@_rotation_options
def rotate_remove_old(new_ca: str, node_dirs: tuple[str, ...], admin_urls: tuple[str, ...], timeout: float) -> None:
    """Step 3: leave only the new root in every bundle."""
    _run_step("remove-old", new_ca, node_dirs, admin_urls, timeout)


@ca_rotate.command("status")
@click.option("--new-ca", "new_ca", type=click.Path(file_okay=False), help="The new root CA directory.")
@click.option("--node-dir", "node_dirs", multiple=True, required=True, type=click.Path(file_okay=False))
def rotate_status(new_ca: str | None, node_dirs: tuple[str, ...]) -> None:
    """Show each node directory's bundle and the root its intermediate comes from."""
    from agent.identity import root_rotation

    new, states = root_rotation.status(new_ca, list(node_dirs))
    for state in states:
        done = [step for step in root_rotation.STEPS if new and root_rotation.step_done(step, state, new)]
        click.echo(f"{state.describe(new)}; steps done: {', '.join(done) or 'none'}")


AGENT_SERVER = "tcpmesh-admin"  # the Server header of agent.telemetry.admin
# ctx.meta key under which the composition root (agent/cli.py, the same literal) hands `ca rotate reissue`
# the issuer's `agent.issuer.client.wait_until_root`: identity sits below the issuer and must not import it
ISSUER_WAIT_KEY = "tcpmesh.issuer.wait_until_root"


def fetch_certs(admin_url: str) -> dict:
    """/debug/certs of the agent at ``admin_url``; a server that is not a tcpmesh agent is named as such."""
    url = admin_url.rstrip("/") + CERTS_PATH
    try:
        with urllib.request.urlopen(url, timeout=FETCH_TIMEOUT_SECONDS) as response:  # noqa: S310 (operator URL)
            _require_agent(url, response.status, response.headers.get("Server", ""))
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        _require_agent(url, exc.code, exc.headers.get("Server", "") if exc.headers else "")
        raise TcpmeshError(f"the tcpmesh agent at {url} answered HTTP {exc.code} (an agent older than "
                           "/debug/certs?)") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TcpmeshError(f"cannot reach the agent at {url}: {reason}; is it running, and is admin.address "
                           "reachable from here? (without --admin, commands use the agent's admin socket)") from None
    except ValueError as exc:
        raise TcpmeshError(f"{url} did not answer JSON ({exc})") from None


def _require_agent(url: str, code: int, server: str) -> None:
    if not server.startswith(AGENT_SERVER):
        raise TcpmeshError(f"{url} is not a tcpmesh agent: it answered HTTP {code} as server {server or 'unnamed'!r}; "
                           "check the address and port (admin.address and admin.port of the agent's config)")
