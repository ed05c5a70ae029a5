"""The access log writer: chained records in a file, rotation, restarts, and disk errors that never
reach the data path (logged, counted, and visible in the log as a gap record)."""

from __future__ import annotations

import errno
import json
import os

from prometheus_client import CollectorRegistry

from agent.audit.keys import read_keys
from agent.audit.verify import verify_files as verify_with_keys
from agent.audit.writer import AccessLog
from agent.telemetry.metrics import Metrics


def key_of(path: str) -> str:
    """The key file for a log at ``path``: outside the log's directory, as the writer insists."""
    return os.path.join(os.path.dirname(os.path.dirname(path)), "keys", "audit.key")


def verify_files(paths):
    return verify_with_keys(paths, read_keys(key_of(paths[-1])))


def record(i: int) -> dict:
    return {"event": "close", "flow_id": f"{i:016x}", "bytes_sent": i, "comm": "redis-cli", "cgroup_id": 0}


def write(log: AccessLog, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        log.submit(record(i))
    assert log.flush()


def lines(path) -> list[dict]:
    return [json.loads(line) for line in open(path, "rb")]


def sample(metrics: Metrics, name: str, labels: dict | None = None) -> float:
    return metrics.registry.get_sample_value(name, labels or {}) or 0.0


def test_records_are_chained_in_the_file_and_verify(tmp_path):
    path = str(tmp_path / "log" / "access.log")
    metrics = Metrics(CollectorRegistry())
    log = AccessLog(path, key_path=key_of(path), node="node1", metrics=metrics)
    log.start()
    write(log, 5)
    log.stop()
    docs = lines(path)
    assert [d["event"] for d in docs] == ["file"] + ["close"] * 5
    assert [d["seq"] for d in docs] == list(range(6)) and all(d["node"] == "node1" for d in docs)
    result = verify_files([path])
    assert result.ok and result.records == 6
    assert sample(metrics, "tcpmesh_access_log_records_total") == 6
    assert sample(metrics, "tcpmesh_access_log_sequence") == 5


def test_a_restarted_writer_continues_the_chain(tmp_path):
    path = str(tmp_path / "log" / "access.log")
    first = AccessLog(path, key_path=key_of(path))
    first.start()
    write(first, 3)
    first.stop()
    second = AccessLog(path, key_path=key_of(path))
    second.start()
    write(second, 2, start=3)
    second.stop()
    docs = lines(path)
    assert [d["seq"] for d in docs] == list(range(6)) and docs[4]["prev"] == docs[3]["mac"]
    assert verify_files([path]).ok


def test_a_crash_mid_line_leaves_a_torn_line_that_the_writer_and_verify_name_and_the_chain_goes_on(tmp_path):
    path = str(tmp_path / "log" / "access.log")
    first = AccessLog(path, key_path=key_of(path))
    first.start()
    write(first, 2)
    first.stop()
    with open(path, "ab") as f:
        f.write(b'{"event":"close","flow_id":"to')  # the agent died while writing
    second = AccessLog(path, key_path=key_of(path))
    second.start()
    write(second, 1, start=2)
    second.stop()
    result = verify_files([path])
    assert result.finding.kind == "invalid" and result.finding.entry.line == 4
    assert len(result.findings) == 1  # the break record and the record after it link to seq 2
    after = lines_after(path, 4)
    assert after[0]["event"] == "break" and after[0]["seq"] == 3 and after[0]["resumed_after"] == 2
    assert after[0]["findings"][0]["at"] == f"{path}:4" and after[1]["seq"] == 4


def lines_after(path, line_no):
    return [json.loads(raw) for raw in open(path, "rb").readlines()[line_no:]]


def test_rotation_by_size_keeps_one_chain_across_files(tmp_path):
    path = str(tmp_path / "log" / "access.log")
    log = AccessLog(path, key_path=key_of(path), max_bytes=4096, backups=3)
    log.start()
    write(log, 60)
    log.stop()
    files = [f"{path}.{i}" for i in (3, 2, 1) if os.path.exists(f"{path}.{i}")] + [path]
    assert len(files) == 4 and not os.path.exists(f"{path}.4")
    assert all(os.path.getsize(f) <= 4096 for f in files)
    result = verify_files(files)
    assert result.ok, result.finding
    assert result.notes and "continues a chain" in result.notes[0]  # the oldest file was rotated out
    assert verify_files([path]).ok
    assert lines(path)[0]["event"] == "file"


def test_disk_errors_never_reach_the_caller_and_leave_a_gap_record(tmp_path, caplog):
    path = str(tmp_path / "log" / "access.log")
    metrics = Metrics(CollectorRegistry())
    log = AccessLog(path, key_path=key_of(path), metrics=metrics)
    real_write = os.write
    failing = {"on": False}

    def flaky_write(fd, data):
        if failing["on"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    log._os_write = flaky_write
    log.start()
    write(log, 2)
    failing["on"] = True
    write(log, 3, start=2)  # submit() returns normally; the records are lost
    failing["on"] = False
    write(log, 1, start=5)
    log.stop()
    docs = lines(path)
    gap = docs[3]
    assert gap["event"] == "gap" and gap["dropped"] == 3 and gap["reasons"] == {"write_error": 3}
    assert docs[4]["flow_id"] == f"{5:016x}"
    assert verify_files([path]).ok  # the loss is visible, the chain intact
    assert sample(metrics, "tcpmesh_access_log_write_errors_total") == 3
    assert sample(metrics, "tcpmesh_access_log_dropped_records_total", {"reason": "write_error"}) == 3
    assert sum("No space left on device" in r.getMessage() for r in caplog.records) == 1  # logged once


def test_a_full_disk_device_is_survived(tmp_path):
    metrics = Metrics(CollectorRegistry())
    log = AccessLog("/dev/full", key_path=str(tmp_path / "audit.key"), metrics=metrics)
    log.start()
    write(log, 3)
    log.stop()
    assert sample(metrics, "tcpmesh_access_log_write_errors_total") >= 3


def test_a_full_queue_drops_without_blocking_and_the_log_says_how_many(tmp_path):
    path = str(tmp_path / "log" / "access.log")
    metrics = Metrics(CollectorRegistry())
    log = AccessLog(path, key_path=key_of(path), metrics=metrics, queue_size=4)
    for i in range(10):  # the writer thread is not started: the queue fills
        log.submit(record(i))
    assert sample(metrics, "tcpmesh_access_log_dropped_records_total", {"reason": "queue_full"}) == 6
    log.start()
    assert log.flush()
    log.submit(record(10))
    assert log.flush()
    log.stop()
    docs = lines(path)
    gaps = [d for d in docs if d["event"] == "gap"]
    assert gaps and gaps[0]["reasons"] == {"queue_full": 6}
    assert verify_files([path]).ok


def test_stdout_target_writes_chained_lines(capfd, tmp_path):
    log = AccessLog("-", key_path=str(tmp_path / "audit.key"), node="n")
    log.start()
    write(log, 2)
    log.stop()
    out = capfd.readouterr().out.splitlines()
    assert [json.loads(line)["seq"] for line in out] == [0, 1, 2]


def run_writer(path: str, key: str, records: range, metrics: Metrics | None = None) -> None:
    log = AccessLog(path, key_path=key, metrics=metrics)
    log.start()
    write(log, len(records), start=records.start)
    log.stop()


def test_a_break_is_reported_once_not_at_every_restart(tmp_path):
    path = str(tmp_path / "log" / "access.log")
    key = key_of(path)
    run_writer(path, key, range(5))
    lines = open(path, "rb").read().splitlines(keepends=True)
    lines[2] = lines[2].replace(b'"comm":"redis-cli"', b'"comm":"redis-cl1"')
    open(path, "wb").write(b"".join(lines))
    run_writer(path, key, range(5, 6))
    metrics = Metrics(CollectorRegistry())
    run_writer(path, key, range(6, 7), metrics)
    docs = [json.loads(raw) for raw in open(path, "rb")]
    assert [d["event"] for d in docs].count("break") == 1
    assert metrics.registry.get_sample_value("tcpmesh_access_log_chain_breaks_total", {"kind": "changed"}) == 0
