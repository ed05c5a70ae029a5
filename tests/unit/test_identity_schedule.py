"""The renewal schedule: half-life with per-certificate jitter, backoff after failures, and what is due."""

from __future__ import annotations

import random
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import pytest

from agent.identity.ca import generate_ca
from agent.identity.schedule import (Failure, RenewalPolicy, after_failure, decide, jitter_unit, renew_at,
                                     retry_delay, status)
from agent.identity.spiffe import SpiffeId
from agent.identity.issue import issue_svid

T0 = datetime(2030, 1, 1, tzinfo=timezone.utc)
A = SpiffeId.parse("spiffe://td/ns/a/sa/a")
B = SpiffeId.parse("spiffe://td/ns/b/sa/b")
POLICY = RenewalPolicy()


@pytest.fixture(scope="module")
def ca():
    return generate_ca("td", now=T0 - timedelta(days=1))


def svid_with_serial(ca, serial: int, ttl: int = 3600, now: datetime = T0):
    return replace(issue_svid(ca, A, ttl, now=now), serial=serial)


def test_jitter_unit_spans_minus_one_to_one_and_is_fixed_per_serial() -> None:
    values = [jitter_unit(serial << 8) for serial in range(2001)]
    assert min(values) == -1 and max(values) == 1
    assert jitter_unit(12345 << 8) == jitter_unit(12345 << 8)


def test_renewal_lands_within_jitter_of_half_life(ca) -> None:
    rng = random.Random(7)
    times = [renew_at(svid_with_serial(ca, rng.getrandbits(127)), POLICY) for _ in range(200)]
    earliest, latest = T0 + timedelta(minutes=24), T0 + timedelta(minutes=36)  # 50 % ± 10 % of an hour
    assert all(earliest <= t <= latest for t in times)
    assert max(times) - min(times) > timedelta(minutes=8), "jitter must spread renewals"
    no_jitter = RenewalPolicy(jitter=0)
    assert renew_at(svid_with_serial(ca, 99), no_jitter) == T0 + timedelta(minutes=30)


def test_short_ttl_schedules_count_from_issuance(ca) -> None:
    svid = replace(issue_svid(ca, A, 4, now=T0, min_ttl_seconds=2), serial=1000 << 8)  # jitter unit 0
    assert renew_at(svid, POLICY) == T0 + timedelta(seconds=2)


def test_policy_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="jitter"):
        RenewalPolicy(jitter=0.5)
    with pytest.raises(ValueError, match="retry_initial"):
        RenewalPolicy(retry_initial=timedelta(0))


def test_backoff_doubles_up_to_the_cap() -> None:
    delays = [retry_delay(n, POLICY).total_seconds() for n in range(1, 10)]
    assert delays == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    assert retry_delay(10 ** 6, POLICY) == POLICY.retry_max


def test_after_failure_counts_per_certificate_and_never_waits_past_the_last_tenth(ca) -> None:
    svid = svid_with_serial(ca, 1 << 8)
    now = T0 + timedelta(minutes=30)
    first = after_failure(svid, None, now, "boom", POLICY)
    assert (first.count, first.retry_at, first.error) == (1, now + timedelta(seconds=1), "boom")
    second = after_failure(svid, first, now, "boom", POLICY)
    assert second.count == 2 and second.retry_at == now + timedelta(seconds=2)
    other = after_failure(replace(svid, serial=2 << 8), second, now, "boom", POLICY)
    assert other.count == 1  # a new certificate starts over
    late = T0 + timedelta(minutes=53, seconds=30)  # 6.5 min left; the last tenth starts at 54 min
    many = after_failure(svid, Failure(svid.serial, 20, late, "x"), late, "boom", POLICY)
    assert many.retry_at == T0 + timedelta(minutes=54)
    after_deadline = after_failure(svid, Failure(svid.serial, 20, late, "x"), T0 + timedelta(minutes=59), "x", POLICY)
    assert after_deadline.retry_at == T0 + timedelta(minutes=59, seconds=1)  # keeps trying, at retry_initial


def test_decide_returns_due_identities_and_the_next_wakeup(ca) -> None:
    a = svid_with_serial(ca, 1000 << 8)  # renews at exactly 30 min
    b = replace(a, spiffe_id=B, serial=2000 << 8)  # jitter +1: 36 min
    assert decide({A: a, B: b}, {}, T0, POLICY).due == ()
    assert decide({A: a, B: b}, {}, T0, POLICY).wake_at == T0 + timedelta(minutes=30)
    at_30 = decide({A: a, B: b}, {}, T0 + timedelta(minutes=30), POLICY)
    assert at_30.due == (A,) and at_30.wake_at == T0 + timedelta(minutes=36)
    assert decide({}, {}, T0, POLICY) == decide({}, {}, T0, POLICY)
    assert decide({}, {}, T0, POLICY).wake_at is None


def test_decide_follows_the_failure_of_the_current_certificate_only(ca) -> None:
    a = svid_with_serial(ca, 1000 << 8)
    now = T0 + timedelta(minutes=31)
    failure = Failure(a.serial, 1, now + timedelta(seconds=1), "boom")
    assert decide({A: a}, {A: failure}, now, POLICY).due == ()
    assert decide({A: a}, {A: failure}, now, POLICY).wake_at == now + timedelta(seconds=1)
    assert decide({A: a}, {A: failure}, now + timedelta(seconds=1), POLICY).due == (A,)
    stale = replace(failure, serial=a.serial + 1)  # recorded against an older certificate
    assert decide({A: a}, {A: stale}, now, POLICY).due == (A,)


def test_status_words(ca) -> None:
    a = svid_with_serial(ca, 1 << 8)
    assert status(a, None, T0, POLICY) == "valid"
    assert status(a, Failure(a.serial, 1, T0, "x"), T0, POLICY) == "retrying"
    assert status(a, Failure(a.serial + 1, 1, T0, "x"), T0, POLICY) == "valid"
    assert status(a, None, a.not_after, POLICY) == "expired"
    assert status(a, None, a.not_before - timedelta(seconds=1), POLICY) == "not yet valid"
