"""tcpmesh: a node-level mTLS mesh for raw TCP workloads.

The package is split by concern (see docs/architecture.md):
``registry`` (who runs where), ``identity`` (SPIFFE IDs, CA, SVIDs, TLS contexts),
``capture`` (BPF programs and their loader), ``proxy`` (tunnel protocol and relays),
``telemetry`` (metrics, admin endpoint), ``lab`` (namespace-based test clusters).
``app`` is the single composition root; ``cli`` is the click front end.
Nothing here has import-time side effects.
"""

__version__ = "0.1.0"
