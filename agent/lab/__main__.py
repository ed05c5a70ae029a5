"""``python -m agent.lab`` runs the lab CLI on its own (the same group as ``tcpmesh lab``)."""

from agent.lab.cli import lab

lab(prog_name="tcpmesh lab")
