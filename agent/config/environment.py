"""The environment layer of the agent's config: ``TCPMESH_<SECTION>_<FIELD>`` sets a field over the file
(``environment_fields``, ``apply_environment``); any other ``TCPMESH_*`` variable is refused unless it is one of
tcpmesh's own (``NON_CONFIG_ENV``) or a Kubernetes service link (``check_environment``), naming the closest
known name (docs/config.md "Environment"). Pure: reads the mapping it is given, never ``os.environ``.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from dataclasses import fields, is_dataclass, replace
from typing import Any, Mapping

from agent.config.mapping import coerce
from agent.config.model import DEFAULT_ADMIN_SOCKET, Config
from agent.errors import ConfigError, refused

ENV_PREFIX = "TCPMESH_"


def admin_socket_setting(doc: Any, environ: Mapping[str, str]) -> str:
    """admin.socket from a config file's raw YAML ``doc`` that may not validate as a whole (pure): the
    ``TCPMESH_ADMIN_SOCKET`` override, else a non-empty string at ``admin.socket``, else the default."""
    override = environ.get(f"{ENV_PREFIX}ADMIN_SOCKET".upper())
    if override:
        return override
    admin = doc.get("admin") if isinstance(doc, dict) else None
    value = admin.get("socket") if isinstance(admin, dict) else None
    return value if isinstance(value, str) and value else DEFAULT_ADMIN_SOCKET


def environment_fields() -> dict[str, str]:
    """``TCPMESH_<SECTION>_<FIELD>`` (``TCPMESH_<FIELD>`` at the top level) → the field it sets, e.g.
    ``TCPMESH_PROXY_SOURCE_ADDRESS`` → ``proxy.source_address``: every field but those of a section's own sections
    (identity.issuer.*, set in the file only)."""
    names: dict[str, str] = {}
    defaults = Config()
    for top in fields(Config):
        default = getattr(defaults, top.name)
        if not is_dataclass(default):
            names[f"{ENV_PREFIX}{top.name}".upper()] = top.name
            continue
        for sub in fields(default):
            if not is_dataclass(getattr(default, sub.name)):
                names[f"{ENV_PREFIX}{top.name}_{sub.name}".upper()] = f"{top.name}.{sub.name}"
    return names


def apply_environment(config: Config, environ: Mapping[str, str]) -> Config:
    """``TCPMESH_NODE_NAME=node1`` sets node.name; ``TCPMESH_TRUST_DOMAIN`` sets trust_domain (``environment_fields``)."""
    for env_name, path in environment_fields().items():
        if env_name not in environ:
            continue
        section, _, leaf = path.rpartition(".")
        if not section:
            config = replace(config, **{leaf: coerce(env_name, environ[env_name], type(getattr(config, leaf)))})
            continue
        current = getattr(config, section)
        value = coerce(env_name, environ[env_name], type(getattr(current, leaf)))
        config = replace(config, **{section: replace(current, **{leaf: value})})
    return config


# TCPMESH_* variables that are no config field, and who reads them: the check below lets them be. A new one
# goes here (tests/unit/test_config_environment.py finds every TCPMESH_ name of the repository).
NON_CONFIG_ENV: dict[str, str] = {
    "TCPMESH_CONFIG_FILE": "systemd/tcpmesh-agent.service: the --config path of ExecStart (/etc/default/tcpmesh)",
    "TCPMESH_ISSUER_CONFIG": "systemd/tcpmesh-issuer.service: the issuer's --config path",
    "TCPMESH_LAB": "the lab `tcpmesh lab` and --node default to (agent/lab/topology.py)",
    "TCPMESH_LAB_OWNER_PID": "the process that owns a lab (agent/lab/owner.py)",
    "TCPMESH_LAB_ARCHIVE_DIR": "where `tcpmesh lab down` keeps logs (agent/lab/cli.py)",
    "TCPMESH_SOCKET": "the admin socket the operator commands ask (agent/control/target.py)",
    "TCPMESH_DOCTOR_DISABLE": "checks `tcpmesh doctor` treats as missing (agent/host/doctor.py)",
    "TCPMESH_HOTPATH": "the tunnel data path, compiled or python (agent/proxy/hotpath.py)",
    "TCPMESH_DEMO_ENV": "the Vagrant demo's environment file (vagrant/demo_node.py)",
    "TCPMESH_ROOT": "the prefix of every path vagrant/provision.sh writes",
    "TCPMESH_BOX": "vagrant/Vagrantfile: the box", "TCPMESH_SUBNET": "vagrant/Vagrantfile: the host-only subnet",
    "TCPMESH_CPUS": "vagrant/Vagrantfile: CPUs per VM", "TCPMESH_MEMORY": "vagrant/Vagrantfile: memory per VM",
    "TCPMESH_REQUIRE_PRIVILEGED": "tests: every capability skip is a failure (.ci/run)",
    "TCPMESH_TEST_TIME_SCALE": "tests: multiplies their time bounds (VM guests)",
    "TCPMESH_VM_CACHE": "tests/vm: the image cache", "TCPMESH_VM_MIRROR": "tests/vm: the Debian mirror",
    "TCPMESH_VM_ACCEL": "tests/vm: tcg or kvm", "TCPMESH_VM_LOGS": "tests/vm: where the guests' outputs go",
    "TCPMESH_RELIABILITY_FIGURES": "tests/e2e: where the reliability figures go",
    "TCPMESH_LOAD_FULL": "tests/e2e: the full-size load test", "TCPMESH_INTERRUPT_READY": "tests/e2e: interrupt_target",
    "TCPMESH_BENCH_REPORT": "tests/e2e: where test_real_workloads writes its report",
}
_SERVICE_LINK = re.compile(r"_(SERVICE_HOST|SERVICE_PORT(_[A-Z0-9_]+)?|PORT|PORT_[0-9]+_(TCP|UDP|SCTP)"
                           r"(_PROTO|_PORT|_ADDR)?)$")


def check_environment(environ: Mapping[str, str]) -> None:
    """Pure: refuse every ``TCPMESH_*`` variable that is neither a config field (``environment_fields``), nor in
    ``NON_CONFIG_ENV``, nor one of the Kubernetes service links of a Service named tcpmesh-*, each with the closest
    known name. Refused rather than warned about, as an unknown key of the file is: a misspelled override would
    otherwise run the node on the default it meant to change (docs/config.md "Environment")."""
    known = environment_fields()
    nested = _nested_sections()
    candidates = {name[len(ENV_PREFIX):]: name for name in [*known, *NON_CONFIG_ENV]}
    errors = []
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or name in known or name in NON_CONFIG_ENV \
                or _kubernetes_service_link(name, environ[name]):
            continue
        section = next((path for path in nested if name.startswith(_env_name(path) + "_")), None)
        if section:
            errors.append(ConfigError(name, environ[name], f"sets a field of {section}, which only the config file "
                                      "can set", f"write it under {section} in the config file and remove the "
                                      "variable (docs/config.md)"))
            continue
        close = [candidates[c] for c in difflib.get_close_matches(name[len(ENV_PREFIX):], candidates, n=1, cutoff=0.75)]
        hint = f"did you mean {close[0]}{f' ({known[close[0]]})' if close[0] in known else ''}? " if close else ""
        errors.append(ConfigError(name, environ[name], "is not a tcpmesh setting: the agent would run as if it were "
                                  "not set", f"{hint}a config field is TCPMESH_<SECTION>_<FIELD> (docs/config.md "
                                  "\"Environment\"); rename or remove the variable"))
    if errors:
        raise refused(errors)


def _env_name(path: str) -> str:
    return f"{ENV_PREFIX}{path.replace('.', '_')}".upper()


def _nested_sections() -> list[str]:
    """Sections of a section (identity.issuer): their fields are set in the file only."""
    config = Config()
    return [f"{top.name}.{sub.name}" for top in fields(config) if is_dataclass(section := getattr(config, top.name))
            for sub in fields(section) if is_dataclass(getattr(section, sub.name))]


def _kubernetes_service_link(name: str, value: str) -> bool:
    """The kubelet's variables for a Service (``<NAME>_SERVICE_HOST``, ``<NAME>_PORT=tcp://…``, …), by name and
    value: a Service named tcpmesh-issuer in the agent's namespace gives each of its pods eight of them."""
    found = _SERVICE_LINK.search(name)
    if found is None:
        return False
    kind = found.group(1)
    if kind.endswith(("SERVICE_HOST", "_ADDR")):
        try:
            ipaddress.ip_address(value)
        except ValueError:
            return False
        return True
    if kind.startswith("SERVICE_PORT") or kind.endswith("_PORT"):
        return value.isdigit()
    if kind.endswith("_PROTO"):
        return value in ("tcp", "udp", "sctp")
    return re.fullmatch(r"(tcp|udp|sctp)://\S+:[0-9]+", value) is not None  # <NAME>_PORT, <NAME>_PORT_<n>_<PROTO>
