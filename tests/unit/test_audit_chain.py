"""The keyed chain: every single-byte change, removal, reordering or replacement is found and named;
several problems are all named; keys change only where a key record announces it."""

from __future__ import annotations

import json

from hypothesis import given, settings, strategies as st

from agent.audit.chain import FILE_EVENT, GENESIS, parse_line, seal as seal_with, verify_entries
from agent.audit.keys import Keyring, new_key

KEY = new_key()
KEYS = Keyring((KEY,))


def seal(record, seq, prev, key=KEY):
    return seal_with(record, seq, prev, key)


def make_log(n: int, start_seq: int = 0, prev: str = GENESIS, source: str = "access.log"):
    """A file of n flow records after its file record; returns (lines, last digest)."""
    lines = []
    seq = start_seq
    line, prev = seal({"event": FILE_EVENT, "node": "node1"}, seq, prev)
    lines.append(line)
    for i in range(n):
        seq += 1
        line, prev = seal({"event": "close", "flow_id": f"f{i:03d}", "bytes_sent": i * 100, "comm": "psql"}, seq, prev)
        lines.append(line)
    return lines, prev


def verify(lines, source="access.log"):
    return verify_entries(parse_line(raw, source, i, KEYS) for i, raw in enumerate(lines, 1))


def test_an_intact_log_verifies_and_reports_its_head():
    lines, head = make_log(5)
    result = verify(lines)
    assert result.ok and result.records == 6 and result.first_seq == 0 and result.last_seq == 5
    assert result.head == head


def test_lines_are_canonical_json_with_the_mac_last():
    line, mac = seal({"b": 1, "a": "é"}, 7, GENESIS)
    assert line.endswith(f',"mac":"{mac}"}}\n'.encode())
    doc = json.loads(line)
    assert doc["a"] == "é" and doc["seq"] == 7 and doc["prev"] == GENESIS and doc["mac"] == mac
    assert doc["key"] == KEY.id
    assert b" " not in line and line.isascii()


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_changing_any_one_byte_is_found_and_named(data):
    lines, _ = make_log(4)
    index = data.draw(st.integers(0, len(lines) - 1), label="line")
    raw = bytearray(lines[index])
    position = data.draw(st.integers(0, len(raw) - 2), label="byte")  # the newline itself: see the torn test
    new = data.draw(st.integers(0, 255).filter(lambda b: b != raw[position]), label="value")
    raw[position] = new
    changed = lines[:index] + [bytes(raw)] + lines[index + 1:]
    result = verify(changed)
    assert not result.ok
    assert result.finding.entry.line == index + 1, result.finding.message
    assert result.finding.kind in ("changed", "invalid", "unknown_key")


def test_a_removed_line_is_named_by_its_sequence_number():
    lines, _ = make_log(5)
    result = verify(lines[:3] + lines[4:])
    assert result.finding.kind == "removed"
    assert "seq 3 removed" in result.finding.message and "access.log:4" in result.finding.message


def test_several_removed_lines_are_named_as_a_range():
    lines, _ = make_log(6)
    result = verify(lines[:2] + lines[5:])
    assert result.finding.kind == "removed" and "seq 2..4" in result.finding.message


def test_swapped_lines_are_reported_as_reordered_naming_both_places():
    lines, _ = make_log(5)
    swapped = lines[:2] + [lines[3], lines[2]] + lines[4:]
    result = verify(swapped)
    assert result.finding.kind == "reordered"
    assert "access.log:3 (seq 3, flow f002)" in result.finding.message
    assert "seq 2 is at access.log:4" in result.finding.message


def test_removing_the_first_records_of_a_file_is_found():
    lines, _ = make_log(3)
    result = verify(lines[1:])
    assert result.finding.kind == "removed" and "does not start with its file record" in result.finding.message


def test_a_forged_but_self_consistent_record_breaks_the_next_link():
    lines, _ = make_log(4)
    prev = json.loads(lines[1])["mac"]
    forged, _ = seal({"event": "close", "flow_id": "forged", "bytes_sent": 0, "comm": "psql"}, 2, prev, new_key())
    result = verify(lines[:2] + [forged] + lines[3:])
    assert result.finding.kind == "unknown_key" and "access.log:3" in result.finding.message
    # the key holder's own record from another place in the chain, replayed here
    replayed, _ = seal({"event": "close", "flow_id": "forged", "bytes_sent": 0, "comm": "psql"}, 2, "1" * 64)
    result = verify(lines[:2] + [replayed] + lines[3:])
    assert result.finding.kind == "replaced" and "(seq 2, flow forged)" in result.finding.message


def test_a_torn_last_line_is_reported():
    lines, _ = make_log(2)
    result = verify(lines[:-1] + [lines[-1][:-10]])
    assert result.finding.kind == "invalid" and "incomplete" in result.finding.message


def test_rotated_files_verify_as_one_chain_oldest_first():
    old, head = make_log(3)
    new, _ = make_log(2, start_seq=4, prev=head)
    entries = [parse_line(raw, "access.log.1", i, KEYS) for i, raw in enumerate(old, 1)] + \
              [parse_line(raw, "access.log", i, KEYS) for i, raw in enumerate(new, 1)]
    result = verify_entries(entries)
    assert result.ok and result.records == 7 and not result.notes
    alone = verify(new)
    assert alone.ok and "continues a chain at seq 4" in alone.notes[0]
    wrong_order = verify_entries(entries[4:] + entries[:4])
    assert not wrong_order.ok and wrong_order.finding.kind == "reordered"


def test_every_changed_record_is_named_not_only_the_first():
    lines, _ = make_log(8)
    changed = list(lines)
    for index in (2, 7):
        changed[index] = changed[index].replace(b'"comm":"psql"', b'"comm":"bash"')
    result = verify(changed)
    assert [(f.kind, f.entry.line) for f in result.findings] == [("changed", 3), ("changed", 8)]
    assert result.records == 7


def test_a_removed_record_after_a_changed_one_is_not_reported_twice():
    lines, _ = make_log(6)
    swapped = lines[:2] + [lines[3], lines[2]] + lines[4:]
    assert [f.kind for f in verify(swapped).findings] == ["reordered"]


def test_keys_change_only_where_a_key_record_announces_the_next_key():
    second = new_key()
    keys = Keyring((KEY, second))
    lines, prev = make_log(2)
    announce, prev = seal({"event": "key", "next_key": second.id}, 3, prev)
    after, _ = seal({"event": "close", "flow_id": "after"}, 4, prev, second)
    good = lines + [announce, after]
    parse = lambda ls: verify_entries(parse_line(raw, "access.log", i, keys) for i, raw in enumerate(ls, 1))
    assert parse(good).ok
    unannounced, _ = seal({"event": "close", "flow_id": "sneaky"}, 3, json.loads(lines[-1])["mac"], second)
    result = parse(lines + [unannounced])
    assert result.finding.kind == "key" and "access.log:4" in result.finding.message
    retired, _ = seal({"event": "close", "flow_id": "late"}, 4, json.loads(announce)["mac"], KEY)
    assert parse(lines + [announce, retired]).finding.kind == "key"
    assert verify(good).finding.kind == "unknown_key"  # without the second key the record cannot be checked
