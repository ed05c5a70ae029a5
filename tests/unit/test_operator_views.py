"""What the operator reads in a terminal (#22 item 6): tables whose columns fit their widest cell,
a closed flow's duration apart from how long ago it closed, `flows --follow` that starts now
(`--since` for history), `workload list` with a header, doctor's clock warning with why and the fix."""

from __future__ import annotations

import asyncio
import json
import threading

from click.testing import CliRunner

from agent.cli import main
from agent.connection import flow as F
from agent.connection.facts import ClientProcess, ConnectionFacts
from agent.control.admin_socket import AdminSocket
from agent.host import probes
from agent.table import Follower, render
from agent.telemetry.cli import HEADERS, flow_row, parse_since
from agent.telemetry.flows import FlowTable


def record(comm="psql", start=100.0, end=None, state="closed"):
    return {"source_namespace": "shop", "source_workload": "web", "source_ip": "10.0.0.2", "source_port": 40000,
            "pid": 4242, "comm": comm, "uid": 0, "destination_namespace": "data", "destination_workload": "db",
            "destination_ip": "10.0.0.9", "destination_port": 5432, "response_flags": "-", "bytes_received": 2048,
            "bytes_sent": 10, "start_time": start, "end_time": end, "state": state, "reporter": "source"}


def test_columns_line_up_under_their_headers_with_a_long_process_name():
    rows = [flow_row(record(), 400.0), flow_row(record(comm="a-very-long-process-name-indeed"), 400.0)]
    lines = render(HEADERS, rows)
    start = lines[0].index("DESTINATION")
    assert all(line[start:].startswith("data/db:5432") for line in lines[1:]), "\n".join(lines)
    follow = Follower(HEADERS, [0] * len(HEADERS))
    follow.header()
    first, second = follow.line(rows[0]), follow.line(rows[1])
    assert second.index("data/db:5432") >= first.index("data/db:5432")  # a column widens, never overlaps


def test_a_closed_flow_shows_its_duration_and_how_long_ago_it_closed():
    row = dict(zip(HEADERS, flow_row(record(start=100.0, end=101.5), now=400.0)))
    assert (row["STATE"], row["DURATION"], row["CLOSED"]) == ("CLOSED", "1.5s", "5m ago")
    live = dict(zip(HEADERS, flow_row(record(start=100.0, state="open"), now=130.0)))
    assert (live["DURATION"], live["CLOSED"]) == ("30.0s", "-")


def test_since_takes_seconds_minutes_and_hours():
    assert (parse_since("90"), parse_since("90s"), parse_since("5m"), parse_since("2h")) == (90, 90, 300, 7200)


def flow(destination, port):
    facts = ConnectionFacts("10.0.0.9", port, bytes.fromhex("ab" * 8), "10.0.0.2", 40000, ClientProcess(7, 0, "psql"), 1)
    f = F.Flow(F.REPORTER_SOURCE, facts)
    f.source_workload, f.source_namespace = "web", "shop"
    f.destination_workload, f.destination_namespace = destination, "data"
    return f


class Workloads:
    def describe(self):
        return [{"name": "web", "namespace": "shop", "ip": "10.0.0.2", "node": "node1", "source": "file",
                 "local": True, "captured": True, "problem": "", "spiffe_id": "spiffe://td/ns/shop/sa/web"},
                {"name": "a-workload-with-a-long-name", "namespace": "data", "ip": "10.0.0.9", "node": "node2",
                 "source": "runtime", "local": False, "captured": False, "problem": "",
                 "spiffe_id": "spiffe://td/ns/data/sa/db"}]


def serve(tmp_path, table):
    path = str(tmp_path / "agent.sock")
    loop = asyncio.new_event_loop()
    server = AdminSocket(path, Workloads(), flows=lambda req: table.query(req.get("workload"), req.get("port"),
                                                                          int(req.get("after") or 0)))
    loop.run_until_complete(server.start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def stop():
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.run_until_complete(server.stop())
        loop.close()
    return path, stop


def test_workload_list_has_a_header_and_aligned_columns(tmp_path):
    path, stop = serve(tmp_path, FlowTable())
    try:
        out = CliRunner().invoke(main, ["workload", "list", "--socket", path]).output.splitlines()
    finally:
        stop()
    assert out[0].split() == ["WORKLOAD", "IP", "NODE", "SOURCE", "STATE", "SPIFFE", "ID"]
    column = out[0].index("IP")
    assert out[1][column:].startswith("10.0.0.2") and out[2][column:].startswith("10.0.0.9")
    assert "captured" in out[1] and "remote" in out[2]


def test_follow_with_since_prints_the_recent_past_first(tmp_path, monkeypatch):
    from agent.telemetry import cli as flows_cli

    table = FlowTable()
    old = flow("db", 5432)
    table.opened(old)
    old.close()
    table.closed(old)
    path, stop = serve(tmp_path, table)
    monkeypatch.setattr(flows_cli.time, "sleep", lambda s: (_ for _ in ()).throw(KeyboardInterrupt))
    try:
        now = CliRunner().invoke(main, ["flows", "-f", "--json", "--socket", path])
        since = CliRunner().invoke(main, ["flows", "-f", "--json", "--since", "5m", "--socket", path])
    finally:
        stop()
    assert now.exit_code == 0 and now.output == ""
    assert [json.loads(line)["destination_workload"] for line in since.output.splitlines()] == ["db"]


def test_doctor_s_clock_warning_says_why_it_matters_and_what_to_do(monkeypatch):
    monkeypatch.setattr(probes, "_adjtimex_state", lambda: probes.TIME_ERROR)
    probe = probes.probe_clock()
    assert probe.result == probes.WARN
    assert "Why it matters" in probe.error and "mTLS handshake" in probe.error and "2 minutes" in probe.error
    assert "Fix:" in probe.error and "timedatectl" in probe.error
