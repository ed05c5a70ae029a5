"""Root CA rotation with overlap: the three steps, their preconditions, and how to tell that every
agent has applied one.

    1. add-root    a new root is created (same trust domain) and appended to every node's bundle.pem;
                   agents reload and trust old and new. Certificates still chain to the old root.
    2. reissue     every node gets a new intermediate from the new root; agents reload and re-issue
                   their SVIDs. Both chains verify everywhere, because every bundle holds both roots.
    3. remove-old  every bundle.pem becomes the new root alone; agents reload. Nothing chains to the
                   old root any more, so nothing breaks. The old root can be retired.

The directories a rotation walks are of three kinds, told apart by their files (``dir_kind``):
a node CA directory (``node.crt``: identity.mode node_ca), the issuer's directory (``issuer.crt``, every
replica's), and an issuer-mode node's credential directory (``bundle.pem``, ``credential.crt``). In issuer
mode no node holds an intermediate, so ``reissue`` re-issues the issuer's, waits (``wait_issuers``) until
the issuer signs under it, and then puts the new root *first* in every credential directory's bundle:
that change makes each agent renew its node credential and re-issue its SVIDs at the issuer, which now
chain to the new root. A credential directory has "done" ``reissue`` when its bundle lists the new root
first. Clusters in the middle of a migration hold both kinds of node; each gets its own treatment.

A step must have reached *every agent* before the next begins — a node that drops the old root while
a peer still presents an old chain, or presents a new chain before its peers trust the new root,
breaks traffic between them. Each step therefore checks the files of every node directory first
(refusing to run out of order), and ``wait_for_agents`` polls each agent's ``/debug/certs`` until it
reports the step applied. Open connections are never touched: each keeps the certificates it was
established with. File operations use ``node_ca``; ``converged`` and ``plan_text`` are pure.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from cryptography import x509

from agent.errors import TcpmeshError
from agent.identity.bundle import TrustBundle, fingerprint, make_bundle, parse_bundle, short_fingerprint, to_pem
from agent.identity.ca import CA_CERT_FILE, init_ca, load_ca
from agent.identity.errors import CaError
from agent.identity.files import (CREDENTIAL_CERT_FILE, ISSUER_CA_FILES, ISSUER_REMOVED_ROOTS_FILE, MAX_REMOVED_ROOTS,
                                  write_file_atomic)
from agent.identity.node_ca import (BUNDLE_FILE, DEFAULT_NODE_CA_VALID_DAYS, NODE_CERT_FILE, issue_node_ca,
                                    node_name_of, write_bundle, write_node_dir)
from agent.identity.spiffe import SpiffeIdError, parse_node_id

KIND_NODE_CA = "node CA"              # node.crt, node.key, bundle.pem (identity.mode node_ca)
KIND_ISSUER = "issuer"                # issuer.crt, issuer.key, bundle.pem (`tcpmesh ca issue-issuer`)
KIND_CREDENTIAL = "node credential"   # bundle.pem (+ credential.crt once joined): identity.mode issuer

ADD_ROOT, REISSUE, REMOVE_OLD = "add-root", "reissue", "remove-old"
STEPS = (ADD_ROOT, REISSUE, REMOVE_OLD)


def plan_text(new_ca: str = "NEW_CA_DIR", node_dirs: str = "--node-dir DIR ...") -> str:
    return (
        "Root rotation with overlap (every step keeps traffic flowing):\n"
        f"  1. tcpmesh ca rotate add-root   --new-ca {new_ca} {node_dirs}\n"
        "       creates the new root (same trust domain) and adds it to every node's bundle.pem\n"
        f"  2. tcpmesh ca rotate reissue    --new-ca {new_ca} {node_dirs}\n"
        "       issues every node a new intermediate from the new root; SVIDs are re-issued under it\n"
        f"  3. tcpmesh ca rotate remove-old --new-ca {new_ca} {node_dirs}\n"
        "       leaves only the new root in every bundle.pem; retire the old root afterwards\n"
        "Before each next step, every agent must have applied the previous one: pass --wait-admin URL\n"
        "for each agent (its admin endpoint) and the command waits for it, or check `tcpmesh cert inspect`\n"
        "on each node (agents look at their node CA directory every identity.poll_seconds).\n"
        f"`tcpmesh ca rotate status --new-ca {new_ca} {node_dirs}` shows where each node stands."
    )


@dataclass(frozen=True)
class NodeDirState:
    """One node CA directory as the rotation sees it."""

    directory: Path
    node: str | None
    bundle: tuple[str, ...]  # root fingerprints, in file order
    issuer: str | None  # fingerprint of the bundle root that signed node.crt / issuer.crt (None: none of them);
    #                     for a credential directory: the root its bundle lists first (the one it renews under)
    kind: str = KIND_NODE_CA

    @property
    def label(self) -> str:
        return self.node or str(self.directory)

    def describe(self, new: str | None) -> str:
        roots = ", ".join(short_fingerprint(fp) + (" (new)" if fp == new else "") for fp in self.bundle)
        issuer = short_fingerprint(self.issuer) + (" (new)" if self.issuer == new else "") if self.issuer else "?"
        what = "prefers root" if self.kind == KIND_CREDENTIAL else "intermediate from root"
        return f"{self.node or '?'} ({self.kind}) {self.directory}: bundle [{roots}], {what} {issuer}"


def dir_kind(directory: str | Path) -> str:
    """Which kind of directory ``directory`` is (see the module docstring); CaError if none."""
    directory = Path(directory)
    if (directory / NODE_CERT_FILE).exists():
        return KIND_NODE_CA
    if (directory / ISSUER_CA_FILES[0]).exists():
        return KIND_ISSUER
    if (directory / BUNDLE_FILE).exists():
        return KIND_CREDENTIAL
    raise CaError(f"{directory} is neither a node CA directory (node.crt), the issuer's directory (issuer.crt) nor a "
                  "node's credential directory (bundle.pem): pass each node's identity.node_ca_dir or "
                  "identity.issuer.credential_dir, and the issuer's ca_dir")


def read_node_dir(directory: str | Path) -> tuple[NodeDirState, TrustBundle, x509.Certificate | None]:
    """The state of one directory of any kind, its bundle and its CA certificate (None for a credential dir)."""
    directory = Path(directory)
    kind = dir_kind(directory)
    bundle_path = directory / BUNDLE_FILE
    cert_path = directory / {KIND_NODE_CA: NODE_CERT_FILE, KIND_ISSUER: ISSUER_CA_FILES[0],
                             KIND_CREDENTIAL: CREDENTIAL_CERT_FILE}[kind]
    try:
        bundle = parse_bundle(bundle_path.read_bytes(), str(bundle_path))
        certificate = x509.load_pem_x509_certificate(cert_path.read_bytes()) if cert_path.exists() else None
    except FileNotFoundError as exc:
        raise CaError(f"{exc.filename} does not exist: is {directory} a node CA directory "
                      "(from `tcpmesh ca issue-node`)?") from None
    except ValueError as exc:
        raise CaError(f"{cert_path} is not a PEM certificate ({exc})") from None
    if kind == KIND_CREDENTIAL:
        return NodeDirState(directory, _credential_node(certificate), bundle.fingerprints, bundle.fingerprints[0],
                            kind), bundle, None
    if certificate is None:
        raise CaError(f"{cert_path} does not exist")
    issuer = bundle.issuer_of(certificate)
    node = node_name_of(certificate) if kind == KIND_NODE_CA else "issuer"
    state = NodeDirState(directory, node, bundle.fingerprints, fingerprint(issuer) if issuer is not None else None, kind)
    return state, bundle, certificate


def _credential_node(certificate: x509.Certificate | None) -> str | None:
    if certificate is None:
        return None
    try:
        uris = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value \
            .get_values_for_type(x509.UniformResourceIdentifier)
        return parse_node_id(uris[0])[1]
    except (x509.ExtensionNotFound, IndexError, SpiffeIdError):
        return None


def step_done(step: str, state: NodeDirState, new: str) -> bool:
    """Whether ``state``'s files already reflect ``step`` (pure)."""
    if step == ADD_ROOT:
        return new in state.bundle
    if step == REISSUE:
        return state.issuer == new
    return state.bundle == (new,)


def add_root(new_ca_dir: str | Path, node_dirs: Sequence[str | Path], *,
             valid_days: int | None = None) -> list[str]:
    """Step 1. Creates the new root in ``new_ca_dir`` if it holds none (trust domain of the bundles)."""
    states = [read_node_dir(d) for d in _require(node_dirs)]
    domains = {bundle.trust_domain for _, bundle, _ in states}
    if len(domains) != 1:
        raise CaError(f"the node directories trust different trust domains ({', '.join(sorted(domains))}); "
                      "rotate one trust domain at a time")
    trust_domain = domains.pop()
    new_dir = Path(new_ca_dir)
    lines = []
    if not (new_dir / CA_CERT_FILE).exists():
        kwargs = {"valid_days": valid_days} if valid_days else {}
        init_ca(trust_domain, new_dir, **kwargs)
        lines.append(f"created the new root CA for {trust_domain} in {new_dir} (keep it offline, like the old one)")
    new_root = _new_root(new_dir, trust_domain)
    for state, bundle, _ in states:
        if new_root in bundle:
            lines.append(f"{state.label}: bundle already holds the new root")
            continue
        write_bundle(state.directory, bundle.with_root(new_root))
        lines.append(f"{state.label}: added the new root to {state.directory / BUNDLE_FILE} "
                     f"({len(bundle.roots) + 1} roots)")
    return lines


def reissue(new_ca_dir: str | Path, node_dirs: Sequence[str | Path], *,
            valid_days: int = DEFAULT_NODE_CA_VALID_DAYS,
            wait_issuers: Callable[[str], list[str]] | None = None) -> list[str]:
    """Step 2. Refused until every bundle holds the new root. Order: the issuer's directories, then
    ``wait_issuers(new fingerprint)`` (until the issuer signs under the new intermediate), then node CA
    directories and credential directories (new root first: their agents re-issue at the issuer)."""
    root = load_ca(new_ca_dir)
    new = fingerprint(root.certificate)
    states = [read_node_dir(d) for d in _require(node_dirs)]
    missing = [s.label for s, _, _ in states if not step_done(ADD_ROOT, s, new)]
    if missing:
        raise CaError(f"the bundles of {', '.join(missing)} do not hold the new root yet: their agents would reject "
                      f"the new certificates. Run `tcpmesh ca rotate add-root` for them first")
    lines = []
    issuers = [entry for entry in states if entry[0].kind == KIND_ISSUER]
    for state, bundle, _ in issuers:
        if step_done(REISSUE, state, new):
            lines.append(f"issuer {state.directory}: issuing intermediate already from the new root")
            continue
        _write_issuer_dir(state.directory, root, _new_first(bundle, root.certificate), valid_days)
        lines.append(f"issuer {state.directory}: new issuing intermediate from the new root")
    if issuers and any(s.kind == KIND_CREDENTIAL for s, _, _ in states):
        if wait_issuers is None:
            lines.append("note: the issuer reloads its directory within registry.poll_seconds; agents that ask before "
                         "then get SVIDs from the old intermediate (pass --wait-issuer to wait for it)")
        else:
            lines += wait_issuers(new)
    for state, bundle, certificate in states:
        if state.kind == KIND_ISSUER:
            continue
        if state.kind == KIND_CREDENTIAL:
            if step_done(REISSUE, state, new):
                lines.append(f"{state.label}: bundle already lists the new root first")
                continue
            write_bundle(state.directory, _new_first(bundle, root.certificate))
            lines.append(f"{state.label}: the new root first in {state.directory / BUNDLE_FILE}; its agent renews its "
                         "node credential and SVIDs at the issuer")
            continue
        if state.node is None:
            raise CaError(f"{state.directory / NODE_CERT_FILE} does not name its node (not issued by tcpmesh?); "
                          "re-issue it with `tcpmesh ca issue-node NODE --ca <new root> --out "
                          f"{state.directory} --force`")
        if step_done(REISSUE, state, new):
            lines.append(f"{state.node}: intermediate already from the new root")
            continue
        write_node_dir(state.directory, issue_node_ca(root, state.node, valid_days=valid_days), bundle)
        lines.append(f"{state.node}: new intermediate from the new root in {state.directory}")
    return lines


def _new_first(bundle: TrustBundle, new_root: x509.Certificate) -> TrustBundle:
    return make_bundle([new_root, *(r for r in bundle.roots if fingerprint(r) != fingerprint(new_root))],
                       where="the bundle with the new root first")


def _write_issuer_dir(directory: Path, root: Any, bundle: TrustBundle, valid_days: int) -> None:
    """A new issuing intermediate from ``root`` into the issuer's directory (the old one kept as
    ``issuer-previous.crt``), and ``bundle`` (both roots, the new one first: what the issuer hands to nodes)."""
    from agent.identity.issuer_ca import ISSUER_CA_LABEL, write_issuer_dir

    write_issuer_dir(directory, issue_node_ca(root, "issuer", valid_days=valid_days, label=ISSUER_CA_LABEL), bundle)


def remove_old(new_ca_dir: str | Path, node_dirs: Sequence[str | Path]) -> list[str]:
    """Step 3. Refused until every intermediate comes from the new root."""
    root = load_ca(new_ca_dir)
    new = fingerprint(root.certificate)
    states = [read_node_dir(d) for d in _require(node_dirs)]
    behind = [s.label for s, _, _ in states if not step_done(REISSUE, s, new)]
    if behind:
        raise CaError(f"the intermediates of {', '.join(behind)} do not come from the new root yet: removing the old "
                      "root would cut them off. Run `tcpmesh ca rotate reissue` for them first")
    lines = []
    only_new = make_bundle([root.certificate], where=str(Path(new_ca_dir) / CA_CERT_FILE))
    for state, bundle, _ in states:
        if state.bundle == only_new.fingerprints:
            lines.append(f"{state.label}: bundle already holds the new root only")
            continue
        if state.kind == KIND_ISSUER:   # first: a replica that sees the new bundle knows what left it
            _remember_removed_roots(state.directory, [r for r in bundle.roots if fingerprint(r) != new])
            lines.append(f"issuer {state.directory}: {ISSUER_REMOVED_ROOTS_FILE} lists the removed root(s), so a node "
                         "still under one is refused by name (removed_root) and told to join again")
        write_bundle(state.directory, only_new)
        lines.append(f"{state.label}: bundle.pem now holds the new root only (removed "
                     f"{len(bundle.roots) - (1 if root.certificate in bundle else 0)} root(s))")
    lines.append(f"rotation complete: {Path(new_ca_dir)} is the root CA now; keep it offline and retire the old one")
    return lines


def _remember_removed_roots(directory: Path, removed: Sequence[x509.Certificate]) -> None:
    """Add ``removed`` to the issuer directory's ``removed-roots.pem`` (newest last, at most ``MAX_REMOVED_ROOTS``):
    every replica, also one started later, then refuses a node still under one by name (``removed_root``)."""
    path = directory / ISSUER_REMOVED_ROOTS_FILE
    known = x509.load_pem_x509_certificates(path.read_bytes()) if path.exists() else []
    keep = {fingerprint(r): r for r in (*known, *removed)}
    pem = "".join(to_pem(r) for r in list(keep.values())[-MAX_REMOVED_ROOTS:])
    write_file_atomic(path, pem.encode("ascii"), 0o644)


def status(new_ca_dir: str | Path | None, node_dirs: Sequence[str | Path]) -> tuple[str | None, list[NodeDirState]]:
    new = None
    if new_ca_dir is not None and (Path(new_ca_dir) / CA_CERT_FILE).exists():
        new = fingerprint(x509.load_pem_x509_certificate((Path(new_ca_dir) / CA_CERT_FILE).read_bytes()))
    return new, [read_node_dir(d)[0] for d in _require(node_dirs)]


# -- agents -------------------------------------------------------------------------------------

def converged(step: str, report: Mapping[str, Any], new: str) -> str | None:
    """None if the agent whose ``/debug/certs`` is ``report`` has applied ``step``; else what it still shows."""
    bundle = [root["fingerprint"] for root in report.get("trust_bundle", [])]
    if step == ADD_ROOT:
        return None if new in bundle else f"its bundle is [{', '.join(map(short_fingerprint, bundle))}]"
    if step == REISSUE:
        node_root = (report.get("node_ca", {}).get("root") or {}).get("fingerprint")
        if node_root != new:
            return f"its node CA chains to {short_fingerprint(node_root) if node_root else 'no root'}"
        stale = [i["spiffe_id"] for i in report.get("identities", []) if (i.get("root") or {}).get("fingerprint") != new]
        return f"SVIDs of {', '.join(stale)} still chain to the old root" if stale else None
    return None if bundle == [new] else f"its bundle is [{', '.join(map(short_fingerprint, bundle))}]"


def wait_for_agents(step: str, new: str, urls: Iterable[str], fetch: Callable[[str], Mapping[str, Any]], *,
                    timeout: float, interval: float = 0.25, sleep: Callable[[float], None] = time.sleep,
                    monotonic: Callable[[], float] = time.monotonic) -> None:
    """Poll every agent until it reports ``step`` applied; CaError naming the laggards after ``timeout``."""
    pending = {url: "no answer yet" for url in urls}
    deadline = monotonic() + timeout
    while pending:
        for url in list(pending):
            try:
                why = converged(step, fetch(url), new)
            except (OSError, ValueError, KeyError, TcpmeshError) as exc:
                why = f"cannot read its /debug/certs: {exc}"
            if why is None:
                del pending[url]
            else:
                pending[url] = why
        if not pending:
            return
        if monotonic() >= deadline:
            raise CaError(f"after {timeout:.0f}s these agents have not applied {step}: "
                          + "; ".join(f"{url}: {why}" for url, why in pending.items())
                          + ". Check their logs (a node CA that does not load is reported there) before going on")
        sleep(interval)


def _new_root(new_dir: Path, trust_domain: str) -> x509.Certificate:
    root = load_ca(new_dir)
    if root.trust_domain != trust_domain:
        raise CaError(f"the root in {new_dir} is for trust domain {root.trust_domain!r}, the nodes trust "
                      f"{trust_domain!r}; a rotation keeps the trust domain")
    return root.certificate


def _require(node_dirs: Sequence[str | Path]) -> Sequence[str | Path]:
    if not node_dirs:
        raise CaError("name every node's CA directory with --node-dir (repeat it); a rotation step must reach all nodes")
    kinds = {dir_kind(d) for d in node_dirs}
    if KIND_CREDENTIAL in kinds and KIND_ISSUER not in kinds:
        raise CaError("issuer-mode nodes (credential directories) are rotated together with the issuer: pass the "
                      "issuer's directory (its ca_dir, every replica's if they do not share it) with --node-dir too — "
                      "agents copy the issuer's bundle at each credential renewal, so it must change in step")
    return node_dirs


def issuer_dirs(node_dirs: Sequence[str | Path]) -> list[Path]:
    return [Path(d) for d in node_dirs if dir_kind(d) == KIND_ISSUER]
