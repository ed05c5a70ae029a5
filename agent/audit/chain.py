"""Hash-chained JSON lines: sealing records and verifying a sequence of lines (pure).

A line is the canonical JSON of the record body (sorted keys, no spaces, ASCII) — which carries
``seq`` (0, 1, 2, ... across files and restarts) and ``prev`` (the digest of the record before it;
``GENESIS`` for seq 0) — with ``"digest":"<sha256 of the body's exact bytes>"`` appended as its
last member. Changing any byte of a line breaks its digest; removing a line leaves a hole in
``seq``; swapping lines puts ``seq`` out of order; replacing a line by a self-consistent forgery
breaks the next line's ``prev``. Each file starts with an ``event: "file"`` record, so lines removed
from the start of a file show too. Records removed from the end of the newest file cannot show in
the chain itself: compare the last ``seq`` with the agent's ``tcpmesh_access_log_sequence``.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

GENESIS = "0" * 64
FILE_EVENT = "file"
_DIGEST_SUFFIX = re.compile(rb',"digest":"([0-9a-f]{64})"\}$')


def canonical(body: Mapping[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str).encode()


def seal(record: Mapping[str, Any], seq: int, prev: str) -> tuple[bytes, str]:
    """The line (newline included) for ``record`` at position ``seq`` after ``prev``, and its digest."""
    body = canonical({**record, "seq": seq, "prev": prev})
    digest = hashlib.sha256(body).hexdigest()
    return body[:-1] + b',"digest":"' + digest.encode() + b'"}\n', digest


# ------------------------------------------------------------------------------------------ verify

@dataclass(frozen=True)
class Entry:
    source: str  # file name
    line: int  # 1-based line number in that file
    seq: int | None = None
    prev: str = ""
    digest: str = ""
    event: str = ""
    flow_id: str = ""
    error: str = ""  # why the line is not a valid record (then the other fields are empty)

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
    kind: str  # changed | invalid | removed | reordered | replaced
    entry: Entry
    message: str


@dataclass
class Verification:
    records: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    head: str = ""  # digest of the last record
    finding: Finding | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.finding is None


def parse_line(raw: bytes, source: str, line: int) -> Entry:
    """Check one line's own digest and read its chain fields."""
    text = raw[:-1] if raw.endswith(b"\n") else raw
    match = _DIGEST_SUFFIX.search(text)
    if not raw.endswith(b"\n"):
        return Entry(source, line, error="the line is incomplete (no newline): truncated or torn by a crash")
    if match is None:
        return Entry(source, line, error="the line does not end with a digest: it is not an audit record, "
                                         "or it was changed")
    body = text[:match.start()] + b"}"
    digest = match.group(1).decode()
    if hashlib.sha256(body).hexdigest() != digest:
        return Entry(source, line, digest=digest, error="changed")
    try:
        doc = json.loads(body)
        seq, prev = doc["seq"], doc["prev"]
        if not isinstance(seq, int) or isinstance(seq, bool) or not isinstance(prev, str):
            raise TypeError("seq/prev have the wrong type")
    except (ValueError, KeyError, TypeError) as exc:
        return Entry(source, line, digest=digest, error=f"its digest matches but it is not a record ({exc})")
    return Entry(source, line, seq=seq, prev=prev, digest=digest, event=str(doc.get("event", "")),
                 flow_id=str(doc.get("flow_id", "") or ""))


def verify_entries(entries: Iterable[Entry]) -> Verification:
    """Verify entries in order (the files oldest first); stops at the first finding, which names the record."""
    entries = list(entries)
    result = Verification()
    position = {e.seq: i for i, e in enumerate(entries) if e.seq is not None and not e.error}
    previous: Entry | None = None
    starts = set()
    for i, entry in enumerate(entries):
        if entry.error == "changed":
            result.finding = Finding("changed", entry, f"record at {entry.where} was changed: its content no "
                                                       "longer matches its digest")
            return result
        if entry.error:
            result.finding = Finding("invalid", entry, f"{entry.where} is not a valid record: {entry.error}")
            return result
        new_file = previous is None or previous.source != entry.source
        if new_file:
            starts.add(entry.source)
            if entry.event != FILE_EVENT:
                result.finding = Finding("removed", entry, f"{entry.source} does not start with its file record: "
                                                           f"the record(s) before {entry.describe()} were removed")
                return result
        if previous is None:
            if entry.seq == 0 and entry.prev != GENESIS:
                result.finding = Finding("replaced", entry, f"{entry.describe()} claims to start the chain but "
                                                            "does not link to its start")
                return result
            if entry.seq != 0:
                result.notes.append(f"{entry.source} continues a chain at seq {entry.seq}: its link to the "
                                    "previous file was not checked (pass the rotated files too, oldest first)")
        else:
            expected = previous.seq + 1  # type: ignore[operator]
            if entry.seq != expected:
                later = position.get(expected)
                if entry.seq < expected or (later is not None and later > i):  # type: ignore[operator]
                    where = f" (seq {expected} is at {entries[later].where})" if later is not None and later > i else ""
                    result.finding = Finding("reordered", entry, f"records are out of order at {entry.describe()}: "
                                                                 f"seq {expected} was expected here{where}")
                else:
                    missing = f"seq {expected}" if entry.seq == expected + 1 else f"seq {expected}..{entry.seq - 1}"
                    result.finding = Finding("removed", entry, f"{missing} removed: the chain jumps from "
                                                               f"{previous.describe()} to {entry.describe()}")
                return result
            if entry.prev != previous.digest:
                result.finding = Finding("replaced", entry, f"{entry.describe()} does not link to "
                                                            f"{previous.describe()}: a record was replaced or "
                                                            "inserted between them")
                return result
        if result.first_seq is None:
            result.first_seq = entry.seq
        result.records += 1
        result.last_seq, result.head = entry.seq, entry.digest
        previous = entry
    return result
