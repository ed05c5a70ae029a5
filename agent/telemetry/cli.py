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

from agent.admin_client import ask
from agent.control.target import resolve_socket, target_options
from agent.errors import TcpmeshError

FOLLOW_INTERVAL = 1.0
HEADER = (f"{'STATE':<6} {'REPORTER':<11} {'SOURCE':<24} {'PROCESS':<22} {'DESTINATION':<30} "
          f"{'SENT→':>10} {'←RECV':>10} {'AGE':>7} FLAGS")


def fetch(path: str, workload: str | None, port: int | None, after: int = 0) -> dict:
    return ask(path, {"op": "flows.list", "workload": workload, "port": port, "after": after})


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)


def _age(record: dict, now: float) -> str:
    seconds = (record.get("end_time") or now) - record["start_time"]
    return f"{seconds:.1f}s" if seconds < 100 else f"{seconds / 60:.0f}m"


def format_line(record: dict, now: float, state: str | None = None) -> str:
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
    return (f"{(state or record.get('state', '')).upper():<6} {record['reporter']:<11} {source:<24} {process:<22} "
            f"{destination:<30} {_human_bytes(record['bytes_received']):>10} {_human_bytes(record['bytes_sent']):>10} "
            f"{_age(record, now):>7} {flags}")


def _key(record: dict) -> tuple:
    return record.get("flow_id"), record["reporter"], record["start_time"]


@click.command()
@click.option("--follow", "-f", is_flag=True, help="Keep printing flows as they open and close (Ctrl-C stops).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per flow (per event with --follow).")
@click.option("--workload", help="Only flows from or to this workload (NAME or NAMESPACE/NAME).")
@click.option("--port", type=click.IntRange(1, 65535), help="Only flows to this destination port.")
@target_options
def flows(follow, as_json, workload, port, socket_path, config_path, target_lab, target_node) -> None:
    """Open and recently closed TCP flows on this node, with the client process of each."""
    path = resolve_socket(socket_path, config_path, target_lab, target_node)
    answer = fetch(path, workload, port)
    if not follow:
        records = answer["flows"]
        if as_json:
            for record in records:
                click.echo(json.dumps(record, sort_keys=True))
            return
        now = time.time()
        click.echo(HEADER)
        for record in records:
            click.echo(format_line(record, now))
        return
    seen_open: set = set()
    if not as_json:
        click.echo(HEADER)
    try:
        while True:
            now = time.time()
            for record in answer["flows"]:
                key = _key(record)
                if record["state"] == "open" and key in seen_open:
                    continue
                if record["state"] == "open":
                    seen_open.add(key)
                else:
                    seen_open.discard(key)
                click.echo(json.dumps(record, sort_keys=True) if as_json else format_line(record, now))
            time.sleep(FOLLOW_INTERVAL)
            answer = fetch(path, workload, port, after=answer["cursor"])
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
