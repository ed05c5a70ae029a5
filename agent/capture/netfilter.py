"""TPROXY rules for the iptables capture mode, for three netfilter front ends, and finding them again.

Backends, tried in this order by the mode: native ``nft`` (table ``inet tcpmesh``),
``iptables-nft`` and ``iptables-legacy`` (chains ``TCPMESH-PREROUTING`` and ``TCPMESH-CAPTURE`` in
the mangle table, jumped to from PREROUTING). The same rules in every backend:

    prerouting, TCP entering on a captured pod's interface (nft set pod_ifaces / one
    `-i <veth> -j TCPMESH-CAPTURE` per interface) → capture:
        reply direction (the pod answering as a server)          → leave
        destination is an address of the node (incl. 127/8)     → leave
        0.0.0.0/8                                                → leave
        capture/bypass CIDRs, longest prefix first               → leave | TPROXY to the proxy
    TPROXY: an established proxy socket or the IP_TRANSPARENT listener (ON_IP:ON_PORT), mark
    STEER_MARK; no socket → drop (fail-closed; TPROXY drops by itself, nft needs the drop rule).

The rule text is built by pure functions (unit-tested); ``Backend`` objects apply it with the
command-line tools in the caller's or a named netns (agent.capture.netns). Installing is
idempotent and atomic per backend (one `nft -f` transaction, one `iptables-restore --noflush`
commit); the set of captured interfaces survives a re-install, so a restarted agent never
un-captures a pod it had. Must not import bcc.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Sequence

from agent.capture.cidrs import parse_cidrs
from agent.capture.netns import Completed, describe, run
from agent.errors import ConfigError, TcpmeshError

NFT_FAMILY = "inet"
NFT_TABLE = "tcpmesh"
NFT_SET = "pod_ifaces"
CHAIN_PREFIX = "TCPMESH-"
CHAIN_PREROUTING = "TCPMESH-PREROUTING"
CHAIN_CAPTURE = "TCPMESH-CAPTURE"
IPTABLES_TABLE = "mangle"
BACKEND_ORDER = ("nft", "iptables-nft", "iptables-legacy")
XTABLES_WAIT = "5"


class NetfilterError(TcpmeshError):
    """A netfilter command failed (the message carries the command and its error output)."""


@dataclass(frozen=True)
class TproxySpec:
    on_ip: str                                 # where TPROXY looks the listener up
    on_port: int
    mark: int
    cidr_rules: tuple[tuple[str, bool], ...]   # (cidr, capture?) longest prefix first
    # Service IPv4 addresses captured although they are the node's own (kube-proxy's IPVS mode puts every
    # ClusterIP on kube-ipvs0): checked before the node's local addresses are passed
    local_mesh: tuple[str, ...] = ()


def cidr_rules(capture: Sequence[str], bypass: Sequence[str] = ()) -> tuple[tuple[str, bool], ...]:
    """Capture/bypass CIDRs ordered longest prefix first, so first match = longest match (pure)."""
    captured = parse_cidrs("capture_cidrs", capture)
    bypassed = parse_cidrs("bypass_cidrs", bypass)
    both = set(captured) & set(bypassed)
    if both:
        raise ConfigError("bypass_cidrs", str(sorted(both)[0]), "is also in capture_cidrs",
                          "list each prefix in one of them")
    rules = [(net, True) for net in captured] + [(net, False) for net in bypassed]
    rules.sort(key=lambda item: (-item[0].prefixlen, int(item[0].network_address)))
    return tuple((str(net), keep) for net, keep in rules)


def nft_ruleset(spec: TproxySpec) -> str:
    """One `nft -f` transaction: create what is missing, rebuild the chains, keep the set (pure)."""
    t = f"{NFT_FAMILY} {NFT_TABLE}"
    lines = [
        f"table {t} {{}}",
        f'add set {t} {NFT_SET} {{ type ifname; comment "tcpmesh: node-side interfaces of captured pods"; }}',
        f"add chain {t} capture",
        f"add chain {t} divert",
        f"add chain {t} prerouting {{ type filter hook prerouting priority mangle; policy accept; }}",
        f"flush chain {t} prerouting",
        f"flush chain {t} capture",
        f"flush chain {t} divert",
        f"add rule {t} prerouting meta nfproto ipv4 meta l4proto tcp iifname @{NFT_SET} jump capture",
        f"add rule {t} capture ct direction reply return",
        *(f"add rule {t} capture ip daddr {address} jump divert" for address in spec.local_mesh),
        f"add rule {t} capture fib daddr type local return",
        f"add rule {t} capture ip daddr 0.0.0.0/8 return",
    ]
    for cidr, capture in spec.cidr_rules:
        lines.append(f"add rule {t} capture ip daddr {cidr} {'jump divert' if capture else 'return'}")
    lines += [
        f"add rule {t} divert meta l4proto tcp tproxy ip to {spec.on_ip}:{spec.on_port} "
        f"meta mark set meta mark | {spec.mark:#x} accept",
        f"add rule {t} divert counter drop",
    ]
    return "\n".join(lines) + "\n"


def iptables_capture_chain(spec: TproxySpec) -> str:
    """iptables-restore --noflush input that (re)defines TCPMESH-CAPTURE atomically (pure)."""
    target = (f"-j TPROXY --on-port {spec.on_port} --on-ip {spec.on_ip} "
              f"--tproxy-mark {spec.mark:#x}/{spec.mark:#x}")
    lines = [
        f"*{IPTABLES_TABLE}",
        f":{CHAIN_CAPTURE} - [0:0]",
        f"-A {CHAIN_CAPTURE} -m conntrack --ctdir REPLY -j RETURN",
        *(f"-A {CHAIN_CAPTURE} -d {address}/32 -p tcp {target}" for address in spec.local_mesh),
        f"-A {CHAIN_CAPTURE} -m addrtype --dst-type LOCAL -j RETURN",
        f"-A {CHAIN_CAPTURE} -d 0.0.0.0/8 -j RETURN",
    ]
    for cidr, capture in spec.cidr_rules:
        lines.append(f"-A {CHAIN_CAPTURE} -d {cidr} -p tcp {target}" if capture else
                     f"-A {CHAIN_CAPTURE} -d {cidr} -j RETURN")
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def jump_rule(ifname: str) -> list[str]:
    return ["-i", ifname, "-j", CHAIN_CAPTURE]


def tcpmesh_objects_in_save(text: str) -> tuple[list[str], list[str]]:
    """From `iptables-save -t mangle` output: (our chains, rules elsewhere that jump to them) (pure).

    Rules are returned as they appear (``-A CHAIN ...``)."""
    chains = [line[1:].split()[0] for line in text.splitlines() if line.startswith(f":{CHAIN_PREFIX}")]
    jumps = [line for line in text.splitlines()
             if line.startswith("-A ") and not line.split()[1].startswith(CHAIN_PREFIX)
             and re.search(rf"-j {re.escape(CHAIN_PREFIX)}\S+", line)]
    return chains, jumps


# ---- backends -------------------------------------------------------------------------------------

class Backend:
    name = ""

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self.where = describe(netns)

    def _run(self, argv: Sequence[str], stdin: str | None = None) -> Completed:
        try:
            return run(argv, self.netns, stdin=stdin)
        except FileNotFoundError as exc:
            raise NetfilterError(f"{argv[0]} is not installed (not found in PATH); "
                                 "install the Debian packages iptables and nftables") from exc

    def _check(self, what: str, argv: Sequence[str], stdin: str | None = None) -> Completed:
        done = self._run(argv, stdin)
        if not done.ok:
            raise NetfilterError(f"{self.name}: {what} in {self.where} failed: {done.error()}")
        return done

    def install(self, spec: TproxySpec) -> None:
        raise NotImplementedError

    def add_interface(self, ifname: str) -> None:
        raise NotImplementedError

    def remove_interface(self, ifname: str) -> None:
        raise NotImplementedError

    def present(self) -> list[str]:
        raise NotImplementedError

    def remove(self) -> list[str]:
        raise NotImplementedError


class NftBackend(Backend):
    name = "nft"

    def install(self, spec: TproxySpec) -> None:
        self._check("installing table inet tcpmesh", ["nft", "-f", "-"], nft_ruleset(spec))

    def add_interface(self, ifname: str) -> None:
        self._check(f"adding {ifname} to set {NFT_SET}",
                    ["nft", "add", "element", NFT_FAMILY, NFT_TABLE, NFT_SET, f'{{ "{ifname}" }}'])

    def remove_interface(self, ifname: str) -> None:
        done = self._run(["nft", "delete", "element", NFT_FAMILY, NFT_TABLE, NFT_SET, f'{{ "{ifname}" }}'])
        if not done.ok and "No such file or directory" not in done.stderr:
            raise NetfilterError(f"nft: removing {ifname} from set {NFT_SET} in {self.where} failed: {done.error()}")

    def present(self) -> list[str]:
        try:
            done = self._run(["nft", "list", "table", NFT_FAMILY, NFT_TABLE])
        except NetfilterError:
            return []  # no nft binary: nothing of ours can be there through it
        return [f"nft table {NFT_FAMILY} {NFT_TABLE} in {self.where}"] if done.ok else []

    def remove(self) -> list[str]:
        found = self.present()
        if found:
            self._check(f"deleting table {NFT_FAMILY} {NFT_TABLE}", ["nft", "delete", "table", NFT_FAMILY, NFT_TABLE])
        return found


class IptablesBackend(Backend):
    """iptables-nft or iptables-legacy (``binary``), mangle table."""

    def __init__(self, binary: str, netns: str | None = None) -> None:
        super().__init__(netns)
        self.name = binary
        self.binary = binary

    def _ipt(self, *args: str) -> list[str]:
        return [self.binary, "-w", XTABLES_WAIT, "-t", IPTABLES_TABLE, *args]

    def _exists(self, chain: str, rule: Sequence[str]) -> bool:
        return self._run(self._ipt("-C", chain, *rule)).ok

    def install(self, spec: TproxySpec) -> None:
        created = self._run(self._ipt("-N", CHAIN_PREROUTING))
        if not created.ok and "already exists" not in created.stderr:
            raise NetfilterError(f"{self.name}: creating chain {CHAIN_PREROUTING} in {self.where} failed: "
                                 f"{created.error()}")
        self._check(f"defining chain {CHAIN_CAPTURE}", [f"{self.binary}-restore", "-w", XTABLES_WAIT, "--noflush"],
                    iptables_capture_chain(spec))
        hook = ["-p", "tcp", "-j", CHAIN_PREROUTING]
        if not self._exists("PREROUTING", hook):
            self._check(f"jumping to {CHAIN_PREROUTING} from PREROUTING", self._ipt("-I", "PREROUTING", "1", *hook))

    def add_interface(self, ifname: str) -> None:
        if not self._exists(CHAIN_PREROUTING, jump_rule(ifname)):
            self._check(f"capturing {ifname}", self._ipt("-A", CHAIN_PREROUTING, *jump_rule(ifname)))

    def remove_interface(self, ifname: str) -> None:
        while self._exists(CHAIN_PREROUTING, jump_rule(ifname)):
            self._check(f"releasing {ifname}", self._ipt("-D", CHAIN_PREROUTING, *jump_rule(ifname)))

    def _saved(self) -> str | None:
        try:
            done = self._run([f"{self.binary}-save", "-t", IPTABLES_TABLE])
        except NetfilterError:
            return None
        return done.stdout if done.ok else None

    def present(self) -> list[str]:
        text = self._saved()
        if text is None:
            return []
        chains, jumps = tcpmesh_objects_in_save(text)
        return ([f"{self.name} rule `{rule}` in {self.where}" for rule in jumps] +
                [f"{self.name} chain {IPTABLES_TABLE}/{chain} in {self.where}" for chain in chains])

    def remove(self) -> list[str]:
        text = self._saved()
        if text is None:
            return []
        chains, jumps = tcpmesh_objects_in_save(text)
        removed = []
        for rule in jumps:
            args = rule.split()
            self._check(f"deleting rule `{rule}`", self._ipt("-D", *args[1:]))
            removed.append(f"{self.name} rule `{rule}` in {self.where}")
        for chain in chains:
            self._check(f"flushing chain {chain}", self._ipt("-F", chain))
        for chain in chains:
            self._check(f"deleting chain {chain}", self._ipt("-X", chain))
            removed.append(f"{self.name} chain {IPTABLES_TABLE}/{chain} in {self.where}")
        return removed


def backend(name: str, netns: str | None = None) -> Backend:
    if name == "nft":
        return NftBackend(netns)
    if name in ("iptables-nft", "iptables-legacy"):
        return IptablesBackend(name, netns)
    raise ValueError(f"unknown netfilter backend {name!r}; known: {', '.join(BACKEND_ORDER)}")


def spec_for(listen_address: str, listen_port: int, mark: int, capture: Sequence[str],
             bypass: Sequence[str] = ()) -> TproxySpec:
    from agent.capture.transparent import lookup_address

    ipaddress.IPv4Address(listen_address)
    return TproxySpec(lookup_address(listen_address), int(listen_port), mark, cidr_rules(capture, bypass))
