"""``python -m agent.lab`` runs the lab CLI on its own (the same group as ``tcpmesh lab``)."""

import sys

import click

from agent.errors import TcpmeshError
from agent.lab.cli import lab

try:
    lab(prog_name="tcpmesh lab")
except TcpmeshError as exc:
    click.echo(f"tcpmesh: error: {exc}", err=True)
    sys.exit(2)
