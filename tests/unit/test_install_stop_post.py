"""The unit's ExecStopPost decision (agent/service/stop_post.py): cleanup for a stop job only.

The decision is pure and tested here for every case; the last test asks this host's systemd for real:
on a systemd host (the Vagrant VMs) the unit has no job, elsewhere (PID 1 is not systemd, as on the CI
machine) that is reported — either way the answer is "keep capture" (fail closed), never a skip."""

from __future__ import annotations

import pytest

from agent.service.stop_post import SystemdView, ask_systemd, decide, parse_list_jobs

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


def test_asking_this_hosts_systemd_keeps_capture_when_nobody_stops_the_unit():
    view = ask_systemd(UNIT, {"SERVICE_RESULT": "success"})
    decision = decide(UNIT, view)
    assert not decision.cleanup
    if view.problem:  # PID 1 is not systemd (containers, this CI machine): said, and capture is kept
        assert "cannot tell a stop from a restart" in decision.reason and "tcpmesh cleanup" in decision.reason
    else:  # a systemd host (the Vagrant VMs): asked for real, and no job is pending for a unit nobody stops
        assert view.job is None and view.system_state
        assert "without a stop job" in decision.reason
