"""What the systemd unit's ExecStopPost does: remove capture on a real stop, keep it otherwise.

Capture stays attached whenever the agent exits, so pods fail closed (ECONNREFUSED) while no agent
runs (docs/capture-restart.md). ``tcpmesh cleanup`` between two runs of the agent would turn that into a
plaintext gap: pods talk directly until the next agent attaches again. So the unit's
``ExecStopPost=tcpmesh cleanup … --systemd-stop-post %n`` cleans up only when someone asked systemd
to stop the unit for good:

=========================================  ==========================  ============================
situation                                   what systemd shows          ExecStopPost
=========================================  ==========================  ============================
``systemctl stop``, ``disable --now``       a ``stop`` job              cleanup: pods leave the mesh
``systemctl restart`` / ``try-restart``     a ``restart`` job           keep: the new agent adopts
crash, kill, exit ≠ 0 (Restart=on-failure)  no job, SERVICE_RESULT≠ok   keep: fail closed until back
failed start                                a ``start`` job             keep
system shutdown or reboot                   system state ``stopping``   keep: the reboot clears it
systemd cannot be asked                     —                           keep, and say so
=========================================  ==========================  ============================

``decide`` is pure; ``ask_systemd`` runs ``systemctl`` (read-only queries) and is the only I/O here.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from typing import Mapping

SYSTEMCTL_TIMEOUT_SECONDS = 10.0
RESTART_JOBS = frozenset({"restart", "try-restart", "reload-or-restart", "reload-or-try-restart"})


@dataclass(frozen=True)
class StopPostDecision:
    cleanup: bool
    reason: str


@dataclass(frozen=True)
class SystemdView:
    job: str | None          # the unit's pending job type ("stop", "restart", …), None when there is none
    system_state: str        # `systemctl is-system-running`: running, degraded, stopping, …
    service_result: str      # $SERVICE_RESULT: success, exit-code, signal, core-dump, timeout, …
    problem: str = ""        # why systemd could not be asked (then nothing else is trusted)


def decide(unit: str, view: SystemdView) -> StopPostDecision:
    keep = "capture stays attached, pods fail closed until an agent runs again"
    if view.problem:
        return StopPostDecision(False, f"{unit}: cannot tell a stop from a restart ({view.problem}); {keep}. "
                                       "Run `tcpmesh cleanup` by hand to remove capture.")
    if view.system_state == "stopping":
        return StopPostDecision(False, f"{unit}: the system is shutting down; {keep} (a reboot removes it)")
    if view.job == "stop":
        return StopPostDecision(True, f"{unit}: stopped by a stop job (result {view.service_result or 'unknown'}); "
                                      "removing capture: this node's pods now bypass the mesh")
    if view.job in RESTART_JOBS:
        return StopPostDecision(False, f"{unit}: restarting ({view.job} job); {keep}, the new agent adopts it")
    if view.job is not None:
        return StopPostDecision(False, f"{unit}: {view.job} job (result {view.service_result or 'unknown'}); {keep}")
    return StopPostDecision(False, f"{unit}: the agent exited without a stop job (result "
                                   f"{view.service_result or 'unknown'}; Restart=on-failure restarts failures); "
                                   f"{keep}")


def parse_list_jobs(text: str, unit: str) -> str | None:
    """The job type of ``unit`` in `systemctl list-jobs --no-legend --plain` output (JOB UNIT TYPE STATE)."""
    for line in text.splitlines():
        columns = line.split()
        if len(columns) >= 3 and columns[1] == unit:
            return columns[2]
    return None


def ask_systemd(unit: str, environ: Mapping[str, str] | None = None) -> SystemdView:
    environ = os.environ if environ is None else environ
    result = environ.get("SERVICE_RESULT", "")
    try:
        jobs = _systemctl("list-jobs", "--no-legend", "--plain", "--no-pager")
        state = _systemctl("is-system-running", check=False).strip()
    except (OSError, subprocess.SubprocessError) as exc:
        return SystemdView(None, "", result, problem=f"systemctl failed: {exc}")
    if not state:
        return SystemdView(None, "", result, problem="systemctl is-system-running printed nothing")
    if state == "offline":
        return SystemdView(None, state, result, problem="systemd is not running as the init system")
    return SystemdView(parse_list_jobs(jobs, unit), state, result)


def _systemctl(*args: str, check: bool = True) -> str:
    done = subprocess.run(["systemctl", *args], capture_output=True, text=True, timeout=SYSTEMCTL_TIMEOUT_SECONDS,
                          stdin=subprocess.DEVNULL)
    if check and done.returncode != 0:
        raise subprocess.SubprocessError(f"systemctl {' '.join(args)} exited {done.returncode}: "
                                         f"{' / '.join((done.stderr.strip() or done.stdout.strip()).splitlines())}")
    return done.stdout
