"""L4 authorization by identity (Istio-like AuthorizationPolicy) and per-workload inbound mTLS mode
(PeerAuthentication-like): the model, the YAML loader, the pure decision engine, and the directory
source that hot-reloads policies."""
