"""Errors of the lab: what went wrong with which lab, and the command that fixes it."""

from agent.errors import TcpmeshError


class LabError(TcpmeshError):
    """A lab operation failed; the message names the lab, the object and the next step."""


class LabNotFound(LabError):
    """No lab of that name is up (no state file and no leftovers)."""
