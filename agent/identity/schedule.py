"""When to renew each SVID, and when to try again after a failure. Pure: no clock, no I/O.

An SVID is renewed around half of its lifetime: at ``issued_at + lifetime * (0.5 ± jitter)``, where
the offset is derived from the certificate's (random) serial, so SVIDs issued together — every
workload of a node at start, or after a CA change — spread out instead of renewing in one burst, and
the time is stable for one certificate (no state to keep, the same answer on every call). If a
renewal fails, the old certificate stays in use while it is valid and the attempt is repeated with
exponential backoff (``retry_initial`` doubling up to ``retry_max``), never later than a margin
before expiry. The rotator (``svid_rotator.py``) owns the clock and the failures; this module decides.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Mapping, TypeVar

from agent.identity.svid import Svid

K = TypeVar("K")

DEFAULT_JITTER = 0.1  # ± 10 % of the lifetime around its middle
DEFAULT_RETRY_INITIAL = timedelta(seconds=1)
DEFAULT_RETRY_MAX = timedelta(seconds=60)
_JITTER_STEPS = 2001  # jitter unit resolution: -1.000 … +1.000


@dataclass(frozen=True)
class RenewalPolicy:
    jitter: float = DEFAULT_JITTER
    retry_initial: timedelta = DEFAULT_RETRY_INITIAL
    retry_max: timedelta = DEFAULT_RETRY_MAX

    def __post_init__(self) -> None:
        if not 0 <= self.jitter < 0.5:
            raise ValueError(f"jitter {self.jitter} must be in [0, 0.5): a renewal must fall inside the lifetime")
        if self.retry_initial <= timedelta(0) or self.retry_max < self.retry_initial:
            raise ValueError("retry_initial must be positive and retry_max at least retry_initial")


@dataclass(frozen=True)
class Failure:
    """The last failed renewal of one certificate (``serial``): how many in a row, and when to retry."""

    serial: int
    count: int
    retry_at: datetime
    error: str


def jitter_unit(serial: int) -> float:
    """A number in [-1, 1] taken from the serial: random per certificate, fixed for its life."""
    return ((serial >> 8) % _JITTER_STEPS) / ((_JITTER_STEPS - 1) / 2) - 1


def renew_at(svid: Svid, policy: RenewalPolicy) -> datetime:
    """The scheduled renewal of ``svid``: the middle of its lifetime, shifted by its jitter."""
    return svid.issued_at + svid.lifetime * (0.5 + policy.jitter * jitter_unit(svid.serial))


def retry_delay(count: int, policy: RenewalPolicy) -> timedelta:
    """Backoff after ``count`` (≥ 1) failures in a row: retry_initial, doubling, capped at retry_max."""
    return min(policy.retry_max, policy.retry_initial * (2 ** min(max(count - 1, 0), 30)))


def after_failure(svid: Svid, previous: Failure | None, now: datetime, error: str,
                  policy: RenewalPolicy) -> Failure:
    """The failure record after a renewal of ``svid`` failed at ``now``.

    The next attempt never waits past the point where a tenth of the lifetime remains (but always
    waits at least ``retry_initial``), so a long backoff cannot let a renewable certificate expire.
    """
    count = previous.count + 1 if previous is not None and previous.serial == svid.serial else 1
    delay = retry_delay(count, policy)
    latest = svid.not_after - svid.lifetime / 10 - now
    delay = max(min(delay, latest), policy.retry_initial)
    return Failure(svid.serial, count, now + delay, error)


@dataclass(frozen=True)
class Decision:
    due: tuple  # identities to renew now, sorted
    wake_at: datetime | None  # the next time something becomes due (None: nothing held)


def decide(svids: Mapping[K, Svid], failures: Mapping[K, Failure], now: datetime,
           policy: RenewalPolicy) -> Decision:
    """Which identities to renew at ``now``, and when to look again.

    A failure counts only for the certificate it was recorded against: once an identity holds a new
    SVID (renewed by someone else, or its CA changed), its schedule starts afresh.
    """
    due = []
    upcoming: list[datetime] = []
    for key, svid in svids.items():
        failure = failures.get(key)
        at = failure.retry_at if failure is not None and failure.serial == svid.serial else renew_at(svid, policy)
        if at <= now:
            due.append(key)
        else:
            upcoming.append(at)
    return Decision(tuple(sorted(due)), min(upcoming) if upcoming else None)


def status(svid: Svid, failure: Failure | None, now: datetime, policy: RenewalPolicy) -> str:
    """``valid``, ``retrying`` (a renewal failed; the old certificate is still served) or ``expired``."""
    if now >= svid.not_after:
        return "expired"
    if now < svid.not_before:
        return "not yet valid"
    if failure is not None and failure.serial == svid.serial:
        return "retrying"
    return "valid"
