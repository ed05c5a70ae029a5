"""Capture CIDRs: validation errors that name the fix, LPM encoding, longest-prefix semantics."""

from __future__ import annotations

import pytest

from agent.capture import abi
from agent.capture.cidrs import DEFAULT_CAPTURE_CIDRS, MAX_CIDRS, is_captured, lpm_entries, parse_cidrs
from agent.errors import ConfigError


def test_default_captures_everything_routable():
    entries = lpm_entries(DEFAULT_CAPTURE_CIDRS)
    assert entries == {(0, 0): abi.CIDR_CAPTURE}
    assert is_captured(entries, "10.77.2.10") and is_captured(entries, "8.8.8.8")


def test_bypass_punches_a_hole_longest_prefix_wins():
    entries = lpm_entries(["10.0.0.0/8"], ["10.96.0.0/12"])
    assert is_captured(entries, "10.1.2.3")
    assert not is_captured(entries, "10.96.0.10")
    assert not is_captured(entries, "192.168.1.1")  # no prefix: not captured


def test_duplicates_collapse():
    assert len(lpm_entries(["10.0.0.0/8", "10.0.0.0/8"])) == 1


@pytest.mark.parametrize("bad, problem", [
    (["10.0.0.1/8"], "host bits"),
    (["fd00::/8"], "IPv4"),
    (["banana"], "IPv4"),
])
def test_invalid_cidrs_name_field_value_and_fix(bad, problem):
    with pytest.raises(ConfigError) as info:
        lpm_entries(bad)
    assert info.value.field == "capture_cidrs"
    assert info.value.value == bad[0]
    assert "e.g. 10.0.0.0/8" in str(info.value)


def test_a_single_string_is_not_a_list():
    with pytest.raises(ConfigError, match="not one string"):
        parse_cidrs("capture_cidrs", "10.0.0.0/8")


def test_same_prefix_in_both_lists_is_an_error():
    with pytest.raises(ConfigError, match="also in capture_cidrs"):
        lpm_entries(["10.0.0.0/8"], ["10.0.0.0/8"])


def test_too_many_prefixes():
    many = [f"10.{i // 256}.{i % 256}.0/24" for i in range(MAX_CIDRS + 1)]
    with pytest.raises(ConfigError, match="too many"):
        lpm_entries(many)
