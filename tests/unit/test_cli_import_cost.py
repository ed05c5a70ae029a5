"""`tcpmesh --help` lists every command without importing them: no cryptography, no lab/pyroute2.

The agent promises it never loads cryptography where it is not needed; the help of the top-level
group must stay cheap, and the one-line help it shows for each lazy command must be the command's own.
"""

from __future__ import annotations

import subprocess
import sys

from click.testing import CliRunner

HEAVY = ("cryptography", "pyroute2", "agent.lab", "agent.identity.ca", "agent.config")
PROBE = ("import sys, runpy\n"
         "sys.argv = ['tcpmesh', '--help']\n"
         "try:\n    runpy.run_module('agent', run_name='__main__')\n"
         "except SystemExit:\n    pass\n"
         f"print('LOADED', [m for m in {HEAVY!r} if m in sys.modules])\n")


def test_help_imports_no_heavy_module():
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "Commands:" in done.stdout and "lab" in done.stdout
    assert "LOADED []" in done.stdout, done.stdout.splitlines()[-1]


def test_listed_help_is_each_commands_own():
    from agent.cli import LAZY_COMMANDS, main

    listed = CliRunner().invoke(main, ["--help"], terminal_width=400).output
    for name, (_where, summary) in LAZY_COMMANDS.items():
        assert f"{name}  " in listed and summary[:40] in listed, name
        command = main.get_command(None, name)  # imports it
        assert command.get_short_help_str(limit=1000) == summary, f"LAZY_COMMANDS[{name!r}] differs from its help"
