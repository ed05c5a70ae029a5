"""Authorization by placement: may node N have an SVID for identity I? Pure.

Yes only if the registry places a workload of I on N (static file: a workload with ``node: N``;
Kubernetes: a scheduled, not finished pod of that service account and namespace with ``nodeName`` N —
``registry.kubernetes.mapping`` builds the same ``Registry``). Istio's node authorizer and SPIRE's
node-scoped entries make the same decision. An identity that left the node is refused at its next
renewal. Imports only the registry model and SPIFFE names.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.identity.spiffe import SpiffeId, SpiffeIdError
from agent.registry.model import Registry


@dataclass(frozen=True)
class Refusal:
    reason: str   # one of protocol.REASONS
    message: str


def authorize(registry: Registry | None, node: str, uri: str) -> tuple[SpiffeId | None, Refusal | None]:
    """(the identity, None) if ``node`` may have an SVID for ``uri``; (maybe the identity, why not) otherwise."""
    if registry is None:
        return None, Refusal("no_registry", "the issuer has not loaded its registry yet; the agent retries")
    try:
        spiffe_id = SpiffeId.parse(uri)
    except SpiffeIdError as exc:
        return None, Refusal("not_a_workload_identity", f"{uri!r} is not a workload identity: {exc}")
    if spiffe_id.trust_domain != registry.trust_domain:
        return spiffe_id, Refusal("wrong_trust_domain", f"{uri} is outside trust domain {registry.trust_domain!r}")
    if node not in registry.nodes:
        return spiffe_id, Refusal("unknown_node", f"node {node!r} is not in the issuer's registry; add it (static "
                                  "file: nodes[]) or check node.name of the agent")
    if spiffe_id not in registry.identities_on(node):
        return spiffe_id, Refusal("not_on_node", f"the registry places no workload of {uri} on node {node!r}; "
                                  "an SVID is issued only to the node that runs the workload")
    return spiffe_id, None
