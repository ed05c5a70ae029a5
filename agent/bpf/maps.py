"""Checking a map the agent holds an fd of against the layout its owner's ABI mirror expects.

The owner (capture's ``abi``, telemetry's ``tcpstats_abi``) passes the sizes; an agent never writes
into a map of another layout. Imports no bcc.
"""

from __future__ import annotations

from typing import Mapping

from agent.bpf.errors import MapLayoutMismatch
from agent.bpf.libbpf import Libbpf

Layouts = Mapping[str, tuple[int, int]]  # map name -> (key size, value size)


def check_layout(libbpf: Libbpf, map_fd: int, target: str, key_size: int, value_size: int) -> None:
    info = libbpf.map_info(map_fd, target)
    if (info.key_size, info.value_size) != (key_size, value_size):
        raise MapLayoutMismatch(f"map {target} has key/value sizes {info.key_size}/{info.value_size}, this agent "
                                f"expects {key_size}/{value_size}: it was made by another tcpmesh version; run "
                                "`tcpmesh cleanup` (stop the agent first) and start again")
