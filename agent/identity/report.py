"""What ``/debug/certs`` answers and ``tcpmesh cert inspect`` prints: the identities this node serves,
their serials, validity, time to renewal, state, and the chain up to which root of the bundle.

``certs_report`` builds a JSON-ready dict from public material only (certificates, serials,
fingerprints, schedule state) — never a key and never a PEM block, so the output can be pasted into
a ticket. ``format_report`` renders it for a terminal. Pure: no clock, no I/O, no cryptography
(the certificates' facts come from the minting worker, ``minting.SigningInfo``).
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from agent.identity.schedule import Failure, RenewalPolicy, renew_at, status
from agent.identity.spiffe import SpiffeId
from agent.identity.svid import Svid

if TYPE_CHECKING:
    from agent.identity.minting_client import SigningInfo

REPORT_VERSION = 1


def certs_report(signing: SigningInfo, svids: Mapping[SpiffeId, Svid], failures: Mapping[SpiffeId, Failure],
                 renewals: Mapping[SpiffeId, int], now: datetime, policy: RenewalPolicy,
                 workloads: Mapping[SpiffeId, Iterable[str]] | None = None) -> dict[str, Any]:
    root_summary = signing.root.summary() if signing.root is not None else None
    identities = []
    for spiffe_id in sorted(svids):
        svid = svids[spiffe_id]
        failure = failures.get(spiffe_id)
        failure = failure if failure is not None and failure.serial == svid.serial else None
        next_renewal = failure.retry_at if failure is not None else renew_at(svid, policy)
        identities.append({
            "spiffe_id": spiffe_id.uri,
            "workloads": sorted((workloads or {}).get(spiffe_id, ())),
            "serial": f"{svid.serial:x}",
            "not_before": svid.not_before.isoformat(),
            "not_after": svid.not_after.isoformat(),
            "issued_at": svid.issued_at.isoformat(),
            "renew_at": next_renewal.isoformat(),
            "seconds_to_renewal": round((next_renewal - now).total_seconds(), 3),
            "seconds_to_expiry": round((svid.not_after - now).total_seconds(), 3),
            "state": status(svid, failure, now, policy),
            "renewals": renewals.get(spiffe_id, 0),
            "failures": failure.count if failure is not None else 0,
            "last_error": failure.error if failure is not None else None,
            **_chain(svid, signing),
        })
    return {
        "version": REPORT_VERSION,
        "now": now.isoformat(),
        "trust_domain": signing.trust_domain,
        "node_ca": {
            "kind": signing.kind,
            "node": signing.node,
            "source": signing.source,
            **signing.certificate.summary(),
            "root": root_summary and {"subject": root_summary["subject"], "fingerprint": root_summary["fingerprint"]},
        },
        "trust_bundle": [r.summary() for r in signing.bundle],
        "renewal": {"jitter": policy.jitter, "retry_initial_seconds": policy.retry_initial.total_seconds(),
                    "retry_max_seconds": policy.retry_max.total_seconds()},
        "identities": identities,
    }


def _chain(svid: Svid, signing: SigningInfo) -> dict[str, Any]:
    """The intermediates the SVID is presented with, and the root of the bundle they lead to.

    Every SVID the store holds was issued by ``signing`` (a CA change re-issues all of them, or none).
    """
    root = signing.root
    return {
        "chain": [{"subject": subject, "serial": f"{serial:x}"} for subject, serial in signing.chain],
        "root": {"subject": root.subject, "fingerprint": root.fingerprint} if root else None,
    }


def select(report: Mapping[str, Any], workload: str | None) -> list[dict[str, Any]]:
    """The identities matching ``workload``: a SPIFFE ID, a workload name, or ``ns/sa``; all if None."""
    identities = list(report.get("identities", []))
    if workload is None:
        return identities
    return [i for i in identities
            if workload in (i["spiffe_id"], i["spiffe_id"].split("/", 3)[-1])
            or workload in i.get("workloads", ())
            or i["spiffe_id"].endswith(f"/ns/{workload.replace('/', '/sa/', 1)}")]


def _duration(seconds: float) -> str:
    sign = "-" if seconds < 0 else ""
    seconds = abs(int(seconds))
    if seconds >= 3600:
        return f"{sign}{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{sign}{seconds // 60}m{seconds % 60:02d}s"
    return f"{sign}{seconds}s"


def short_fingerprint(fp: str) -> str:
    """The first 12 hex digits: enough to tell the roots of one deployment apart on a terminal."""
    return fp.split(":", 1)[-1][:12]


def _root_label(root: Mapping[str, Any] | None) -> str:
    if not root:
        return "no root in the bundle"
    return f"{root['subject'].split(',')[0].removeprefix('CN=')} ({short_fingerprint(root['fingerprint'])})"


def format_report(report: Mapping[str, Any], identities: list[dict[str, Any]]) -> str:
    node_ca = report["node_ca"]
    lines = [
        f"trust domain   {report['trust_domain']}",
        f"node CA        {node_ca['subject'].split(',')[0].removeprefix('CN=')} [{node_ca['kind']}] serial "
        f"{node_ca['serial'][:16]} valid until {node_ca['not_after']} -> root {_root_label(node_ca.get('root'))}",
        f"trust bundle   {len(report['trust_bundle'])} root(s): " + ", ".join(
            f"{_root_label(r)} until {r['not_after'][:10]}" for r in report["trust_bundle"]),
        "",
    ]
    names = [i["spiffe_id"] + (f" ({', '.join(i['workloads'])})" if i["workloads"] else "") for i in identities]
    width = max([len("IDENTITY"), *map(len, names)])
    lines.append(f"{'IDENTITY':{width}} {'SERIAL':16} {'NOT BEFORE':20} {'NOT AFTER':20} {'RENEW IN':9} {'STATE':9} ROOT")
    for name, i in zip(names, identities):
        lines.append(f"{name:{width}} {i['serial'][:16]:16} {i['not_before'][:19]:20} {i['not_after'][:19]:20} "
                     f"{_duration(i['seconds_to_renewal']):9} {i['state']:9} {_root_label(i['root'])}")
        if i["last_error"]:
            lines.append(f"    renewal failed {i['failures']}x: {i['last_error']}")
    if not identities:
        lines.append("(no identities)")
    return "\n".join(lines)
