"""BPF: the one owner of compiling, loading, pinning and reading BPF programs and maps.

Capture modes (agent.capture) and the kernel TCP stats (agent.telemetry.tcpstats) sit on it; nobody
else starts its child process or imports bcc.

  - ``loader``: ``load(LoadRequest)`` — one request to a short-lived child process, one answer back
    (the agent never imports bcc: libbcc maps libLLVM and clang, ~110 MB); the child pins the
    programs in bpffs (``pin_to``) or hands their and the maps' fds back over a socketpair;
  - ``child``: that child (``python -m agent.bpf.child``), and ``compile``: its bcc calls;
  - ``sources``: where the shipped C sources are, and the include flags every program compiles with;
  - ``kstub``: the kernel-header stub tree bcc compiles against;
  - ``libbpf``: the bpf(2) commands the agent issues itself, through libbpf.so.1 and ctypes;
  - ``pins``: where pinned sets live in bpffs, how they are named, locked, pruned and removed;
  - ``pinned``: adopt a pinned set or have the child pin it (``adopt_or_pin``), and hold its fds
    (``PinnedSet``); ``maps``: a map checked against its owner's layout;
  - ``attach``: programs attached to a cgroup, found (and detached) by name;
  - ``counters``: reading and summing per-CPU reason counters (every reason or nothing);
  - ``errors``: BpfLoadError, AttachError, BccMissing, LoaderFailed, NotLoaded, MapLayoutMismatch.
Only ``child`` and ``compile`` may import bcc, and only the child process imports them.

Must not import agent.capture, agent.telemetry or anything above them: the layouts of a program's
maps (its ABI mirror) belong to the package that owns the program and are passed in.
"""
