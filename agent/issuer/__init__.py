"""The issuer (``tcpmesh issuer run``): signs workload SVIDs for the identities a node hosts, and node credentials.

A stateless mTLS service holding the issuing intermediate (``tcpmesh ca issue-issuer``); replicas share
nothing but that directory, the bootstrap token key, the spent-token ledger and the registry.
Modules: ``protocol`` (wire format, pure), ``placement`` (who may have which identity, pure),
``ratelimit`` (per-node token buckets, pure), ``tokens`` (one-time bootstrap tokens, stdlib),
``signing`` (the CA key and certificate profiles; imports cryptography), ``service`` (one request →
one answer: the checks in order, refusals logged and counted), ``server`` (the TLS listener),
``client`` (stdlib ssl; what the agent uses), ``kubernetes_attestation`` (a node proven by its
agent pod's projected service-account token: TokenReview, the bound pod), ``config``, ``metrics``,
``cli``. docs/identity.md "The issuer".
"""
