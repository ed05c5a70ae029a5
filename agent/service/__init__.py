"""The agent as a long-running service on a host: systemd readiness (``sdnotify``), what the unit's
ExecStopPost decides (``stop_post``), and giving the process's free C heap back (``heap``).

Each module stands alone: none imports the rest of the agent (the composition root and the CLI use them).
"""
