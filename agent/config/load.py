"""Loading the agent's config: one file, the environment, the host's cgroup v2 mount — then validated, in that
order (``load_config``); ``load_agent_config`` adds what the agent itself needs: a file only root or its user can
change, and an explicit ``capture.cgroup_root`` that is the host's mount. The one part of agent.config that reads
the outside world: the file, ``os.environ`` when no environment is given, the mount table (agent.mounts).
"""

from __future__ import annotations

import os
import re
from dataclasses import replace
from pathlib import Path
from typing import Mapping

import yaml

from agent.config.environment import ENV_PREFIX, apply_environment, check_environment, environment_fields
from agent.config.mapping import config_from_mapping
from agent.config.model import Config
from agent.config.validation import validate
from agent.errors import ConfigError, invalid_yaml, problems_of, refused
from agent.filetrust import UntrustedFileError, check_trusted_file
from agent.mounts import CGROUP_ROOT_AUTO, MOUNTS_FILE, Cgroup2, cgroup_root_path, host_cgroup2

# where an install form sets the agent's TCPMESH_* variables (docs/config.md "Environment")
ENVIRONMENT_FILES = "the systemd unit: /etc/default/tcpmesh; the DaemonSet: its env"


def load_agent_config(path: str | Path, environ: Mapping[str, str] | None = None, *,
                      mounts_file: str = MOUNTS_FILE) -> Config:
    """``load_config`` for the agent itself (start and reload): the file, and every directory above it, must be
    changeable by root or the agent's user only (``agent.filetrust``) — whoever can write it decides where the
    policies and the registry come from and what is captured. And an explicit ``capture.cgroup_root`` must be the
    host's cgroup v2 mount (``check_cgroup_root``). Other commands read it with ``load_config``."""
    try:
        check_trusted_file(path, "--config", decides="where the agent's policies, registry and identities come from",
                           process="the agent")
    except UntrustedFileError as exc:
        raise ConfigError(f"{path}: --config", str(path), exc.problem) from exc
    cgroup2 = host_cgroup2(mounts_file)  # one read of the mount table: resolves auto, checks an explicit root
    config = load_config(path, environ, cgroup2=cgroup2)
    try:
        return check_cgroup_root(config, cgroup2.mount)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc.field}", exc.value, exc.problem, exc.fix) from None


def check_cgroup_root(config: Config, mount: str | None) -> Config:
    """Pure: ``config`` unless its ``capture.cgroup_root`` is not ``mount``, the host's cgroup v2 mount (None: the
    host has none, left to the ebpf-connect check and `tcpmesh doctor`). Capture mode none captures nothing and
    keeps any root (laptop runs, in-process tests). Without this, ``capture.mode: auto`` judged ebpf-connect
    unusable and ran in ebpf-tc, and the Kubernetes source found no pod's cgroup — with no word of the cause."""
    root = config.capture.cgroup_root
    if mount is None or config.capture.mode == "none" or os.path.realpath(root) == os.path.realpath(mount):
        return config
    raise ConfigError("capture.cgroup_root", root, f"is not this host's cgroup v2 mount, {mount}: the agent would "
                      "not find its own cgroup nor the pods' there (and capture.mode auto would rule ebpf-connect "
                      "out)", f"set capture.cgroup_root to {mount}, or to {CGROUP_ROOT_AUTO} (the default: the "
                      "host's mount, as `tcpmesh doctor` finds it)")


def resolve_cgroup_root(config: Config, cgroup2: Cgroup2) -> Config:
    """Pure: ``capture.cgroup_root: auto`` made ``cgroup2.place`` (the host's cgroup v2 mount; not mounted: where
    this host's layout puts it, as doctor's fix says); any other value is kept as written."""
    if config.capture.cgroup_root != CGROUP_ROOT_AUTO:
        return config
    return replace(config, capture=replace(config.capture, cgroup_root=cgroup_root_path(CGROUP_ROOT_AUTO, cgroup2)))


def load_config(path: str | Path, environ: Mapping[str, str] | None = None, *,
                mounts_file: str = MOUNTS_FILE, cgroup2: Cgroup2 | None = None) -> Config:
    """Read ``path`` (YAML), apply ``TCPMESH_<SECTION>_<FIELD>`` environment overrides, resolve
    ``capture.cgroup_root: auto`` with the host's cgroup v2 (``cgroup2``, else read from ``mounts_file`` — only
    when the root is auto), validate."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError("--config", str(path), f"cannot read the config file: {exc.strerror}",
                          "pass --config with the path of an existing YAML file") from exc
    try:
        doc = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise invalid_yaml(path, text, exc) from None
    environ = os.environ if environ is None else environ
    try:
        check_environment(environ)
        config = apply_environment(config_from_mapping(doc, source=str(path)), environ)
        if config.capture.cgroup_root == CGROUP_ROOT_AUTO:
            config = resolve_cgroup_root(config, cgroup2 or host_cgroup2(mounts_file))
        return validate(config)
    except ConfigError as exc:  # say which file (or which environment variable) holds each wrong value
        set_by = {field: name for name, field in environment_fields().items() if name in environ}
        raise refused([_located(error, path, set_by) for error in problems_of(exc)], where=str(path)) from None


def _located(error: ConfigError, path: Path, set_by: Mapping[str, str]) -> ConfigError:
    """``error`` naming where its value comes from: the variable that set the field (``set_by``: field → variable),
    else the file; a field of the problem's text that a variable set is named with it (a check of two fields)."""
    problem = error.problem
    for field, name in set_by.items():  # "exceeds proxy.max_connections (50)": that 50 is the variable's
        problem = re.sub(rf"\b{re.escape(field)} \(([^()]*)\)", rf"{field} (\1; set by {name} in the environment)",
                         problem)
    if error.field.startswith(ENV_PREFIX):
        return ConfigError(f"{error.field} (environment, overrides {path})", error.value, problem, error.fix)
    if error.field in set_by:
        name = set_by[error.field]
        where_set = f"{name}, where the agent's environment sets it ({ENVIRONMENT_FILES})"
        return ConfigError(f"{name} (environment, sets {error.field} over {path})", error.value, problem,
                           f"{error.fix + ' — in' if error.fix else 'change'} {where_set}; or remove {name}, and "
                           f"{path} decides {error.field}")
    where = error.field if error.field == str(path) else f"{path}: {error.field}"
    return ConfigError(where, error.value, problem, error.fix)
