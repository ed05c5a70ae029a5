"""``python -m agent`` runs the tcpmesh CLI."""

from agent.cli import main

main()
