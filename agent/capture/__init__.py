"""Capture: steering pods' outbound TCP to the node proxy and telling the proxy where it was going.

Public surface (everything else in this package is internal):
  - ``ConnectCapture`` (connect_mode): compiles/loads bpf/capture_connect.c, attaches it to pod
    cgroups and to the proxy's cgroup, reads the reason counters, detaches on close().
  - ``Origin``, ``parse_origin``, ``read_origin``, ``read_original_dst`` (origin): what the proxy
    calls on an accepted socket; no bcc needed.
The kernel/user ABI lives in bpf/include/tcpmesh_abi.h and is mirrored in ``abi``.
This package must not import the proxy, plumbing, policy or telemetry packages, and ``origin``
must stay importable without bcc.
"""

from agent.capture.connect_mode import ConnectCapture
from agent.capture.errors import AttachError, BccMissing, BpfLoadError, NotLoaded
from agent.capture.origin import Origin, OriginFormatError, parse_origin, read_origin, read_original_dst

__all__ = [
    "AttachError",
    "BccMissing",
    "BpfLoadError",
    "ConnectCapture",
    "NotLoaded",
    "Origin",
    "OriginFormatError",
    "parse_origin",
    "read_origin",
    "read_original_dst",
]
