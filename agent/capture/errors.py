"""Errors of the capture package, written for the operator. BPF loading errors live in agent.bpf.errors."""

from __future__ import annotations

from agent.errors import TcpmeshError


class NotLoaded(TcpmeshError):
    """A capture method that needs the programs was called before load() (or after close())."""
