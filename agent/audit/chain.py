"""The keyed audit chain: sealing records into MAC-chained lines and verifying a sequence of lines (pure).

A line is the canonical JSON of the record body (sorted keys, no spaces, ASCII) — which carries
``seq`` (0, 1, 2, ... across files and restarts), ``prev`` (the MAC of the record before it;
``GENESIS`` for seq 0) and ``key`` (the id of the key that sealed it, agent.audit.keys) — with
``"mac":"<HMAC-SHA256 of the body's exact bytes>"`` appended as its last member. Without the key
nobody can write a line that verifies: changing any byte breaks its MAC, and a forged record — even a
whole rewritten tail — is named as changed. Removing a line leaves a hole in ``seq``; swapping lines
puts ``seq`` out of order; each file starts with an ``event: "file"`` record, so lines removed from the
start of a file show too. Records removed from the end of the newest file cannot show in the chain:
compare the last ``seq`` with the agent's ``tcpmesh_access_log_sequence``.

Special records: ``event: "key"`` (sealed with the old key) announces the key the next record is
sealed with (``next_key``): any other change of key is a finding, so a retired key that leaked cannot
seal records after its retirement. ``event: "break"`` is the writer's own report that it found the chain
broken on start (``findings``) and where it resumed (``resumed_after``); verify lists it.

Verification names every problem, not only the first: after a finding it resumes at the next intact
record that links to the one before it (records in between are not vouched for).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from agent.audit.keys import AuditKey, Keyring

GENESIS = "0" * 64
FILE_EVENT = "file"
KEY_EVENT = "key"
BREAK_EVENT = "break"
FINDING_KINDS = ("changed", "invalid", "unknown_key", "removed", "reordered", "replaced", "key")
_MAC_SUFFIX = re.compile(rb',"mac":"([0-9a-f]{64})"\}$')
_DIGEST_SUFFIX = re.compile(rb',"digest":"([0-9a-f]{64})"\}$')


def canonical(body: Mapping[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str).encode()


def mac_of(key: AuditKey, body: bytes) -> str:
    return hmac.new(key.secret, body, hashlib.sha256).hexdigest()


def seal(record: Mapping[str, Any], seq: int, prev: str, key: AuditKey) -> tuple[bytes, str]:
    """The line (newline included) for ``record`` at position ``seq`` after ``prev``, and its MAC."""
    body = canonical({**record, "seq": seq, "prev": prev, "key": key.id})
    mac = mac_of(key, body)
    return body[:-1] + b',"mac":"' + mac.encode() + b'"}\n', mac


# ------------------------------------------------------------------------------------------ verify

@dataclass(frozen=True)
class Entry:
    source: str  # file name
    line: int  # 1-based line number in that file
    seq: int | None = None
    prev: str = ""
    mac: str = ""
    key: str = ""
    event: str = ""
    flow_id: str = ""
    next_key: str = ""  # key records: the key the next record is sealed with
    detail: str = ""  # break records: what the writer found
    error: str = ""  # changed | invalid | unknown_key: the line is not a record sealed by a known key
    reason: str = ""  # why, for the operator

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"

    def describe(self) -> str:
        text = f"{self.where} (seq {self.seq}"
        if self.flow_id:
            text += f", flow {self.flow_id}"
        return text + ")"


@dataclass(frozen=True)
class Finding:
    kind: str  # changed | invalid | unknown_key | removed | reordered | replaced | key
    entry: Entry
    message: str


@dataclass
class Verification:
    records: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    head: str = ""  # MAC of the last intact record
    head_key: str = ""  # the key that sealed it
    findings: list[Finding] = field(default_factory=list)
    breaks: list[Entry] = field(default_factory=list)  # the writer's own break records
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings

    @property
    def finding(self) -> Finding | None:
        return self.findings[0] if self.findings else None


def parse_line(raw: bytes, source: str, line: int, keys: Keyring) -> Entry:
    """Check one line's MAC with ``keys`` and read its chain fields."""
    if not raw.endswith(b"\n"):
        return Entry(source, line, error="invalid", reason="the line is incomplete (no newline): truncated or torn "
                                                            "by a crash")
    text = raw[:-1]
    match = _MAC_SUFFIX.search(text)
    if match is None:
        why = ("it ends with a plain digest: a record of an unkeyed chain (written before audit records were "
               "keyed), or a forgery" if _DIGEST_SUFFIX.search(text) else
               "the line does not end with a MAC: it is not an audit record, or it was changed")
        return Entry(source, line, error="invalid", reason=why)
    body = text[:match.start()] + b"}"
    mac = match.group(1).decode()
    try:
        doc = json.loads(body)
        key_id = doc["key"]
        seq, prev = doc["seq"], doc["prev"]
        if not isinstance(key_id, str) or not isinstance(seq, int) or isinstance(seq, bool) \
                or not isinstance(prev, str):
            raise TypeError("key/seq/prev have the wrong type")
    except (ValueError, KeyError, TypeError) as exc:
        return Entry(source, line, mac=mac, error="changed", reason=f"it is no longer a record ({exc})")
    key = keys.get(key_id)
    if key is None:
        return Entry(source, line, seq=seq, mac=mac, key=key_id, error="unknown_key",
                     reason=f"it is sealed with key {key_id!r}, which is not among the keys given (--key): pass the "
                            "key file that holds it — or the record was changed or forged")
    if not hmac.compare_digest(mac_of(key, body), mac):
        return Entry(source, line, seq=seq, mac=mac, key=key_id, error="changed",
                     reason="its content no longer matches its MAC")
    detail = doc.get("findings") if doc.get("event") == BREAK_EVENT else ""
    return Entry(source, line, seq=seq, prev=prev, mac=mac, key=key_id, event=str(doc.get("event", "")),
                 flow_id=str(doc.get("flow_id", "") or ""), next_key=str(doc.get("next_key", "") or ""),
                 detail=json.dumps(detail) if detail else "")


def verify_entries(entries: Iterable[Entry], *, mid_file: bool = False) -> Verification:
    """Verify entries in order (the files oldest first), naming every problem found. ``mid_file``: the
    entries start in the middle of their file (the writer's tail check), so no file record is expected."""
    entries = list(entries)
    result = Verification()
    position = {e.seq: i for i, e in enumerate(entries) if e.seq is not None and not e.error}
    previous: Entry | None = None  # the last intact record
    resync = False  # after a finding: quiet until a record links to the one before it again
    last_source = entries[0].source if mid_file and entries else None

    def report(kind: str, entry: Entry, message: str) -> None:
        nonlocal resync
        result.findings.append(Finding(kind, entry, message))
        resync = True

    for i, entry in enumerate(entries):
        new_file = entry.source != last_source
        last_source = entry.source
        if entry.error:
            if entry.error == "changed":
                report("changed", entry, f"record at {entry.where} was changed: {entry.reason}")
            else:
                report(entry.error, entry, f"{entry.where} is not a valid record: {entry.reason}")
            continue
        if new_file and entry.event != FILE_EVENT:
            report("removed", entry, f"{entry.source} does not start with its file record: the record(s) before "
                                     f"{entry.describe()} were removed")
        elif previous is None:
            if entry.seq == 0 and entry.prev != GENESIS:
                report("replaced", entry, f"{entry.describe()} claims to start the chain but does not link to "
                                          "its start")
            elif entry.seq != 0:
                result.notes.append(f"{entry.source} continues a chain at seq {entry.seq}: its link to the "
                                    "previous file was not checked (pass the rotated files too, oldest first)")
        else:
            linked = entry.seq == previous.seq + 1 and entry.prev == previous.mac  # type: ignore[operator]
            if linked:
                resync = False
                expected_key = previous.next_key if previous.event == KEY_EVENT else previous.key
                if entry.key != expected_key:
                    report("key", entry, f"{entry.describe()} is sealed with key {entry.key} where the chain "
                                         f"expects key {expected_key} (keys change only right after a key record "
                                         "that announces the new one)")
            elif not resync:
                _link_finding(entries, i, previous, position, report)
        if entry.event == BREAK_EVENT:
            result.breaks.append(entry)
        if result.first_seq is None:
            result.first_seq = entry.seq
        result.records += 1
        result.last_seq, result.head, result.head_key = entry.seq, entry.mac, entry.key
        previous = entry
    return result


def _link_finding(entries: list[Entry], i: int, previous: Entry, position: dict, report) -> None:
    entry = entries[i]
    expected = previous.seq + 1  # type: ignore[operator]
    if entry.seq == expected:
        report("replaced", entry, f"{entry.describe()} does not link to {previous.describe()}: a record was "
                                  "replaced or inserted between them")
        return
    later = position.get(expected)
    if entry.seq < expected or (later is not None and later > i):  # type: ignore[operator]
        where = f" (seq {expected} is at {entries[later].where})" if later is not None and later > i else ""
        report("reordered", entry, f"records are out of order at {entry.describe()}: seq {expected} was "
                                   f"expected here{where}")
        return
    missing = f"seq {expected}" if entry.seq == expected + 1 else f"seq {expected}..{entry.seq - 1}"
    report("removed", entry, f"{missing} removed: the chain jumps from {previous.describe()} to {entry.describe()}")
