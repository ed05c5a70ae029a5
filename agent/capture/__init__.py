"""Capture: steering pods' outbound TCP to the node proxy and telling the proxy where it was going.

Public surface (everything else in this package is internal):
  - ``Capture``, ``ListenerRequirements``, ``InboundEnforcement`` (interface) and ``build_capture``
    (modes): what the composition root (agent.app) builds and drives, for the mode it chose;
  - ``ConnectCapture`` (connect_mode): adopts the program set of bpf/capture_connect.c pinned in
    bpffs, or has the BPF loader's child (agent.bpf, the only user of bcc) compile and pin it;
    attaches it to pod cgroups, the pods cgroup (guard) and the proxy's cgroup; reads the
    reason counters; close() leaves everything attached (fail closed).
  - ``Origin``, ``parse_origin``, ``read_origin``, ``read_original_dst`` (origin): what the proxy
    calls on an accepted socket; no bcc needed.
The kernel/user ABI lives in bpf/include/tcpmesh_abi.h and is mirrored in ``abi``.
Loading, pinning and reading BPF is agent.bpf's. This package must not import agent.host, the proxy,
plumbing, policy or telemetry packages (tests/unit/test_import_graph.py), and ``origin`` must stay
importable without bcc.
"""

from agent.capture.connect_mode import ConnectCapture
from agent.bpf.errors import AttachError, BccMissing, BpfLoadError, NotLoaded
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
