"""The policy directory as a hot-reloaded, immutable snapshot, and the decisions the proxies ask for.

``reload()`` re-reads the directory when any file's content changed; a load error keeps the previous
policy set in force (nothing half-applied), is logged with file, line and field, and counted.

Until a set has loaded once (``in_force``), there is nothing to keep: a directory that is missing,
unreadable or holds one invalid file at start never means "no policies". Then ``decide`` denies
every connection and ``mtls_mode`` answers STRICT for every workload (never weaker than any set the
files could intend), and the agent stays not ready (docs/policy.md "At start").

A refused change is kept as ``refused`` (``RefusedChange``) until a later change loads: the error
(``file:line: field: problem``), when, and each file the change touched — with, for every file that
is valid on its own, the fact that its edit is held back too (the set is applied whole or not at
all). `tcpmesh status`, `lab status`, the admin endpoint and the metric
``tcpmesh_policy_change_refused`` show it. A directory or policy file that someone other than root (or the
agent's user) could change is refused the same way (``agent.filetrust``, as the issuer does for its files).
Imports the pure policy modules and ``agent.filetrust`` only.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from agent.filetrust import UntrustedFileError, check_trusted_file, ownership_fingerprint
from agent.policy.engine import Decision, Request, decide, mtls_mode
from agent.policy.loader import POLICY_SUFFIXES, PolicyError, load_file, load_paths
from agent.policy.model import MtlsMode, PolicySet

log = logging.getLogger("tcpmesh.policy")
MISSING_DIR_FIX = ("does not exist: create it (an empty directory means no policies, and "
                   "policy.default_action decides)")


@dataclass(frozen=True)
class FileChange:
    """One file of a refused change, compared with the set in force."""

    file: str
    change: str  # added | changed | removed
    error: str = ""  # this file's own first error; "" when the file is valid on its own (its edit is held back)


@dataclass(frozen=True)
class RefusedChange:
    error: str  # file:line: field: problem
    file: str
    line: int
    field: str
    problem: str
    at: float  # wall clock, seconds
    files: tuple[FileChange, ...] = field(default=())

    @property
    def held_back(self) -> tuple[str, ...]:
        """The valid edits of this change that are not in force because another file is broken."""
        return tuple(f.file for f in self.files if not f.error)

    def to_json(self) -> dict:
        return {"error": self.error, "file": self.file, "line": self.line, "field": self.field,
                "problem": self.problem, "at": self.at, "held_back": list(self.held_back),
                "files": [{"file": f.file, "change": f.change, "error": f.error} for f in self.files]}


class PolicySource:
    def __init__(self, directory: str, default_allow: bool = True, root_namespace: str = "tcpmesh-system",
                 clock: Callable[[], float] = time.time) -> None:
        self.directory = Path(directory)
        self.default_allow = default_allow
        self.root_namespace = root_namespace
        self.policies = PolicySet()  # replaced as a whole, never mutated
        self.in_force = False  # a set has loaded since start; until then every decision fails closed
        self.loaded_at: float | None = None  # when the set in force loaded (wall clock)
        self.load_errors = 0
        self.last_error = ""
        self.refused: RefusedChange | None = None  # the change not in force now, if any
        self._clock = clock
        self._digest: str | None = None
        self._in_force_files: dict[str, str] = {}  # file name → sha256 of the set in force

    def reload(self) -> bool:
        """Load the directory if it changed; True when a new set came into force."""
        digest = self._dir_digest()
        if digest == self._digest:
            return False
        self._digest = digest
        try:
            policies = self.load()
        except PolicyError as exc:
            self.load_errors += 1
            self.last_error = str(exc)
            self.refused = RefusedChange(str(exc), exc.file, exc.line, exc.field, exc.problem, self._clock(),
                                         self._changed_files())
            if self.in_force:
                log.error("policy change refused, the previous %d policies stay in force: %s",
                          len(self.policies.authorization) + len(self.policies.peer_authentication), exc)
            else:
                log.error("no policy set is in force: %s; until it loads every connection is refused and every "
                          "workload is STRICT (check with `tcpmesh policy check %s`)", exc, self.directory)
            return False
        self.policies = policies
        self.in_force = True
        self.loaded_at = self._clock()
        self.last_error = ""
        self.refused = None
        self._in_force_files = self._file_digests()
        log.info("policies in force: %d AuthorizationPolicy, %d PeerAuthentication from %s",
                 len(policies.authorization), len(policies.peer_authentication), self.directory)
        return True

    def load(self) -> PolicySet:
        """The directory's policy set; PolicyError when it is missing, unreadable or holds an invalid file."""
        if not self.directory.exists():
            raise PolicyError(str(self.directory), 0, "policy.dir", MISSING_DIR_FIX)
        if not self.directory.is_dir():
            raise PolicyError(str(self.directory), 0, "policy.dir", "is not a directory: point policy.dir at one")
        self._check_who_may_change()
        return load_paths([self.directory])

    def _check_who_may_change(self) -> None:
        """PolicyError unless only root (or the agent's user) can change the directory and each policy file in it,
        and every directory above them (``agent.filetrust``): whoever can write one decides who may connect."""
        try:
            files = sorted(p for p in self.directory.iterdir() if p.suffix in POLICY_SUFFIXES)
        except OSError:
            files = []  # load_paths names the unreadable directory
        for path in (self.directory, *files):
            try:
                check_trusted_file(path, "policy.dir", decides="who may connect", process="the agent")
            except UntrustedFileError as exc:
                raise PolicyError(str(path), 0, "policy.dir", exc.problem) from exc

    def decide(self, request: Request) -> Decision:
        if not self.in_force:
            return Decision(False, f"no policy set is in force ({self.last_error})")
        return decide(self.policies, request, default_allow=self.default_allow, root_namespace=self.root_namespace)

    def mtls_mode(self, namespace: str, workload: str) -> MtlsMode:
        if not self.in_force:
            return MtlsMode.STRICT
        return mtls_mode(self.policies, namespace, workload, root_namespace=self.root_namespace)

    def _changed_files(self) -> tuple[FileChange, ...]:
        """The directory's files that differ from the set in force, each with its own first error."""
        now = self._file_digests()
        changes = []
        for name in sorted(set(now) | set(self._in_force_files)):
            if now.get(name) == self._in_force_files.get(name):
                continue
            path = self.directory / name
            if name not in now:
                changes.append(FileChange(str(path), "removed"))
                continue
            try:
                load_file(path)
                error = ""
            except PolicyError as exc:
                error = str(exc)
            changes.append(FileChange(str(path), "changed" if name in self._in_force_files else "added", error))
        return tuple(changes)

    def _file_digests(self) -> dict[str, str]:
        try:
            paths = sorted(p for p in self.directory.iterdir() if p.suffix in POLICY_SUFFIXES)
        except OSError:
            return {}
        digests = {}
        for path in paths:
            try:
                digests[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
            except OSError:
                digests[path.name] = "<unreadable>"
        return digests

    def _dir_digest(self) -> str:
        digest = hashlib.sha256()
        try:
            names = sorted(p for p in self.directory.iterdir() if p.suffix in POLICY_SUFFIXES)
        except OSError as exc:  # missing, not a directory, unreadable: a state of its own
            return f"<{type(exc).__name__} {exc.errno}>"
        for path in names:
            try:
                digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
            except OSError:
                digest.update(path.name.encode() + b"\0<unreadable>\0")
        digest.update(ownership_fingerprint([self.directory, *names]))  # a chmod that fixes a refusal reloads
        return digest.hexdigest()
