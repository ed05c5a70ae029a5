"""`tcpmesh status`'s document and text: every fact a newcomer needs, and a refused policy change
named with file:line: field: problem plus the valid edits it holds back."""

from __future__ import annotations

from agent.control.status import format_status, node_status

NOW = 1_800_000_000.0
REFUSED = {"error": "/p/typo.yaml:4: spec.action: 'DENNY' is not ALLOW, DENY or AUDIT", "file": "/p/typo.yaml",
           "line": 4, "field": "spec.action", "problem": "'DENNY' is not ALLOW, DENY or AUDIT", "at": NOW - 120,
           "held_back": ["/p/kept.yaml"],
           "files": [{"file": "/p/kept.yaml", "change": "changed", "error": ""},
                     {"file": "/p/typo.yaml", "change": "added", "error": "/p/typo.yaml:4: spec.action: 'DENNY' ..."}]}


def status(**overrides):
    values = dict(node="node1", now=NOW, ready=True, not_ready_reason="", capture_mode="ebpf-connect",
                  workloads=[{"name": "web", "namespace": "shop", "spiffe_id": "spiffe://td/ns/shop/sa/web",
                              "local": True, "captured": True, "problem": "", "ip": "10.0.0.5"},
                             {"name": "db", "namespace": "data", "spiffe_id": "spiffe://td/ns/data/sa/db",
                              "local": False, "captured": False, "problem": ""}],
                  identities=[{"spiffe_id": "spiffe://td/ns/shop/sa/web", "not_after": "2027-01-15T08:00:00+00:00",
                               "seconds_to_expiry": 3000.0, "state": "valid", "last_error": None}],
                  policy={"dir": "/p", "in_force": True, "loaded_at": NOW - 3600, "authorization": 2,
                          "peer_authentication": 1, "files": 2, "default_action": "ALLOW", "refused": None},
                  registry={"source": "file", "healthy": True, "errors": 0, "last_error": "", "file": "/r.yaml"},
                  issuer=None)
    values.update(overrides)
    return node_status(**values)


def test_a_healthy_node_has_no_problems_and_says_what_it_runs():
    doc = status()
    assert doc["problems"] == [] and doc["remote_workloads"] == 1
    text = format_status(doc)
    assert text.startswith("node node1: READY")
    assert "1 local (1 captured), 1 on other nodes" in text
    assert "2 AuthorizationPolicy, 1 PeerAuthentication from /p, loaded 2027-01-15T07:00:00+00:00 (1h ago)" in text
    assert "spiffe://td/ns/shop/sa/web" in text and "expires 2027-01-15T08:00:00 (in 50m)" in text
    assert "issuer       not configured" in text and "registry     file: healthy" in text


def test_a_refused_change_is_a_problem_with_its_file_line_field_and_held_back_edits():
    doc = status(policy={"dir": "/p", "in_force": True, "loaded_at": NOW - 3600, "authorization": 2,
                         "peer_authentication": 1, "files": 2, "default_action": "ALLOW", "refused": REFUSED})
    assert doc["problems"] == ["policy change refused, the previous set stays in force: /p/typo.yaml:4: spec.action: "
                               "'DENNY' is not ALLOW, DENY or AUDIT (also held back, valid on their own: /p/kept.yaml)"]
    text = format_status(doc)
    assert "REFUSED      policy change at 2027-01-15T07:58:00+00:00 (2m ago): /p/typo.yaml:4: spec.action:" in text
    assert "changed  /p/kept.yaml: valid, held back (not in force)" in text
    assert "added    /p/typo.yaml: broken:" in text


def test_not_ready_uncaptured_expiring_and_registry_errors_are_problems():
    doc = status(ready=False, not_ready_reason="no policy set is in force: /p/x.yaml:1: kind: is required",
                 workloads=[{"name": "web", "namespace": "shop", "spiffe_id": "s", "local": True, "captured": False,
                             "problem": "cgroup /x does not exist"}],
                 identities=[{"spiffe_id": "s", "not_after": "2027-01-15T08:05:00+00:00", "seconds_to_expiry": 300.0,
                              "seconds_to_renewal": -900.0, "state": "valid", "last_error": None}],
                 registry={"source": "file", "healthy": False, "errors": 2, "last_error": "/r.yaml:3: ip: bad"})
    assert doc["problems"] == ["not ready: no policy set is in force: /p/x.yaml:1: kind: is required",
                               "registry source file: /r.yaml:3: ip: bad",
                               "workload shop/web is NOT captured: cgroup /x does not exist",
                               "identity s: renewal overdue by 900s, expires in 300s"]
    assert "UNHEALTHY: /r.yaml:3: ip: bad (2 refused version(s) since start)" in format_status(doc)


def test_the_issuer_is_shown_when_configured_and_unreachable_is_a_problem():
    issuer = {"configured": True, "address": "10.0.0.1:15030", "reachable": False, "last_error": "connection refused",
              "last_contact": None, "node_credential": {"not_after": "2027-01-16T07:00:00+00:00"}}
    doc = status(issuer=issuer)
    assert doc["problems"] == ["issuer 10.0.0.1:15030 unreachable: connection refused"]
    assert ("issuer       10.0.0.1:15030: UNREACHABLE: connection refused; node credential valid until "
            "2027-01-16T07:00:00+00:00") in format_status(doc)
    asked_never = status(issuer={**issuer, "reachable": None})
    assert asked_never["problems"] == [] and "not asked yet" in format_status(asked_never)


def test_a_node_credential_the_issuer_refuses_is_a_problem_naming_why_and_the_fix():
    message = ("the client certificate chains to root CN=old (sha256:60571fe658c0…), which was removed from the "
               "issuer's trust bundle (`tcpmesh ca rotate remove-old`): … put a one-time token (`tcpmesh issuer token "
               "node1`) in the agent's identity.issuer.bootstrap_token_file …")
    issuer = {"configured": True, "address": "10.0.0.1:15030", "reachable": True, "last_contact": "now",
              "node_credential": {"not_after": "2027-01-16T07:00:00+00:00"},
              "credential_refused": {"reason": "removed_root", "message": message, "since": "2027-01-15T07:00:00+00:00"}}
    doc = status(issuer=issuer)
    assert doc["problems"] == [f"the issuer refuses this node's credential (removed_root), the agent joins again: "
                               f"{message}"]
    text = format_status(doc)
    assert "CREDENTIAL REFUSED since 2027-01-15T07:00:00 (removed_root): joining again" in text
    assert "tcpmesh issuer token node1" in text


def test_a_node_not_joined_and_identities_without_an_svid_are_listed_with_error_and_retry():
    issuer = {"configured": True, "address": "10.0.0.1:15030", "reachable": False, "last_error": "no issuer answered",
              "last_contact": None, "node_credential": {"not_after": None},
              "join": {"failures": 3, "retry_at": "2027-01-16T07:00:04+00:00", "seconds_to_retry": 3.6},
              "awaiting": [{"spiffe_id": "spiffe://td/ns/shop/sa/web", "failures": 2, "retry_at":
                            "2027-01-16T07:00:02+00:00", "seconds_to_retry": 1.5,
                            "last_error": "the issuer refused (not_on_node)"},
                           {"spiffe_id": "spiffe://td/ns/shop/sa/new", "failures": 0, "retry_at": None,
                            "seconds_to_retry": None, "last_error": None}]}
    doc = status(ready=False, not_ready_reason="not joined to the issuer yet", issuer=issuer)
    text = format_status(doc)
    assert "NOT JOINED   3 attempt(s) failed; next at 2027-01-16T07:00:04" in text
    assert ("NO SVID YET  spiffe://td/ns/shop/sa/web (connects refused): 2 failure(s), last: the issuer refused "
            "(not_on_node); next retry 2027-01-16T07:00:02 (in 2s)") in text
    assert "NO SVID YET  spiffe://td/ns/shop/sa/new (connects refused): first request under way" in text
    assert ("identity spiffe://td/ns/shop/sa/web has no SVID yet (its workloads' connects are refused): the issuer "
            "refused (not_on_node)") in doc["problems"]


def test_a_refused_config_file_and_fields_waiting_for_a_restart_are_problems_and_the_last_reload_is_shown():
    config = {"file": "/etc/tcpmesh/config/config.yaml", "watch": True,
              "restart_hint": "`kubectl -n tcpmesh-system rollout restart ds/tcpmesh-agent` (…)",
              "last_reload": {"at": NOW - 60, "trigger": "watch", "result": "refused"},
              "refused": {"at": NOW - 60, "trigger": "watch",
                          "error": "/etc/tcpmesh/config/config.yaml: identity.mode: unknown mode (got 'isuer')"},
              "restart_needed": [{"field": "proxy.max_connections", "old": 32768, "new": 20000}]}
    doc = status(config=config)
    assert doc["problems"] == [
        "config file change refused, the last good config keeps running: /etc/tcpmesh/config/config.yaml: "
        "identity.mode: unknown mode (got 'isuer')",
        "config changes wait for a restart: proxy.max_connections 32768 → 20000; "
        "`kubectl -n tcpmesh-system rollout restart ds/tcpmesh-agent` (…)"]
    text = format_status(doc)
    assert "config       /etc/tcpmesh/config/config.yaml (watch on); last reload: refused by watch at" in text
    assert status()["problems"] == [] and "config " not in format_status(status())   # no file: no line


TLS_KERNEL = {"setting": "auto", "in_use": "kernel", "reason": "the start-up probe passed: a loopback TLS 1.3 pair ...",
              "open": {"kernel": 3, "user": 0}, "established": {"kernel": 5, "user": 0}, "switch_failures": 0}


def test_the_tunnels_tls_is_shown_with_why_and_a_failed_switch_is_a_problem():
    text = format_status(status(tunnel_tls=TLS_KERNEL))
    assert "  tunnel TLS   kernel (proxy.kernel_tls auto): the start-up probe passed: a loopback" in text
    assert "tunnels open: 3 kernel, 0 user-space (5 and 0 since start)" in text
    assert status(tunnel_tls=TLS_KERNEL)["problems"] == []
    fallen = {**TLS_KERNEL, "in_use": "user", "switch_failures": 1,
              "reason": "a tunnel's switch to kernel TLS failed (EBUSY); user-space TLS from now on"}
    doc = status(tunnel_tls=fallen)
    assert doc["problems"] == ["tunnel TLS: 1 tunnel(s) failed to switch to kernel TLS and were closed; now a tunnel's "
                               "switch to kernel TLS failed (EBUSY); user-space TLS from now on"]
    assert "tunnel TLS   user-space (proxy.kernel_tls auto)" in format_status(doc) and "1 failed switch(es)" in format_status(doc)
