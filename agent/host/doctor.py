"""`tcpmesh doctor`: can the agent run on this host, with which capture mode, and why.

Three layers:
  - pure: the checks and what each capture mode needs (``CHECKS``, ``MODE_REQUIREMENTS``),
    ``evaluate_modes``, ``select_mode``, ``build_report`` (the JSON document, schema
    ``REPORT_VERSION``, documented in docs/capture-doctor.md) and ``render_table``;
  - ``run_checks``: runs the probes of agent.host.probes (throwaway namespaces; nothing attached to
    the caller's) and records the hidden ones as disabled;
  - the click command, and ``choose_capture_mode`` which the agent calls for ``capture.mode: auto``
    (it runs `tcpmesh doctor --json` in a child process: the probes import pyroute2 and the netfilter
    front ends, +11 MiB RSS measured had the agent run them itself, for a choice made once at start).
A capability can be hidden for tests and what-ifs with ``--assume-missing CHECK`` or
``TCPMESH_DOCTOR_DISABLE=check1,check2``: the row then reads ``disabled`` and counts as missing.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import click

from agent.host import probes
from agent.errors import EnvironmentProblem

REPORT_VERSION = 1
DISABLE_ENV = "TCPMESH_DOCTOR_DISABLE"
DISABLED = "disabled"
MODE_ORDER = ("ebpf-connect", "ebpf-tc", "iptables")  # what auto prefers, best first

# check name -> what it establishes (the order of the table)
CHECKS: dict[str, str] = {
    "root": "running as root",
    "permissions": "CAP_NET_ADMIN and CAP_SYS_ADMIN",
    "clock": "wall clock sane (certificates), synchronised",
    "bpf_syscall": "bpf(2) usable: create a map",
    "cgroup2": "cgroup v2 mounted and writable",
    "bpffs": "bpf filesystem available (pinning)",
    "bcc": "bcc importable (compiles the programs)",
    "bpf_compile": "bpf/probe.c compiles with the shipped kernel stub",
    "prog_connect4": "cgroup_sock_addr program, attach type connect4",
    "prog_connect6": "cgroup_sock_addr program, attach type connect6",
    "prog_getpeername4": "cgroup_sock_addr program, attach type getpeername4",
    "prog_getpeername6": "cgroup_sock_addr program, attach type getpeername6",
    "prog_sockops": "sock_ops program",
    "prog_getsockopt": "cgroup_sockopt program, attach type getsockopt",
    "prog_sched_cls": "sched_cls (tc) program",
    "helper_skc_lookup_tcp": "helper bpf_skc_lookup_tcp in tc",
    "helper_sk_assign": "helper bpf_sk_assign in tc",
    "netns": "create a throwaway network namespace (for the probes below)",
    "tc_clsact": "clsact qdisc + direct-action bpf filter (throwaway netns)",
    "policy_routing": "fwmark rule + local route table (throwaway netns)",
    "policy_routing6": "IPv6 fwmark rule + local ::/0 table (throwaway netns)",
    "tproxy_nft": "TPROXY with native nft (throwaway netns)",
    "tproxy_iptables_nft": "TPROXY with iptables-nft (throwaway netns)",
    "tproxy_iptables_legacy": "TPROXY with iptables-legacy (throwaway netns)",
    "ktls": "kernel TLS for the tunnels: a loopback TLS 1.3 pair through the agent's switch (optional, no mode needs it)",
}
# checks no capture mode requires: their rows inform (docs/kernels.md), never decide can_run
OPTIONAL_CHECKS = ("ktls",)
BASE_REQUIREMENTS = ("root", "permissions", "clock")
# mode -> requirements; a tuple inside is "any one of these"
MODE_REQUIREMENTS: dict[str, tuple] = {
    "ebpf-connect": ("bpf_syscall", "cgroup2", "bpffs", "bcc", "bpf_compile", "prog_connect4", "prog_connect6",
                     "prog_getpeername4", "prog_getpeername6", "prog_sockops", "prog_getsockopt"),
    "ebpf-tc": ("bpf_syscall", "bcc", "bpf_compile", "prog_sched_cls", "helper_skc_lookup_tcp", "helper_sk_assign",
                "netns", "tc_clsact", "policy_routing"),
    "iptables": ("netns", "policy_routing", ("tproxy_nft", "tproxy_iptables_nft", "tproxy_iptables_legacy")),
}
# proxy.source_address pod: the inbound leg's IP_TRANSPARENT socket (CAP_NET_ADMIN) and the tc return
# program (bpf/source_return.c: sched_cls, a socket lookup) with the fwmark rule and local table
SOURCE_ADDRESS_REQUIREMENTS = ("permissions", "bcc", "bpf_compile", "prog_sched_cls", "helper_skc_lookup_tcp",
                               "tc_clsact", "policy_routing")
# IPv6 legs: the same, plus the IPv6 pair of the return path (a kernel without it: IPv6 servers see the node's)
SOURCE_ADDRESS_REQUIREMENTS6 = ("policy_routing6",)
# a check that cannot run without another one
DEPENDS_ON = {
    **{name: "bcc" for name in ("bpf_compile", *probes.PROGRAM_PROBES)},
    **{name: "bpf_compile" for name in probes.PROGRAM_PROBES},
    **{name: "netns" for name in ("tc_clsact", "policy_routing", "policy_routing6", *probes.TPROXY_PROBES)},
}


@dataclass(frozen=True)
class CheckResult:
    name: str
    result: str          # ok | warn | fail | skipped | disabled
    detail: str = ""
    error: str = ""
    seconds: float = 0.0

    @property
    def usable(self) -> bool:
        return self.result in (probes.OK, probes.WARN)


@dataclass(frozen=True)
class ModeVerdict:
    name: str
    usable: bool
    missing: tuple[str, ...]   # checks (or "a|b|c" groups) that failed
    detail: str                # e.g. which netfilter backend


# ---- pure ---------------------------------------------------------------------------------------------

def parse_disabled(values: Iterable[str]) -> frozenset[str]:
    """--assume-missing values and TCPMESH_DOCTOR_DISABLE items -> check names; unknown names raise."""
    names = {part.strip() for value in values for part in value.split(",") if part.strip()}
    unknown = sorted(names - set(CHECKS))
    if unknown:
        raise click.BadParameter(f"unknown check(s) {', '.join(unknown)}; known: {', '.join(CHECKS)}",
                                 param_hint="--assume-missing / " + DISABLE_ENV)
    return frozenset(names)


def evaluate_modes(results: Mapping[str, CheckResult]) -> list[ModeVerdict]:
    verdicts = []
    for mode in MODE_ORDER:
        missing: list[str] = []
        detail = ""
        for need in BASE_REQUIREMENTS + MODE_REQUIREMENTS[mode]:
            if isinstance(need, tuple):
                usable = [n for n in need if _usable(results, n)]
                if usable:
                    detail = f"netfilter backend {probes.TPROXY_PROBES[usable[0]]}"
                else:
                    missing.append("|".join(need))
            elif not _usable(results, need):
                missing.append(need)
        verdicts.append(ModeVerdict(mode, not missing, tuple(missing), detail))
    return verdicts


def _usable(results: Mapping[str, CheckResult], name: str) -> bool:
    result = results.get(name)
    return result is not None and result.usable


def select_mode(configured: str, verdicts: Sequence[ModeVerdict]) -> tuple[str | None, str]:
    """(the mode the agent would use or None, why)."""
    by_name = {v.name: v for v in verdicts}
    if configured == "none":
        return "none", "capture.mode is none: nothing is captured"
    if configured != "auto":
        verdict = by_name[configured]
        if verdict.usable:
            return configured, f"capture.mode is {configured} and this host supports it"
        return None, f"capture.mode is {configured} but this host lacks: {', '.join(verdict.missing)}"
    skipped = []
    for verdict in verdicts:
        if verdict.usable:
            why = f"capture.mode auto: {verdict.name} is the best usable mode ({' > '.join(MODE_ORDER)})"
            if skipped:
                why += "; " + "; ".join(skipped)
            return verdict.name, why
        skipped.append(f"{verdict.name} unusable (missing {', '.join(verdict.missing)})")
    return None, "capture.mode auto: no capture mode is usable: " + "; ".join(skipped)


def source_address_verdict(results: Mapping[str, CheckResult], configured: str = "auto",
                           ipv6_required: bool = True) -> dict:
    """Which source address pods see on meshed connections (proxy.source_address), and why (pure).
    ``selected`` is IPv4's; ``ipv6`` says the same of IPv6 legs (their return path may be missing alone).
    ``ipv6_required``: pod refuses to start without the IPv6 pair (the agent's rule while capture.ipv6 is on)."""
    missing = [name for name in SOURCE_ADDRESS_REQUIREMENTS if not _usable(results, name)]
    if configured == "node":
        verdict = {"configured": configured, "selected": "node", "can_run": True, "missing": missing,
                   "reason": "proxy.source_address is node: servers see the node's address"}
    elif not missing:
        verdict = {"configured": configured, "selected": "pod", "can_run": True, "missing": [],
                   "reason": "servers see the client pod's own address (IP_TRANSPARENT leg, tc return path)"}
    elif configured == "pod":
        verdict = {"configured": configured, "selected": None, "can_run": False, "missing": missing,
                   "reason": f"proxy.source_address is pod but this host lacks: {', '.join(missing)}; "
                             "set it to auto or node"}
    else:
        verdict = {"configured": configured, "selected": "node", "can_run": True, "missing": missing,
                   "reason": "proxy.source_address auto falls back to node (servers see the node's address): "
                             f"this host lacks: {', '.join(missing)}"}
    verdict["ipv6"] = _source_address6(results, verdict, ipv6_required)
    verdict["can_run"] = verdict["can_run"] and verdict["ipv6"]["can_run"]
    return verdict


def _source_address6(results: Mapping[str, CheckResult], ipv4: Mapping, required: bool) -> dict:
    """The IPv6 half of the source address verdict."""
    check = results.get("policy_routing6")
    if ipv4["selected"] != "pod":
        return {"selected": ipv4["selected"], "can_run": True, "missing": [], "reason": "as for IPv4"}
    if check is not None and check.result == probes.SKIPPED and check.error == probes.NO_IPV6:
        return {"selected": "none", "can_run": True, "missing": [],
                "reason": f"{probes.NO_IPV6}: there are no IPv6 connections to give an address"}
    missing = [name for name in SOURCE_ADDRESS_REQUIREMENTS6 if not _usable(results, name)]
    if not missing:
        return {"selected": "pod", "can_run": True, "missing": [],
                "reason": "IPv6 servers see the client pod's own IPv6 address (IPV6_TRANSPARENT leg, "
                          "ip -6 fwmark rule and local ::/0 table)"}
    why = f"this host lacks: {', '.join(missing)} (IPv6 enabled on lo and CONFIG_IPV6_MULTIPLE_TABLES)"
    if ipv4["configured"] == "pod" and required:
        return {"selected": None, "can_run": False, "missing": missing,
                "reason": f"proxy.source_address is pod but {why}; set it to auto (IPv6 servers then see the "
                          "node's address) or capture.ipv6 to false"}
    return {"selected": "node", "can_run": True, "missing": missing,
            "reason": f"IPv6 servers see the node's address (IPv4 servers the pod's): {why}"}


def same_node_verdict(configured: str = "local") -> dict:
    """How connections between two pods of this node go (proxy.same_node; agent.proxy.local), pure."""
    if configured == "tunnel":
        return {"configured": configured, "path": "tunnel",
                "reason": "proxy.same_node is tunnel: through the mTLS tunnel to this node and its inbound proxy"}
    return {"configured": configured, "path": "local",
            "reason": "authorized and recorded in process as through the tunnel, then relayed straight to the "
                      "workload (no TLS: the bytes never leave this host); set proxy.same_node to tunnel to turn it off"}


def data_path_verdict() -> dict:
    """Which implementation of the tunnel's per-message work the agent uses (agent.proxy.hotpath)."""
    from agent.proxy import hotpath  # only here: the data path's choice, no probe needs it

    return {"implementation": hotpath.name(), "reason": hotpath.describe()}


def build_report(results: Sequence[CheckResult], configured: str, source_address: str = "auto",
                 same_node: str = "local", ipv6_required: bool = True) -> dict:
    by_name = {r.name: r for r in results}
    verdicts = evaluate_modes(by_name)
    selected, reason = select_mode(configured, verdicts)
    source = source_address_verdict(by_name, source_address, ipv6_required)
    return {
        "version": REPORT_VERSION,
        "checks": [{"name": r.name, "result": r.result, "detail": r.detail, "error": r.error or None,
                    "seconds": round(r.seconds, 3)} for r in results],
        "modes": [{"name": v.name, "usable": v.usable, "missing": list(v.missing), "detail": v.detail}
                  for v in verdicts],
        "configured_mode": configured,
        "selected_mode": selected,
        "reason": reason,
        "source_address": source,
        "same_node": same_node_verdict(same_node),
        "data_path": data_path_verdict(),
        "can_run": selected is not None and source["can_run"],
    }


def render_table(report: Mapping) -> str:
    rows = [(c["name"], c["result"], c["error"] or c["detail"]) for c in report["checks"]]
    width = max(len(r[0]) for r in rows)
    lines = [f"{'CHECK':<{width}}  {'RESULT':<8}  DETAIL / ERROR"]
    lines += [f"{name:<{width}}  {result:<8}  {text}" for name, result, text in rows]
    lines.append("")
    for mode in report["modes"]:
        state = "usable" if mode["usable"] else "unusable, missing " + ", ".join(mode["missing"])
        lines.append(f"mode {mode['name']}: {state}{' (' + mode['detail'] + ')' if mode['detail'] else ''}")
    lines.append("")
    selected = report["selected_mode"]
    lines.append(f"the agent would use: {selected}" if selected else "the agent cannot run")
    lines.append(f"why: {report['reason']}")
    source = report.get("source_address")
    if source is not None:
        lines.append(f"source address servers see: {source['selected'] or 'none (the agent cannot run)'}")
        lines.append(f"why: {source['reason']}")
        ipv6 = source.get("ipv6")
        if ipv6 is not None:
            lines.append(f"source address IPv6 servers see: {ipv6['selected'] or 'none (the agent cannot run)'}")
            lines.append(f"why: {ipv6['reason']}")
    same = report.get("same_node")
    if same is not None:
        lines.append(f"same-node connections: {same['path']} ({same['reason']})")
    data_path = report.get("data_path")
    if data_path is not None:
        lines.append(f"tunnel data path: {data_path['reason']}")
    return "\n".join(lines)


# ---- running the probes ---------------------------------------------------------------------------------

def run_checks(disabled: frozenset[str] = frozenset(), cgroup_root: str | None = None,
               state_dir: str | None = None) -> list[CheckResult]:
    results: dict[str, CheckResult] = {}

    def record(name: str, fn) -> None:
        if name in disabled:
            results[name] = CheckResult(name, DISABLED, error=f"assumed missing ({DISABLE_ENV} / --assume-missing)")
            return
        parent = DEPENDS_ON.get(name)
        if parent is not None and parent in results and not results[parent].usable:
            results[name] = CheckResult(name, probes.SKIPPED, error=f"needs {parent}")
            return
        started = time.monotonic()
        probe = probes.guarded(fn)
        results[name] = CheckResult(name, probe.result, probe.detail, probe.error, time.monotonic() - started)

    record("root", probes.probe_root)
    record("permissions", probes.probe_permissions)
    record("clock", probes.probe_clock)
    record("bpf_syscall", probes.probe_bpf_syscall)
    record("cgroup2", lambda: probes.probe_cgroup2(cgroup_root))
    record("bpffs", probes.probe_bpffs)
    record("bcc", probes.probe_bcc)
    _record_programs(results, record, disabled, state_dir)
    _record_netns_checks(results, record)
    record("ktls", probes.probe_ktls)
    return [results[name] for name in CHECKS]


def _record_programs(results: dict, record, disabled: frozenset[str], state_dir: str | None) -> None:
    wanted = set(probes.PROGRAM_PROBES) - disabled
    loaded: dict[str, probes.Probe] = {}
    if results["bcc"].usable and "bpf_compile" not in disabled:
        started = time.monotonic()
        loaded = probes.probe_programs(state_dir, wanted)
        elapsed = time.monotonic() - started
        results["bpf_compile"] = CheckResult("bpf_compile", loaded["bpf_compile"].result, loaded["bpf_compile"].detail,
                                             loaded["bpf_compile"].error, elapsed)
    else:
        record("bpf_compile", lambda: probes.fail("not run"))
    for name in probes.PROGRAM_PROBES:
        record(name, lambda name=name: loaded.get(name) or probes.fail("not loaded"))


def _record_netns_checks(results: dict, record) -> None:
    names = ("tc_clsact", "policy_routing", "policy_routing6", *probes.TPROXY_PROBES)
    try:
        context = probes.throwaway_netns()
        netns = context.__enter__()
    except Exception as exc:
        record("netns", lambda exc=exc: probes.fail(f"cannot create a network namespace: {exc}"))
        for name in names:
            record(name, lambda: probes.fail("not run"))
        return
    try:
        record("netns", lambda: probes.ok(f"created {netns}"))
        record("tc_clsact", lambda: probes.probe_tc_clsact(netns))
        record("policy_routing", lambda: probes.probe_policy_routing(netns))
        record("policy_routing6", lambda: probes.probe_policy_routing6(netns))
        for check, backend in probes.TPROXY_PROBES.items():
            record(check, lambda backend=backend: probes.probe_tproxy(netns, backend))
    finally:
        context.__exit__(None, None, None)


def doctor_report(configured: str = "auto", disabled: Iterable[str] = (), cgroup_root: str | None = None,
                  state_dir: str | None = None, environ: Mapping[str, str] | None = None,
                  source_address: str = "auto", same_node: str = "local", ipv6_required: bool = True) -> dict:
    environ = os.environ if environ is None else environ
    hidden = parse_disabled([*disabled, environ.get(DISABLE_ENV, "")])
    return build_report(run_checks(hidden, cgroup_root, state_dir), configured, source_address, same_node,
                        ipv6_required)


# ---- for the agent: capture.mode auto -------------------------------------------------------------

def choose_capture_mode(config, log: logging.Logger | None = None) -> str:
    """Run `tcpmesh doctor --json` in a child process and return the mode auto selects; log which and why."""
    log = log or logging.getLogger("tcpmesh.capture")
    argv = [sys.executable, "-m", "agent", "doctor", "--json", "--mode", "auto",
            "--cgroup-root", config.capture.cgroup_root, "--state-dir", config.state_dir]
    started = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    try:
        report = json.loads(done.stdout)
    except ValueError as exc:
        raise EnvironmentProblem(f"capture.mode auto: `tcpmesh doctor` gave no report (exit {done.returncode}): "
                                 f"{done.stderr.strip()[-500:]}") from exc
    selected = report["selected_mode"]
    if selected == "ebpf-connect" and not config.capture.redirect_address:
        report["reason"] += "; but capture.redirect_address is not set"
        selected = next((m["name"] for m in report["modes"] if m["usable"] and m["name"] != "ebpf-connect"), None)
    if selected is None:
        failed = "; ".join(f"{c['name']}: {c['error']}" for c in report["checks"] if c["error"])
        raise EnvironmentProblem(f"{report['reason']} ({failed}); run `tcpmesh doctor` for the full table")
    log.info("capture mode %s chosen in %.1fs: %s", selected, time.monotonic() - started, report["reason"])
    return selected


# ---- CLI ------------------------------------------------------------------------------------------------

@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (schema in docs/capture-doctor.md).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, exists=True),
              help="Agent config: judge its capture.mode, cgroup root and state dir.")
@click.option("--assume-missing", "assume_missing", multiple=True, metavar="CHECK",
              help=f"Treat CHECK as missing (repeatable, or comma-separated; also ${DISABLE_ENV}).")
@click.option("--mode", "mode", type=click.Choice(["auto", *MODE_ORDER, "none"]), default=None,
              help="Judge this capture mode (default: the config's, else auto).")
@click.option("--cgroup-root", default=None, help="cgroup v2 mount to check (default: the config's, else found).")
@click.option("--state-dir", default=None, help="Where the probe compile materialises the kernel stub.")
def doctor(as_json: bool, config_path: str | None, assume_missing: tuple[str, ...], mode: str | None,
           cgroup_root: str | None, state_dir: str | None) -> None:
    """Check this host: every kernel feature each capture mode needs, and which mode the agent would use.
    With --config also whether its policy.dir loads and what a running agent's /readyz says.

    Exit code 0 if the agent can run (its capture mode is usable, its policy set loads), 1 otherwise, 2 when
    the --config file does not load.
    """
    configured = mode or "auto"
    source_address, same_node, ipv6_required = "auto", "local", True
    if config_path:
        from agent.config import load_config

        config = load_config(config_path)
        configured = mode or config.capture.mode
        cgroup_root = cgroup_root or config.capture.cgroup_root
        state_dir = state_dir or config.state_dir
        source_address, same_node = config.proxy.source_address, config.proxy.same_node
        ipv6_required = config.capture.ipv6
    report = doctor_report(configured, assume_missing, cgroup_root, state_dir, source_address=source_address,
                           same_node=same_node, ipv6_required=ipv6_required)
    text = None if as_json else render_table(report)
    if config_path:  # will this configured agent turn ready (agent/host/readiness.py)?
        from agent.host import readiness

        registry_lines: list[str] = []
        if config.registry.source == "file":
            report["registry"] = readiness.registry_status(config.registry.file, config.trust_domain,
                                                           config.node.name)
            report["can_run"] = report["can_run"] and report["registry"]["loads"]
            registry_lines = readiness.render_registry(report["registry"])
        report["policy"] = readiness.policy_status(config.policy.dir)
        report["running_agent"] = readiness.running_agent(config.admin.socket)
        report["can_run"] = report["can_run"] and report["policy"]["loads"]
        if text is not None:
            text = "\n".join([text, "", *registry_lines, *readiness.render(report["policy"], report["running_agent"])])
    click.echo(json.dumps(report, indent=2) if as_json else text)
    sys.exit(0 if report["can_run"] else 1)
