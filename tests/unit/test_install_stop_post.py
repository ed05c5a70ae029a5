"""The unit's ExecStopPost decision (agent/servicestop.py): cleanup for a stop job only.

The decision is pure and tested here for every case; reading the job from a running systemd
(`systemctl list-jobs`) can only happen on a systemd host (the Vagrant VMs): PID 1 here is not
systemd, which the last test shows is reported and answered with "keep capture" (fail closed)."""

from __future__ import annotations

import pytest

from agent.servicestop import SystemdView, ask_systemd, decide, parse_list_jobs

UNIT = "tcpmesh-agent.service"


@pytest.mark.parametrize("view, cleanup, words", [
    (SystemdView("stop", "running", "success"), True, "removing capture"),
    (SystemdView("stop", "degraded", "timeout"), True, "removing capture"),        # a stop that had to SIGKILL
    (SystemdView("restart", "running", "success"), False, "restarting"),
    (SystemdView("try-restart", "running", "success"), False, "restarting"),
    (SystemdView(None, "running", "exit-code"), False, "Restart=on-failure"),      # crash: auto-restart follows
    (SystemdView(None, "running", "signal"), False, "fail closed"),
    (SystemdView(None, "running", "success"), False, "without a stop job"),        # killed outside systemd
    (SystemdView("start", "running", "exit-code"), False, "start job"),            # a failed start
    (SystemdView("stop", "stopping", "success"), False, "shutting down"),          # shutdown / reboot
    (SystemdView(None, "", "", problem="no systemd"), False, "cannot tell"),
])
def test_only_a_stop_job_removes_capture(view, cleanup, words):
    decision = decide(UNIT, view)
    assert decision.cleanup is cleanup
    assert words in decision.reason


def test_list_jobs_output():
    text = ("1721 tcpmesh-agent.service restart running\n"
            "1722 network-online.target start waiting\n")
    assert parse_list_jobs(text, UNIT) == "restart"
    assert parse_list_jobs(text, "other.service") is None
    assert parse_list_jobs("", UNIT) is None


def test_without_systemd_as_init_capture_is_kept():
    view = ask_systemd(UNIT, {"SERVICE_RESULT": "success"})
    if not view.problem:
        pytest.skip("this host runs systemd as PID 1: the answer depends on its jobs")
    assert not decide(UNIT, view).cleanup
