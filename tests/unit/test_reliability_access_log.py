"""The access log on a disk that fills up mid-record (agent.audit.writer): a short write followed by
ENOSPC must not leave a torn line in the middle of the log — the chain stays verifiable, the loss
shows as a gap record. (The lab test with a real full tmpfs found this: tests/e2e/test_reliability_faults.py.)"""

from __future__ import annotations

import errno
import json
import os

from prometheus_client import CollectorRegistry

from agent.audit.keys import read_keys
from agent.audit.verify import verify_files
from agent.audit.writer import AccessLog
from agent.telemetry.metrics import Metrics


def test_a_record_cut_short_by_a_full_disk_is_taken_back_and_the_chain_verifies(tmp_path):
    path, key = str(tmp_path / "log" / "access.log"), str(tmp_path / "audit.key")
    log = AccessLog(path, key_path=key, metrics=Metrics(CollectorRegistry()))
    real_write = os.write
    state = {"full": False, "short": 0}

    def filling_disk(fd, data):
        if state["full"]:
            if state["short"] == 0:  # the kernel takes what fits, then reports ENOSPC on the rest
                state["short"] += 1
                return real_write(fd, bytes(data[:len(data) // 2]))
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    log._os_write = filling_disk
    log.start()
    for i in range(3):
        log.submit({"event": "close", "flow_id": f"{i:016x}"})
    assert log.flush()
    state["full"] = True
    for i in range(3, 6):
        log.submit({"event": "close", "flow_id": f"{i:016x}"})
    assert log.flush()
    state.update(full=False, short=0)
    log.submit({"event": "close", "flow_id": f"{6:016x}"})
    log.stop()
    text = open(path).read()
    assert text.endswith("\n") and all(line.endswith("}") for line in text.splitlines())
    docs = [json.loads(line) for line in text.splitlines()]
    assert [d["event"] for d in docs] == ["file", "close", "close", "close", "gap", "close"]
    assert docs[4]["dropped"] == 3 and docs[5]["flow_id"] == f"{6:016x}"
    assert verify_files([path], read_keys(key)).ok
