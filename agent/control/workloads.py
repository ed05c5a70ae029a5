"""The workload controller: owns the registry snapshot the data path reads, and applies every change
to this node's capture and identities — from the registry file (polled) or the admin socket.

Changes are applied as a plan (agent.registry.overlay.plan_local): identities are issued first, so
the first captured connection finds its certificate; then the capture learns the mesh's
destinations (every workload address: only connects to them are captured); then removed workloads
are detached and new ones attached; then the new snapshot is swapped in with one assignment. A change that cannot be
applied as a whole from the admin socket is rolled back and reported; a broken registry file leaves
the previous snapshot in force and is logged and counted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterable

from agent.errors import ConfigError, TcpmeshError
from agent.filetrust import ownership_fingerprint
from agent.registry.model import Registry, Workload
from agent.registry.overlay import LocalPlan, merge, plan_local
from agent.registry.static_file import load_registry_file, parse_workload

log = logging.getLogger("tcpmesh.workloads")


class WorkloadController:
    def __init__(self, node_name: str, trust_domain: str, registry_file: str, dynamic_file: str,
                 capture: Any, identities: Any, on_change: Callable[[Registry], None] = lambda r: None,
                 own_addresses: Callable[[], Iterable[str]] = tuple) -> None:
        self.node_name = node_name
        # this node's local addresses, read at every change and when the kernel says one came or went
        # (refresh_node_addresses): kube-proxy answers nodePorts on each of them
        self.own_addresses = own_addresses
        self.node_addresses: frozenset[str] = frozenset()  # as last applied
        self.trust_domain = trust_domain
        self.registry_file = registry_file
        self.dynamic_file = Path(dynamic_file)
        self.capture = capture
        self.identities = identities
        self.on_change = on_change
        self.snapshot: Registry | None = None  # read by the data path; replaced, never mutated
        self.file_errors = 0
        self.last_error = ""  # why the latest version of the base registry was not applied; "" once one is
        self.attach_failures: dict[str, str] = {}  # workload key → why it is not captured
        self._file_registry: Registry | None = None
        self._file_digest = ""
        self._dynamic: dict[str, Workload] = {}
        self.base_source = "file"  # where the base registry comes from: file | kubernetes

    # -- sources --------------------------------------------------------------------------------
    def load(self) -> LocalPlan:
        """First load: the file (errors are fatal here) plus the persisted run-time workloads."""
        self._file_registry, self._file_digest = self._read_file()
        self._dynamic = self._load_dynamic()
        return self._apply(merge(self._file_registry, self._dynamic.values()), strict=False)

    def load_base(self, registry: Registry, source: str = "kubernetes") -> LocalPlan:
        """First load from a source other than the file (``source`` names it in `workload list`)."""
        self.base_source = source
        self._file_registry = registry
        self._dynamic = self._load_dynamic()
        return self._apply(merge(registry, self._dynamic.values()), strict=False)

    def replace_base(self, registry: Registry) -> LocalPlan | None:
        """Swap in a new base snapshot (Kubernetes): applied as a whole, or not at all (a snapshot that
        conflicts with a run-time workload keeps the previous one in force, logged and counted)."""
        try:
            merged = merge(registry, self._dynamic.values())
        except TcpmeshError as exc:
            self.file_errors += 1
            self.last_error = str(exc)
            log.error("%s snapshot not applied, previous workloads stay in force: %s", self.base_source, exc)
            return None
        self._file_registry = registry
        self.last_error = ""
        plan = self._apply(merged, strict=False)
        if not plan.empty:
            log.info("%s snapshot applied: %d attached, %d detached", self.base_source, len(plan.attach),
                     len(plan.detach))
        return plan

    def reload_file(self) -> LocalPlan | None:
        """Re-read the registry file if its content changed. A broken file keeps the old snapshot."""
        if not self.registry_file:
            return None  # the base registry comes from another source (replace_base)
        try:
            digest = _digest(self.registry_file)
            if digest == self._file_digest:
                return None
            registry, digest = self._read_file()
            merged = merge(registry, self._dynamic.values())
        except TcpmeshError as exc:
            self.file_errors += 1
            self.last_error = str(exc)
            log.error("registry file not applied, previous workloads stay in force: %s", exc)
            self._file_digest = _digest_or_empty(self.registry_file)  # report each broken version once
            return None
        self._file_registry, self._file_digest = registry, digest
        self.last_error = ""
        plan = self._apply(merged, strict=False)
        log.info("registry file reloaded: %d attached, %d detached", len(plan.attach), len(plan.detach))
        return plan

    def add(self, entry: dict) -> Workload:
        """Add (or replace) a run-time workload; rolled back whole if it cannot be captured."""
        assert self._file_registry is not None and self.snapshot is not None
        workload = parse_workload(entry, "workload", self.trust_domain, set(self._file_registry.nodes))
        dynamic = {**self._dynamic, workload.key: workload}
        self._apply(merge(self._file_registry, dynamic.values()), strict=True)
        self._dynamic = dynamic
        self._save_dynamic()
        return workload

    def remove(self, key: str) -> Workload:
        if key not in self._dynamic:
            known = ", ".join(sorted(self._dynamic)) or "none"
            where = " (it comes from the registry file: edit the file instead)" if self._in_file(key) else ""
            raise ConfigError("workload", key, f"is not a run-time workload{where}", f"run-time workloads: {known}")
        dynamic = {k: w for k, w in self._dynamic.items() if k != key}
        self._apply(merge(self._file_registry, dynamic.values()), strict=True)
        removed = self._dynamic[key]
        self._dynamic = dynamic
        self._save_dynamic()
        return removed

    def refresh_node_addresses(self) -> bool:
        """This node's addresses read again (the kernel said one came or went: agent.control.node_addresses); when
        they differ from those last applied, the snapshot is applied again with them — nodePort and hostPort
        frontends at every address, in every capture mode (and the packet-level modes' own view of the node's
        addresses). True when it was applied."""
        if self._file_registry is None or self.snapshot is None:
            return False  # not loaded yet: the first load reads them
        addresses = frozenset(self.own_addresses())
        if addresses == self.node_addresses:
            return False
        added, removed = sorted(addresses - self.node_addresses), sorted(self.node_addresses - addresses)
        self._apply(merge(self._file_registry, self._dynamic.values()), strict=False, addresses=addresses)
        log.info("this node's addresses changed (%s): nodePort and hostPort frontends applied at every one",
                 "; ".join(part for part in (_listed("added", added), _listed("removed", removed)) if part))
        return True

    def describe(self) -> list[dict]:
        snapshot = self.snapshot
        if snapshot is None:
            return []
        return [{"name": w.name, "namespace": w.namespace, "service_account": w.service_account, "ip": w.ip,
                 "ip6": w.ip6, "node": w.node, "cgroup": w.cgroup, "spiffe_id": w.spiffe_id.uri,
                 "source": "runtime" if w.key in self._dynamic else self.base_source,
                 "local": w.node == self.node_name,
                 "captured": w.node == self.node_name and w.key not in self.attach_failures,
                 "problem": self.attach_failures.get(w.key, "")}
                for w in snapshot.workloads]

    # -- applying -------------------------------------------------------------------------------
    def _apply(self, new: Registry, strict: bool, addresses: frozenset[str] | None = None) -> LocalPlan:
        old = self.snapshot
        addresses = frozenset(self.own_addresses()) if addresses is None else addresses
        new = new.with_node_addresses(self.node_name, sorted(addresses))  # nodePort frontends on every one
        plan = plan_local(old, new, self.node_name)
        if old is None or old.identities_on(self.node_name) != new.identities_on(self.node_name):
            self.identities.ensure(new.identities_on(self.node_name))
        self.capture.set_mesh_destinations(new.workloads, new.service_frontends(),  # before attaching: a pod's
                                           new.node_port_frontends())         # first connect knows the mesh
        for workload in plan.detach:
            self.capture.detach(workload)
            self.attach_failures.pop(workload.key, None)
        done: list[Workload] = []
        for workload in plan.attach:
            try:
                self.capture.attach(workload)
            except Exception as exc:  # noqa: BLE001 — kernel/cgroup errors of one workload, reported per workload
                if strict:
                    self._roll_back(done, plan.detach, old)
                    raise TcpmeshError(f"cannot capture {workload.key}: {exc}") from exc
                self.attach_failures[workload.key] = str(exc)
                log.error("workload %s is not captured: %s", workload.key, exc)
                continue
            self.attach_failures.pop(workload.key, None)
            done.append(workload)
        self.snapshot = new
        self.node_addresses = addresses
        self.on_change(new)
        return plan

    def _roll_back(self, attached: list[Workload], detached: tuple[Workload, ...], old: Registry | None) -> None:
        for workload in attached:
            self.capture.detach(workload)
        for workload in detached:
            self.capture.attach(workload)
        if old is not None:
            self.capture.set_mesh_destinations(old.workloads, old.service_frontends(), old.node_port_frontends())
            self.identities.ensure(old.identities_on(self.node_name))

    # -- files ----------------------------------------------------------------------------------
    def _read_file(self) -> tuple[Registry, str]:
        return load_registry_file(self.registry_file, self.trust_domain), _digest(self.registry_file)

    def _in_file(self, key: str) -> bool:
        return self._file_registry is not None and any(w.key == key for w in self._file_registry.workloads)

    def _load_dynamic(self) -> dict[str, Workload]:
        if not self.dynamic_file.exists():
            return {}
        assert self._file_registry is not None
        entries = json.loads(self.dynamic_file.read_text())
        workloads = [parse_workload(e, f"{self.dynamic_file}[{i}]", self.trust_domain, set(self._file_registry.nodes))
                     for i, e in enumerate(entries)]
        return {w.key: w for w in workloads}

    def _save_dynamic(self) -> None:
        entries = [{"name": w.name, "namespace": w.namespace, "service_account": w.service_account, "ip": w.ip,
                    "node": w.node, **({"cgroup": w.cgroup} if w.cgroup else {}), **({"ip6": w.ip6} if w.ip6 else {})} for w in self._dynamic.values()]
        tmp = self.dynamic_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(entries, indent=1))
        os.replace(tmp, self.dynamic_file)


def _listed(what: str, addresses: list[str], most: int = 8) -> str:
    """``added a, b`` — at most ``most`` named (kube-ipvs0 may take hundreds at once), then how many more."""
    if not addresses:
        return ""
    more = f" and {len(addresses) - most} more" if len(addresses) > most else ""
    return f"{what} {', '.join(addresses[:most])}{more}"


def _digest(path: str) -> str:
    """The file's content and who may change it (a chmod that fixes a refused file reloads it)."""
    try:
        return hashlib.sha256(Path(path).read_bytes() + ownership_fingerprint([Path(path)])).hexdigest()
    except OSError as exc:
        raise ConfigError("registry.file", path, f"cannot read the registry file: {exc.strerror}") from exc


def _digest_or_empty(path: str) -> str:
    try:
        return _digest(path)
    except ConfigError:
        return ""
