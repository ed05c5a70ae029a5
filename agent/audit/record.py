"""The access record of one connection event, built from a ``Flow`` (pure).

Flat keys (easy to grep and jq): the flow's own record (identities, addresses, pid/comm/uid/cgroup_id,
bytes each way, times, response flags, policy) plus ``event`` (open | close | egress — a connect
outside the mesh that the kernel reported and the agent never proxied), ``time`` (RFC 3339, UTC)
and ``decision``. The writer adds ``node``, ``cgroup`` (the cgroup path, where it can name it)
and the chain fields ``seq``, ``prev``, ``key`` and ``mac`` (agent/audit/chain.py).
"""

from __future__ import annotations

import datetime
from typing import Any

from agent.connection.flow import Flow

RECORD_VERSION = 1


def rfc3339(unix_time: float) -> str:
    return datetime.datetime.fromtimestamp(unix_time, datetime.timezone.utc).isoformat(timespec="milliseconds") \
        .replace("+00:00", "Z")


def access_record(event: str, flow: Flow) -> dict[str, Any]:
    record = flow.record()
    when = flow.end_time if event == "close" and flow.end_time is not None else flow.start_time
    record.update(v=RECORD_VERSION, event=event, time=rfc3339(when), decision=flow.decision)
    return record
