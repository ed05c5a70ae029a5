"""Telemetry: Prometheus metrics (defined once, against an injected registry), recent-flow records,
and the admin HTTP endpoint, which runs off the data-path event loop."""
