"""The flow table (open + recent flows, filters, cursor, access records) and `tcpmesh flows` over a
real admin socket; `tcpmesh audit verify` exit codes and messages."""

from __future__ import annotations

import asyncio
import json
import threading

from click.testing import CliRunner

from agent.audit.chain import GENESIS, seal
from agent.audit.keys import ensure_keys
from agent.cli import main
from agent.control.admin_socket import AdminSocket
from agent.connection import flow as F
from agent.connection.facts import ClientProcess, ConnectionFacts
from agent.telemetry.flows import FlowTable


class Sink:
    def __init__(self) -> None:
        self.records: list[dict] = []

    def submit(self, record: dict) -> None:
        self.records.append(record)


def flow(src: str, dst: str, port: int, pid: int = 0) -> F.Flow:
    process = ClientProcess(pid, 0, "psql") if pid else None
    f = F.Flow(F.REPORTER_SOURCE, ConnectionFacts("", port, F.new_flow_id(), process=process, cgroup_id=77))
    f.source_workload, f.source_namespace, f.destination_workload, f.destination_namespace = src, "shop", dst, "data"
    return f


def test_query_filters_by_workload_and_port_and_follows_a_cursor():
    table = FlowTable()
    a, b, c = flow("web", "db", 5432), flow("web", "cache", 6379), flow("batch", "db", 5432)
    for f in (a, b, c):
        table.opened(f)
    table.closed(a)
    assert {r["destination_workload"] for r in table.query(workload="cache")["flows"]} == {"cache"}
    assert {r["source_workload"] for r in table.query(workload="data/db")["flows"]} == {"web", "batch"}
    assert len(table.query(port=5432)["flows"]) == 2
    first = table.query()
    assert [r["state"] for r in first["flows"]] == ["open", "open", "closed"]
    table.closed(b)
    later = table.query(after=first["cursor"])
    assert [(r["destination_workload"], r["state"]) for r in later["flows"]] == [("db", "open"), ("cache", "closed")]


def test_one_access_record_at_close_and_one_at_open_when_configured():
    sink = Sink()
    table = FlowTable(access_log=sink)
    f = flow("web", "db", 5432, pid=4242)
    table.opened(f)
    assert sink.records == []
    f.close()
    table.closed(f)
    (record,) = sink.records
    assert record["event"] == "close" and record["decision"] == "allow" and record["pid"] == 4242
    assert record["comm"] == "psql" and record["uid"] == 0 and record["cgroup_id"] == 77
    assert record["time"].endswith("Z") and record["duration_seconds"] is not None
    table = FlowTable(access_log=sink, log_open=True)
    denied = flow("web", "db", 5432)
    table.opened(denied)
    denied.fail(F.FLAG_DENY, "policy data/deny")
    table.closed(denied)
    assert [r["event"] for r in sink.records[1:]] == ["open", "close"]
    assert sink.records[-1]["decision"] == "deny"


class FakeWorkloads:
    def describe(self):
        return []


def test_tcpmesh_flows_reads_the_admin_socket(tmp_path):
    table = FlowTable()
    live = flow("web", "db", 5432, pid=4242)
    table.opened(live)
    table.opened(other := flow("web", "cache", 6379, pid=1))
    table.closed(other)
    path = str(tmp_path / "agent.sock")
    loop = asyncio.new_event_loop()
    server = AdminSocket(path, FakeWorkloads(), flows=lambda req: table.query(req.get("workload"), req.get("port"),
                                                                              int(req.get("after") or 0)))
    loop.run_until_complete(server.start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        runner = CliRunner()
        result = runner.invoke(main, ["flows", "--json", "--port", "5432", "--socket", path])
        assert result.exit_code == 0, result.output
        (record,) = [json.loads(line) for line in result.output.splitlines()]
        assert record["pid"] == 4242 and record["comm"] == "psql" and record["state"] == "open"
        table_out = runner.invoke(main, ["flows", "--socket", path]).output
        assert "4242/psql" in table_out and "shop/web" in table_out and "data/cache:6379" in table_out
        assert "CLOSED" in table_out and "OPEN" in table_out
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.run_until_complete(server.stop())
        loop.close()


def test_tcpmesh_flows_follow_prints_each_flow_when_it_opens_and_when_it_closes(tmp_path, monkeypatch):
    from agent.telemetry import cli as flows_cli

    table = FlowTable()
    live = flow("web", "db", 5432, pid=4242)
    table.opened(live)
    path = str(tmp_path / "agent.sock")
    loop = asyncio.new_event_loop()
    server = AdminSocket(path, FakeWorkloads(), flows=lambda req: table.query(req.get("workload"), req.get("port"),
                                                                              int(req.get("after") or 0)))
    loop.run_until_complete(server.start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    ticks = []

    def tick(seconds):
        ticks.append(seconds)
        if len(ticks) == 1:
            table.opened(other := flow("web", "cache", 6379, pid=7))
            table.closed(live)
            table.closed(other)
        elif len(ticks) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(flows_cli.time, "sleep", tick)
    try:
        result = CliRunner().invoke(main, ["flows", "--follow", "--json", "--socket", path])
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.run_until_complete(server.stop())
        loop.close()
    assert result.exit_code == 0, result.output
    events = [(r["destination_workload"], r["state"]) for r in map(json.loads, result.output.splitlines())]
    # follow starts now: the flow open at the start prints when it closes, not as backlog; nothing twice
    assert events == [("db", "closed"), ("cache", "closed")]


def test_flows_without_an_agent_says_how_to_fix_it(tmp_path):
    result = CliRunner().invoke(main, ["flows", "--socket", str(tmp_path / "none.sock")])
    assert result.exit_code == 2 and "cannot reach the agent" in result.output


def test_audit_verify_exit_codes_name_the_record(tmp_path):
    path, key_file = tmp_path / "access.log", str(tmp_path / "keys" / "audit.key")
    keys, _ = ensure_keys(key_file)
    lines, prev = [], GENESIS
    for seq, event in enumerate(["file", "close", "close", "close"]):
        line, prev = seal({"event": event, "flow_id": f"f{seq}"}, seq, prev, keys.current)
        lines.append(line)
    path.write_bytes(b"".join(lines))
    runner = CliRunner()
    ok = runner.invoke(main, ["audit", "verify", "--key", key_file, str(path)])
    assert ok.exit_code == 0 and "OK: 4 records, seq 0..3" in ok.output
    path.write_bytes(b"".join(lines[:2] + lines[3:]))
    bad = runner.invoke(main, ["audit", "verify", "--key", key_file, str(path)])
    assert bad.exit_code == 1 and "FAILED (removed): seq 2 removed" in bad.output
    missing = runner.invoke(main, ["audit", "verify", "--key", key_file, str(tmp_path / "nope.log")])
    assert missing.exit_code == 2 and "cannot read" in missing.output
    no_key = runner.invoke(main, ["audit", "verify", "--key", str(tmp_path / "none.key"), str(path)])
    assert no_key.exit_code == 2 and "none.key does not exist" in no_key.output
    without = runner.invoke(main, ["audit", "verify", str(path)])
    assert without.exit_code == 2 and "--key" in without.output


def test_a_flow_record_is_the_facts_and_the_working_state_flat_plus_its_duration():
    facts = ConnectionFacts("10.0.0.2", 5432, bytes.fromhex("cd" * 8), "10.0.0.1", 40000, ClientProcess(7, 0, "psql"), 9)
    flow = F.Flow(F.REPORTER_DESTINATION, facts)
    assert flow.record()["duration_seconds"] is None
    flow.close(flow.start_time + 1.5)
    record = flow.record()
    assert tuple(record) == F.RECORD_KEYS
    assert record == {**{key: getattr(flow, key) for key in F.RECORD_KEYS[:-1]}, "duration_seconds": 1.5}
    assert (record["flow_id"], record["source_ip"], record["pid"], record["comm"], record["uid"], record["cgroup_id"],
            record["destination_port"]) == ("cd" * 8, "10.0.0.1", 7, "psql", 0, 9, 5432)
    bare = F.Flow(F.REPORTER_DESTINATION).record()  # nothing known yet: the values an unknown field always had
    assert (bare["flow_id"], bare["source_ip"], bare["source_port"], bare["pid"], bare["comm"], bare["uid"],
            bare["cgroup_id"]) == ("", "", 0, None, None, None, None)
