"""The authorization question both ways into a workload ask: may this proven identity reach it?

One function, used by the inbound proxy for each stream of a tunnel (the identity the tunnel's client
certificate proved) and by the same-node path (agent.proxy.local: the identity the capture and the
registry give the client pod, the one the outbound proxy would present in a tunnel), so the two can
never decide differently. Pure apart from the policy source it is handed; imports no proxy module.
"""

from __future__ import annotations

import logging

from agent.connection import flow as F
from agent.identity.spiffe import SpiffeId
from agent.policy.engine import Request
from agent.policy.source import PolicySource
from agent.registry.model import Workload

log = logging.getLogger("tcpmesh.policy")


def authorized(policy: PolicySource | None, flow: F.Flow, workload: Workload, peer_id: SpiffeId) -> bool:
    """Ask ``policy`` whether ``peer_id`` (the flow's source principal) may reach ``workload`` on the
    flow's destination port; record the deciding policy (and any dry-run verdict) on the flow, and the
    reason on a refusal. ``policy`` None: every mesh connection is allowed."""
    if policy is None:
        return True
    principal = flow.source_principal if flow.source_principal != F.UNKNOWN else None
    namespace = (peer_id.namespace if principal == peer_id.uri else SpiffeId.parse(principal).namespace) \
        if principal else None
    decision = policy.decide(Request(principal, namespace, workload.name, workload.namespace, flow.destination_port))
    flow.policy = decision.policy or ""
    flow.dry_run = decision.dry_run or ""
    if decision.dry_run:
        log.info("flow %s dry-run: would %s", flow.flow_id, decision.dry_run)
    if not decision.allowed:
        flow.detail = decision.reason
    return decision.allowed
