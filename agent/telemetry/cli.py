"""What a running agent reports, asked from the command line: ``tcpmesh flows`` (the node's open and
recently closed flows) and ``tcpmesh cert inspect`` (the certificates it serves, or those of a PEM
file). Both ask the agent's admin socket (which agent: agent.control.target); `cert inspect --admin
URL` asks the admin HTTP endpoint's /debug/certs instead, only when given.

``flows`` is like ``hubble observe`` for L4: one line per flow (or per event with ``--follow``), with the client's
process (pid/comm/uid) as the BPF hook saw it at connect time. ``--json`` prints one JSON object per
line instead. Reads through the admin socket (root only, 0600): flow records carry addresses and
process names, which the admin HTTP port (reachable by Prometheus) is not the place to serve.
"""

from __future__ import annotations

import json
import time

import click

from agent import table
from agent.admin_client import ask
from agent.control.target import resolve_socket, target_options
from agent.errors import TcpmeshError

FOLLOW_INTERVAL = 1.0
HEADERS = ("STATE", "REPORTER", "SOURCE", "PROCESS", "DESTINATION", "SENT→", "←RECV", "DURATION", "CLOSED", "FLAGS")
RIGHT = (False, False, False, False, False, True, True, True, True, False)
MIN_WIDTHS = (6, 11, 16, 16, 22, 8, 8, 8, 8, 0)  # --follow: a start; columns widen for longer cells
FLOWS_HELP = """Open and recently closed TCP flows on this node, with the client process of each.

\b
One row is one flow: one TCP connection through this node's agent, as this node saw it.
A connection between pods of two nodes is one flow on each node, with the same flow id (--json):
  REPORTER     source (the client's node) or destination (the server's node)
  SOURCE       the client workload (NAMESPACE/NAME), or IP:PORT outside the mesh
  PROCESS      the client's pid/command and uid, as the kernel saw them at connect() (both nodes)
  DESTINATION  the server workload and port (svc/NS/NAME→... when a Service was dialled)
  SENT→ ←RECV  bytes from the client to the server, and back
  DURATION     how long the flow lasted (so far, if open)
  CLOSED       how long ago it closed (- while open)
  FLAGS        the result (- clean; DENY, UF, ... in docs/telemetry.md) and the policy that decided
The agent keeps open flows and its last 1,024 closed ones. --follow prints a row when a flow
opens and when it closes, from now on; add --since to print the recent past first.
"""


def fetch(path: str, workload: str | None, port: int | None, after: int = 0) -> dict:
    return ask(path, {"op": "flows.list", "workload": workload, "port": port, "after": after})


def parse_since(text: str) -> float:
    """--since: seconds from 90, 90s, 5m, 2h."""
    units = {"s": 1, "m": 60, "h": 3600}
    number, unit = (text[:-1], text[-1]) if text and text[-1] in units else (text, "s")
    try:
        seconds = float(number) * units[unit]
    except ValueError:
        raise click.BadParameter(f"{text!r}: give a duration such as 90s, 5m or 2h", param_hint="--since") from None
    if seconds <= 0:
        raise click.BadParameter(f"{text!r}: must be more than 0", param_hint="--since")
    return seconds


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)


def _span(seconds: float) -> str:
    if seconds < 100:
        return f"{seconds:.1f}s"
    if seconds < 6000:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def flow_row(record: dict, now: float) -> list[str]:
    """The table cells of one flow record (HEADERS)."""
    source = f"{record['source_namespace']}/{record['source_workload']}"
    if record["source_workload"] == "unknown":
        source = f"{record['source_ip']}:{record['source_port']}"
    process = f"{record['pid']}/{record['comm']} uid={record['uid']}" if record.get("pid") else "-"
    destination = f"{record['destination_namespace']}/{record['destination_workload']}:{record['destination_port']}"
    if record["destination_workload"] == "unknown":
        destination = f"{record['destination_ip']}:{record['destination_port']}"
    service = record.get("destination_service_name", "unknown")
    if service != "unknown":  # dialled a Service: show it before the endpoint the proxy chose
        destination = f"svc/{record['destination_service_namespace']}/{service}→{destination}"
    flags = record["response_flags"]
    if record.get("policy"):
        flags += f" policy={record['policy']}"
    end = record.get("end_time")
    return [record.get("state", "").upper(), record["reporter"], source, process, destination,
            _human_bytes(record["bytes_received"]), _human_bytes(record["bytes_sent"]),
            _span((end or now) - record["start_time"]), _span(now - end) + " ago" if end else "-", flags]


def _recent(record: dict, since: float | None) -> bool:
    return since is None or record["state"] == "open" or (record.get("end_time") or record["start_time"]) >= since


def _key(record: dict) -> tuple:
    return record.get("flow_id"), record["reporter"], record["start_time"]


@click.command(help=FLOWS_HELP)
@click.option("--follow", "-f", is_flag=True, help="Print a row when a flow opens and when it closes, from now on "
                                                   "(Ctrl-C stops).")
@click.option("--since", metavar="DURATION", help="Only flows open now or closed within DURATION (90s, 5m, 2h); "
                                                  "with --follow, print those first.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per flow (per event with --follow).")
@click.option("--workload", help="Only flows from or to this workload (NAME or NAMESPACE/NAME; the agent says if "
                                 "it has no such workload).")
@click.option("--port", type=click.IntRange(1, 65535), help="Only flows to this destination port.")
@target_options
def flows(follow, since, as_json, workload, port, socket_path, config_path, target_lab, target_node) -> None:
    path = resolve_socket(socket_path, config_path, target_lab, target_node)
    answer = fetch(path, workload, port)
    cutoff = time.time() - parse_since(since) if since else None
    if not follow:
        records = [r for r in answer["flows"] if _recent(r, cutoff)]
        if as_json:
            for record in records:
                click.echo(json.dumps(record, sort_keys=True))
            return
        now = time.time()
        for line in table.render(HEADERS, [flow_row(r, now) for r in records], RIGHT):
            click.echo(line)
        return
    view = table.Follower(HEADERS, MIN_WIDTHS, RIGHT)
    # from now on: flows open at the start print when they close; the backlog only with --since
    seen_open = {_key(r) for r in answer["flows"] if r["state"] == "open"}
    backlog = [r for r in answer["flows"] if cutoff is not None and _recent(r, cutoff)]
    if not as_json:
        click.echo(view.header())
    try:
        while True:
            now = time.time()
            for record in backlog:
                click.echo(json.dumps(record, sort_keys=True) if as_json else view.line(flow_row(record, now)))
            time.sleep(FOLLOW_INTERVAL)
            answer = fetch(path, workload, port, after=answer["cursor"])
            backlog = []
            for record in answer["flows"]:
                key = _key(record)
                if record["state"] == "open":
                    if key in seen_open:
                        continue
                    seen_open.add(key)
                else:
                    seen_open.discard(key)
                backlog.append(record)
    except KeyboardInterrupt:
        return


@click.group()
def cert() -> None:
    """Inspect the certificates a running agent serves."""


@cert.command("inspect")
@click.argument("cert_file", metavar="[FILE]", required=False, type=click.Path(dir_okay=False, exists=True))
@click.option("--workload", help="Only this identity: a workload name, a SPIFFE ID, or NAMESPACE/SA.")
@target_options
@click.option("--admin", "admin_url", help="Ask this admin HTTP endpoint's /debug/certs instead of the admin "
                                          "socket, e.g. http://127.0.0.1:15020.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def cert_inspect(cert_file: str | None, workload: str | None, socket_path: str | None, config_path: str | None,
                 target_lab: str | None, target_node: str | None, admin_url: str | None, as_json: bool) -> None:
    """The identities this node serves: serials, validity, time to renewal, chain to which root.

    Asks the running agent through its admin socket (or --admin URL over HTTP). With FILE, describes
    the PEM certificates in that file instead (subject, SPIFFE ID, issuer, validity) and asks no agent.
    No key material is ever shown.
    """
    from agent.identity.report import format_report, select

    if cert_file is not None:
        from agent.identity.certfile import describe_pem, format_certificates

        with open(cert_file, "rb") as f:
            described = describe_pem(f.read(), cert_file)
        click.echo(json.dumps(described, indent=2) if as_json else format_certificates(described, cert_file))
        return
    if admin_url is not None:
        from agent.identity.cli import fetch_certs

        report = fetch_certs(admin_url)
    else:
        report = ask(resolve_socket(socket_path, config_path, target_lab, target_node), {"op": "certs"})["certs"]
    identities = select(report, workload)
    if workload is not None and not identities:
        known = ", ".join(i["spiffe_id"] for i in report.get("identities", [])) or "none"
        raise TcpmeshError(f"this node serves no identity matching {workload!r} (it serves: {known}); "
                           "is the workload registered on this node?")
    if as_json:
        click.echo(json.dumps({**report, "identities": identities}, indent=2))
    else:
        click.echo(format_report(report, identities))
