"""The agent's configuration: typed, frozen, loaded once (file, environment, host defaults), validated in one place.

Every default is a named constant; every error names the field, the value and the fix. The concern in five
parts, imports pointing down (model at the bottom, load at the top):

- ``model``: the defaults and the frozen dataclasses (data only);
- ``mapping``: a YAML mapping to a ``Config`` — unknown keys and wrong types refused, all at once;
- ``environment``: ``TCPMESH_<SECTION>_<FIELD>`` overrides, and every other ``TCPMESH_*`` variable refused;
- ``validation``: whether a ``Config`` is sound — every problem at once;
- ``load``: the one reader of the outside world — the file, the environment and, for
  ``capture.cgroup_root: auto``, the mount table (agent.mounts) — then ``validate``.

This face only hands their public names on: ``from agent.config import load_config, Config`` is the way in.
"""

from __future__ import annotations

from agent.config.environment import (ENV_PREFIX, NON_CONFIG_ENV, admin_socket_setting, apply_environment,
                                      check_environment, environment_fields)
from agent.config.load import check_cgroup_root, load_agent_config, load_config, resolve_cgroup_root
from agent.config.mapping import build_dataclass, config_from_mapping
from agent.config.model import (CAPTURE_MODES, DEFAULT_ACCESS_LOG, DEFAULT_ACCESS_LOG_BACKUPS,
                                DEFAULT_ACCESS_LOG_KEY, DEFAULT_ACCESS_LOG_MAX_BYTES, DEFAULT_ADMIN_ADDRESS,
                                DEFAULT_ADMIN_PORT, DEFAULT_ADMIN_SOCKET, DEFAULT_BUFFER_IDENTITY_SHARES,
                                DEFAULT_CGROUP_ROOT, DEFAULT_CONFIG_PATH, DEFAULT_CONFIG_WATCH_POLL_SECONDS,
                                DEFAULT_CONNECT_TIMEOUT_SECONDS, DEFAULT_DRAIN_SECONDS,
                                DEFAULT_FIRST_SVID_WAIT_SECONDS, DEFAULT_HANDSHAKE_TIMEOUT_SECONDS,
                                DEFAULT_IDENTITY_POLL_SECONDS, DEFAULT_INBOUND_PORT,
                                DEFAULT_INBOUND_TUNNEL_IDLE_SECONDS, DEFAULT_MAX_CONNECTIONS,
                                DEFAULT_MAX_CONNECTIONS_PER_IDENTITY, DEFAULT_MAX_HANDSHAKES,
                                DEFAULT_MAX_HANDSHAKES_PER_SOURCE, DEFAULT_NODE_CA_DIR, DEFAULT_OUTBOUND_PORT,
                                DEFAULT_POLICY_POLL_SECONDS, DEFAULT_REGISTRY_POLL_SECONDS,
                                DEFAULT_REPORT_INTERVAL_SECONDS, DEFAULT_REVOKED_TUNNEL_GRACE_SECONDS,
                                DEFAULT_STATE_DIR, DEFAULT_STREAM_IDLE_TIMEOUT_SECONDS, DEFAULT_SVID_TTL_SECONDS,
                                DEFAULT_TUNNEL_IDLE_SECONDS, DEFAULT_TUNNEL_TIMEOUT_SECONDS, IDENTITY_MODES,
                                INBOUND_IDLE_MARGIN_SECONDS, MIN_BUFFER_BUDGET_BYTES, REGISTRY_SOURCES,
                                SAME_NODE_CHOICES, SOURCE_ADDRESS_CHOICES, AccessLogConfig, AdminConfig,
                                CaptureConfig, Config, ConfigFileConfig, IdentityConfig, IdentityIssuerConfig,
                                NodeConfig, PolicyConfig, ProxyConfig, RegistryConfig, TelemetryConfig)
from agent.config.validation import admin_allowed_sources, validate
from agent.mounts import CGROUP_ROOT_AUTO

__all__ = [
    "CAPTURE_MODES", "CGROUP_ROOT_AUTO", "DEFAULT_ACCESS_LOG", "DEFAULT_ACCESS_LOG_BACKUPS", "DEFAULT_ACCESS_LOG_KEY",
    "DEFAULT_ACCESS_LOG_MAX_BYTES", "DEFAULT_ADMIN_ADDRESS", "DEFAULT_ADMIN_PORT", "DEFAULT_ADMIN_SOCKET",
    "DEFAULT_BUFFER_IDENTITY_SHARES", "DEFAULT_CGROUP_ROOT", "DEFAULT_CONFIG_PATH", "DEFAULT_CONFIG_WATCH_POLL_SECONDS",
    "DEFAULT_CONNECT_TIMEOUT_SECONDS", "DEFAULT_DRAIN_SECONDS", "DEFAULT_FIRST_SVID_WAIT_SECONDS",
    "DEFAULT_HANDSHAKE_TIMEOUT_SECONDS", "DEFAULT_IDENTITY_POLL_SECONDS", "DEFAULT_INBOUND_PORT",
    "DEFAULT_INBOUND_TUNNEL_IDLE_SECONDS", "DEFAULT_MAX_CONNECTIONS", "DEFAULT_MAX_CONNECTIONS_PER_IDENTITY",
    "DEFAULT_MAX_HANDSHAKES", "DEFAULT_MAX_HANDSHAKES_PER_SOURCE", "DEFAULT_NODE_CA_DIR", "DEFAULT_OUTBOUND_PORT",
    "DEFAULT_POLICY_POLL_SECONDS", "DEFAULT_REGISTRY_POLL_SECONDS", "DEFAULT_REPORT_INTERVAL_SECONDS",
    "DEFAULT_REVOKED_TUNNEL_GRACE_SECONDS", "DEFAULT_STATE_DIR", "DEFAULT_STREAM_IDLE_TIMEOUT_SECONDS",
    "DEFAULT_SVID_TTL_SECONDS", "DEFAULT_TUNNEL_IDLE_SECONDS", "DEFAULT_TUNNEL_TIMEOUT_SECONDS", "ENV_PREFIX",
    "IDENTITY_MODES", "INBOUND_IDLE_MARGIN_SECONDS", "MIN_BUFFER_BUDGET_BYTES", "NON_CONFIG_ENV", "REGISTRY_SOURCES",
    "SAME_NODE_CHOICES", "SOURCE_ADDRESS_CHOICES", "AccessLogConfig", "AdminConfig", "CaptureConfig", "Config",
    "ConfigFileConfig", "IdentityConfig", "IdentityIssuerConfig", "NodeConfig", "PolicyConfig", "ProxyConfig",
    "RegistryConfig", "TelemetryConfig", "admin_allowed_sources", "admin_socket_setting", "apply_environment",
    "build_dataclass", "check_cgroup_root", "check_environment", "config_from_mapping", "environment_fields",
    "load_agent_config", "load_config", "resolve_cgroup_root", "validate",
]
