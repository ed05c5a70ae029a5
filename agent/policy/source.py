"""The policy directory as a hot-reloaded, immutable snapshot, and the decisions the proxies ask for.

``reload()`` re-reads the directory when any file's content changed; a load error keeps the previous
policy set in force (nothing half-applied), is logged with file, line and field, and counted.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from agent.policy.engine import Decision, Request, decide, mtls_mode
from agent.policy.loader import POLICY_SUFFIXES, PolicyError, load_paths
from agent.policy.model import MtlsMode, PolicySet

log = logging.getLogger("tcpmesh.policy")


class PolicySource:
    def __init__(self, directory: str, default_allow: bool = True, root_namespace: str = "tcpmesh-system") -> None:
        self.directory = Path(directory)
        self.default_allow = default_allow
        self.root_namespace = root_namespace
        self.policies = PolicySet()  # replaced as a whole, never mutated
        self.load_errors = 0
        self.last_error = ""
        self._digest: str | None = None

    def reload(self) -> bool:
        """Load the directory if it changed; True when a new set came into force."""
        digest = self._dir_digest()
        if digest == self._digest:
            return False
        self._digest = digest
        try:
            policies = load_paths([self.directory]) if self.directory.is_dir() else PolicySet()
        except PolicyError as exc:
            self.load_errors += 1
            self.last_error = str(exc)
            log.error("policy change refused, the previous %d policies stay in force: %s",
                      len(self.policies.authorization) + len(self.policies.peer_authentication), exc)
            return False
        self.policies = policies
        self.last_error = ""
        log.info("policies in force: %d AuthorizationPolicy, %d PeerAuthentication from %s",
                 len(policies.authorization), len(policies.peer_authentication), self.directory)
        return True

    def decide(self, request: Request) -> Decision:
        return decide(self.policies, request, default_allow=self.default_allow, root_namespace=self.root_namespace)

    def mtls_mode(self, namespace: str, workload: str) -> MtlsMode:
        return mtls_mode(self.policies, namespace, workload, root_namespace=self.root_namespace)

    def _dir_digest(self) -> str:
        digest = hashlib.sha256()
        if self.directory.is_dir():
            for path in sorted(p for p in self.directory.iterdir() if p.suffix in POLICY_SUFFIXES):
                try:
                    digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
                except OSError:
                    digest.update(path.name.encode() + b"\0<unreadable>\0")
        return digest.hexdigest()
