"""Hostile: someone who can write the access log's directory edits records, forges a tail and restarts
the agent (issue #15 item 6). The chain is keyed (HMAC-SHA256, key outside the log directory, 0600):
the restarted writer reports the break (log line, metric, a break record) instead of continuing it,
and `tcpmesh audit verify --key` names every edited record."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat

import pytest
from click.testing import CliRunner
from prometheus_client import CollectorRegistry

from agent.audit.writer import AccessLog
from agent.cli import main
from agent.telemetry.metrics import Metrics


def record(i: int) -> dict:
    return {"event": "close", "flow_id": f"{i:016x}", "bytes_sent": 1000 + i, "comm": "psql", "cgroup_id": 0}


def run_writer(path: str, key: str, records: range, metrics: Metrics | None = None) -> None:
    log = AccessLog(path, key_path=key, node="node1", metrics=metrics)
    log.start()
    for i in records:
        log.submit(record(i))
    assert log.flush()
    log.stop()


def flip_digit(line: bytes, field: bytes) -> bytes:
    at = line.index(field) + len(field)
    return line[:at] + (b"8" if line[at:at + 1] != b"8" else b"7") + line[at + 1:]


def verify(key: str, *files: str):
    return CliRunner().invoke(main, ["audit", "verify", "--key", key, *files])


@pytest.fixture
def world(tmp_path):
    log_dir, key_dir = tmp_path / "log", tmp_path / "lib"
    return str(log_dir / "access.log"), str(key_dir / "audit.key")


def test_one_byte_of_an_old_and_of_the_last_record_edited_then_restart_is_reported_and_named(world, caplog):
    path, key = world
    run_writer(path, key, range(20))
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600, "the key is created for its owner only"
    lines = open(path, "rb").read().splitlines(keepends=True)
    assert len(lines) == 21
    lines[5] = flip_digit(lines[5], b'"bytes_sent":')  # seq 5, an old record
    lines[-1] = flip_digit(lines[-1], b'"bytes_sent":')  # seq 20, the last record
    open(path, "wb").write(b"".join(lines))

    metrics = Metrics(CollectorRegistry())
    with caplog.at_level(logging.ERROR, logger="tcpmesh.audit"):
        run_writer(path, key, range(20, 22), metrics)
    assert any("broken" in r.getMessage() and "access.log:21" in r.getMessage() for r in caplog.records), \
        [r.getMessage() for r in caplog.records]
    assert metrics.registry.get_sample_value("tcpmesh_access_log_chain_breaks_total", {"kind": "changed"}) >= 1
    docs = [json.loads(raw) for raw in open(path, "rb")]
    breaks = [d for d in docs if d["event"] == "break"]
    assert len(breaks) == 1, "the restarted writer names the break in the log"
    assert breaks[0]["resumed_after"] == 19 and any(f["at"].endswith("access.log:21") for f in breaks[0]["findings"])
    assert docs[-1]["flow_id"] == f"{21:016x}", "the log goes on after the break record"

    out = verify(key, path)
    assert out.exit_code == 1, out.output
    assert "FAILED (changed): record at " in out.stdout and f"{path}:6 was changed" in out.stdout, out.stdout
    assert f"{path}:21 was changed" in out.stdout, out.stdout
    assert "break recorded by the agent" in out.stderr


def test_a_tail_rewritten_with_recomputed_digests_is_not_continued(world, caplog):
    """The attack on the unkeyed chain: replace the last records by forgeries whose chain fields are
    recomputed (sha256 over the body, linked to the record before) — a forger without the key can do
    no better."""
    path, key = world
    run_writer(path, key, range(8))
    lines = open(path, "rb").read().splitlines(keepends=True)
    good = json.loads(lines[5])
    prev = good.get("mac") or good.get("digest")
    forged = []
    for seq in (6, 7, 8):
        body = {"event": "close", "flow_id": "f" * 16, "bytes_sent": 0, "comm": "innocent", "cgroup_id": 0,
                "node": "node1", "seq": seq, "prev": prev, "key": good.get("key", "")}
        text = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
        prev = hashlib.sha256(text).hexdigest()
        for field in ("mac", "digest"):
            if field in good:
                forged.append(text[:-1] + f',"{field}":"{prev}"}}\n'.encode())
    open(path, "wb").write(b"".join(lines[:6] + forged))

    metrics = Metrics(CollectorRegistry())
    with caplog.at_level(logging.ERROR, logger="tcpmesh.audit"):
        run_writer(path, key, range(8, 9), metrics)
    docs = [json.loads(raw) for raw in open(path, "rb")]
    after = docs[9:]
    assert after[0]["event"] == "break" and after[0]["resumed_after"] == 5, after[0]
    assert after[0]["seq"] == 6 and after[0]["prev"] == docs[5].get("mac"), "resumes after the last true record"
    assert sum(metrics.registry.get_sample_value("tcpmesh_access_log_chain_breaks_total", {"kind": k}) or 0
               for k in ("changed", "invalid")) >= 3
    out = verify(key, path)
    assert out.exit_code == 1
    for line_no in (7, 8, 9):
        assert f"{path}:{line_no} was changed" in out.stdout, out.stdout


def test_the_key_file_is_refused_inside_the_log_directory_or_readable_by_others(tmp_path):
    from agent.audit.keys import AuditKeyError

    path = str(tmp_path / "log" / "access.log")
    inside = AccessLog(path, key_path=str(tmp_path / "log" / "keys" / "audit.key"))
    with pytest.raises(AuditKeyError, match="inside the access log's directory"):
        inside.start()
    key = tmp_path / "lib" / "audit.key"
    run_writer(path, str(key), range(1))
    os.chmod(key, 0o640)
    with pytest.raises(AuditKeyError, match="chmod 600"):
        AccessLog(path, key_path=str(key)).start()


def test_a_rotated_key_is_announced_and_a_retired_key_cannot_seal_after_it(world):
    from agent.audit.chain import seal
    from agent.audit.keys import add_key, read_keys

    path, key = world
    run_writer(path, key, range(3))
    old = read_keys(key).current
    new = add_key(key)
    run_writer(path, key, range(3, 5))
    docs = [json.loads(raw) for raw in open(path, "rb")]
    announce = next(d for d in docs if d["event"] == "key")
    assert announce["key"] == old.id and announce["next_key"] == new.id
    assert docs[-1]["key"] == new.id
    assert verify(key, path).exit_code == 0
    # someone who kept the retired key appends a record sealed with it
    line, _ = seal({"event": "close", "flow_id": "e" * 16}, docs[-1]["seq"] + 1, docs[-1]["mac"], old)
    with open(path, "ab") as f:
        f.write(line)
    out = verify(key, path)
    assert out.exit_code == 1 and "FAILED (key)" in out.stdout, out.stdout

