"""What `tcpmesh status` shows for one node, as one JSON-ready document: ready or not (and why),
capture mode, who runs the tunnels' TLS (kernel or user space, and why), local workloads, identities and
their expiry, the policy set in force (since when) and the last refused policy change (``file:line: field: problem``, and which valid edits it holds back),
the registry source's health, the issuer's reachability ("not configured" until the agent has one),
the config file's last reload (a refused file, fields waiting for a restart) and, in the packet-level capture
modes, the pods whose connections the node's table reset (nodePorts, hostPorts, IPv6) and the fix.

``node_status`` assembles the document from plain values the composition root hands in;
``problems`` lists what an operator must act on; ``format_status`` renders it. The agent serves the
document on its admin socket (``status``) and its admin endpoint (/debug/status); `lab status`
shows it per node. Pure: no clock, no I/O; imports nothing of the agent.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Mapping, Sequence

STATUS_VERSION = 1
RENEWAL_OVERDUE_SECONDS = 60  # an SVID whose renewal is this late (and not already failing) is a problem
REFUSED_RECENT_SECONDS = 600  # a pod's connections reset in the node's table this recently are a problem


def node_status(*, node: str, now: float, ready: bool, not_ready_reason: str, capture_mode: str,
                workloads: Sequence[Mapping[str, Any]], identities: Sequence[Mapping[str, Any]],
                policy: Mapping[str, Any], registry: Mapping[str, Any],
                issuer: Mapping[str, Any] | None, config: Mapping[str, Any] | None = None,
                tunnel_tls: Mapping[str, Any] | None = None,
                refused: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    local = [w for w in workloads if w.get("local")]
    doc = {
        "version": STATUS_VERSION, "node": node, "now": now, "ready": ready,
        "not_ready_reason": "" if ready else not_ready_reason, "capture_mode": capture_mode,
        "workloads": [{"key": f"{w['namespace']}/{w['name']}", "spiffe_id": w["spiffe_id"], "ip": w.get("ip"),
                       "captured": bool(w.get("captured")), "problem": w.get("problem", "")} for w in local],
        "remote_workloads": len(workloads) - len(local),
        "identities": [{"spiffe_id": i["spiffe_id"], "not_after": i["not_after"],
                        "seconds_to_expiry": i["seconds_to_expiry"],
                        "seconds_to_renewal": i.get("seconds_to_renewal", 0.0), "state": i["state"],
                        "last_error": i.get("last_error")} for i in identities],
        "policy": dict(policy), "registry": dict(registry),
        "issuer": dict(issuer) if issuer is not None else {"configured": False},
        "config": dict(config) if config is not None else {},
        # who runs the tunnels' TLS (proxy.kernel_tls; agent.proxy.kernel_tls.KernelTls.describe)
        "tunnel_tls": dict(tunnel_tls) if tunnel_tls is not None else {},
        # ebpf-tc, iptables: each source pod's last read with connections its node table reset (agent.telemetry.refusals)
        "refused": sorted((dict(r) for r in refused), key=lambda r: -r["at"]),
    }
    doc["problems"] = problems(doc)
    return doc


def problems(doc: Mapping[str, Any]) -> list[str]:
    """One line per thing to act on, most urgent first; empty when all is well."""
    found = []
    if not doc["ready"]:
        found.append(f"not ready: {doc['not_ready_reason'] or 'no reason given'}")
    refused = doc["policy"].get("refused")
    if refused:
        held = refused.get("held_back") or []
        found.append(f"policy change refused, the previous set stays in force: {refused['error']}"
                     + (f" (also held back, valid on their own: {', '.join(held)})" if held else ""))
    registry = doc["registry"]
    if not registry.get("healthy", True):
        found.append(f"registry source {registry.get('source')}: {registry.get('last_error') or 'unhealthy'}")
    tls = doc.get("tunnel_tls") or {}
    if tls.get("switch_failures"):
        found.append(f"tunnel TLS: {tls['switch_failures']} tunnel(s) failed to switch to kernel TLS and were closed; "
                     f"now {tls.get('reason', '')}")
    for w in doc["workloads"]:
        if not w["captured"]:
            found.append(f"workload {w['key']} is NOT captured: {w['problem']}")
    for i in doc["identities"]:
        if i["state"] != "valid":
            found.append(f"identity {i['spiffe_id']} is {i['state']}" + (f": {i['last_error']}" if i["last_error"] else ""))
        elif i["seconds_to_renewal"] < -RENEWAL_OVERDUE_SECONDS:
            found.append(f"identity {i['spiffe_id']}: renewal overdue by {-i['seconds_to_renewal']:.0f}s, expires in "
                         f"{i['seconds_to_expiry']:.0f}s")
    for r in doc.get("refused") or ():
        if doc["now"] - r["at"] <= REFUSED_RECENT_SECONDS:
            found.append(f"{r['source']}: {r['count']} connection(s) reset by the node's table {_ago(doc['now'] - r['at'])}"
                         f" ago ({r['what']}); fix: {r['fix']}")
    config = doc.get("config") or {}
    if config.get("refused"):
        found.append(f"config file change refused, the last good config keeps running: {config['refused']['error']}")
    if config.get("restart_needed"):
        found.append("config changes wait for a restart: " + ", ".join(
            f"{c['field']} {c['old']!r} → {c['new']!r}" for c in config["restart_needed"]) + f"; {config['restart_hint']}")
    issuer = doc["issuer"]
    refused_credential = issuer.get("credential_refused")
    if refused_credential:
        found.append(f"the issuer refuses this node's credential ({refused_credential['reason']}), the agent joins "
                     f"again: {refused_credential['message']}")
    if issuer.get("configured") and issuer.get("reachable") is False:  # None: not asked yet
        found.append(f"issuer {issuer.get('address', '')} unreachable: {issuer.get('last_error') or 'no answer'}")
    for a in issuer.get("awaiting") or ():
        found.append(f"identity {a['spiffe_id']} has no SVID yet (its workloads' connects are refused)"
                     + (f": {a['last_error']}" if a.get("last_error") else ""))
    return found


def _when(seconds: float | None, now: float) -> str:
    if seconds is None:
        return "never"
    stamp = datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="seconds")
    return f"{stamp} ({_ago(now - seconds)} ago)"


def _ago(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{max(seconds, 0):.0f}s"


def _tunnel_tls_lines(tls: Mapping[str, Any]) -> list[str]:
    """Who runs the tunnels' TLS, why, and the open tunnels by implementation."""
    if not tls:
        return []
    opened, total = tls.get("open", {}), tls.get("established", {})
    in_use = "kernel" if tls.get("in_use") == "kernel" else "user-space"
    lines = [f"  tunnel TLS   {in_use} (proxy.kernel_tls {tls.get('setting')}): {tls.get('reason', '')}",
             f"    tunnels open: {opened.get('kernel', 0)} kernel, {opened.get('user', 0)} user-space "
             f"({total.get('kernel', 0)} and {total.get('user', 0)} since start)"
             + (f"; {tls['switch_failures']} failed switch(es)" if tls.get("switch_failures") else "")]
    return lines


def format_status(doc: Mapping[str, Any]) -> str:
    now = doc["now"]
    policy, registry, issuer = doc["policy"], doc["registry"], doc["issuer"]
    lines = [f"node {doc['node']}: {'READY' if doc['ready'] else 'NOT READY: ' + doc['not_ready_reason']}",
             f"  capture      {doc['capture_mode']}",
             *_tunnel_tls_lines(doc.get("tunnel_tls") or {}),
             f"  workloads    {len(doc['workloads'])} local "
             f"({sum(w['captured'] for w in doc['workloads'])} captured), {doc['remote_workloads']} on other nodes"]
    for w in doc["workloads"]:
        lines.append(f"    {w['key']:<24} {w['spiffe_id']}" + ("" if w["captured"] else f"  NOT CAPTURED: {w['problem']}"))
    lines.append(f"  identities   {len(doc['identities'])}")
    for i in doc["identities"]:
        lines.append(f"    {i['spiffe_id']:<48} {i['state']:<9} expires {i['not_after'][:19]} "
                     f"(in {_ago(i['seconds_to_expiry'])})")
    if policy.get("in_force"):
        lines.append(f"  policy       {policy['authorization']} AuthorizationPolicy, {policy['peer_authentication']} "
                     f"PeerAuthentication from {policy['dir']}, loaded {_when(policy.get('loaded_at'), now)}")
    else:
        lines.append(f"  policy       NO SET IN FORCE (every connection refused) from {policy.get('dir')}")
    refused = policy.get("refused")
    if refused:
        lines.append(f"  REFUSED      policy change at {_when(refused['at'], now)}: {refused['error']}")
        for f in refused["files"]:
            state = f"broken: {f['error']}" if f["error"] else "valid, held back (not in force)"
            lines.append(f"    {f['change']:<8} {f['file']}: {state}")
        lines.append("               the previous set stays in force; fix the file (`tcpmesh policy check "
                     f"{policy.get('dir')}`) and every held-back edit applies with it")
    else:
        lines.append("  last change  applied (no refused change)")
    lines.append(f"  registry     {registry.get('source')}: "
                 + ("healthy" if registry.get("healthy", True) else f"UNHEALTHY: {registry.get('last_error')}")
                 + (f" ({registry['errors']} refused version(s) since start)" if registry.get("errors") else ""))
    if issuer.get("configured"):
        reach = {True: f"reachable (last contact {issuer.get('last_contact')})", None: "not asked yet"}.get(
            issuer.get("reachable"), f"UNREACHABLE: {issuer.get('last_error')}")
        credential = (issuer.get("node_credential") or {}).get("not_after")
        lines.append(f"  issuer       {issuer.get('address', '')}: {reach}"
                     + (f"; node credential valid until {credential}" if credential else ""))
        refused_credential = issuer.get("credential_refused")
        if refused_credential:
            lines.append(f"    CREDENTIAL REFUSED since {refused_credential['since'][:19]} "
                         f"({refused_credential['reason']}): joining again; see the problem below")
        join = issuer.get("join")
        if join:
            lines.append(f"    NOT JOINED   {join['failures']} attempt(s) failed; next at {join['retry_at'][:19]} "
                         f"(in {_ago(join['seconds_to_retry'])})")
        for a in issuer.get("awaiting") or ():
            retry = f"; next retry {a['retry_at'][:19]} (in {_ago(a['seconds_to_retry'])})" if a["retry_at"] else ""
            lines.append(f"    NO SVID YET  {a['spiffe_id']} (connects refused): "
                         + (f"{a['failures']} failure(s), last: {a['last_error']}{retry}" if a["failures"]
                            else "first request under way"))
    else:
        lines.append("  issuer       not configured (this node signs with its own node CA)")
    config = doc.get("config") or {}
    if config.get("file"):
        last = config.get("last_reload")
        lines.append(f"  config       {config['file']} (watch {'on' if config.get('watch') else 'off'}); last reload: "
                     + (f"{last['result']} by {last['trigger']} at {_when(last['at'], now)}" if last else "none"))
    lines += [f"  problem: {p}" for p in doc["problems"]]
    return "\n".join(lines)
