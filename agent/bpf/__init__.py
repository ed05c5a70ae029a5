"""BPF: the one owner of compiling, loading, pinning and reading BPF programs and maps.

Capture modes (agent.capture) and the kernel TCP stats (agent.telemetry.tcpstats) sit on it; nobody
else starts its child process or calls bpf(2) through libbpf.

  - ``loader`` / ``fdloader``: the child process that imports bcc (the agent never does: libbcc maps
    libLLVM and clang, ~110 MB) — it compiles against the kernel stub and either pins the programs in
    bpffs (``run_loader``) or hands their fds back over a socketpair (``load_fds``);
  - ``compile``: the bcc calls of that child (compile one bpf/*.c, load one program, keep the log);
  - ``kstub``: the kernel-header stub tree bcc compiles against;
  - ``libbpf``: the bpf(2) commands the agent issues itself, through libbpf.so.1 and ctypes;
  - ``pins``: where pinned sets live in bpffs, how they are named, locked and removed;
  - ``counters``: summing per-CPU reason counters (every reason or nothing);
  - ``errors``: BpfLoadError, AttachError, BccMissing, LoaderFailed.

Must not import agent.capture, agent.telemetry or anything above them: the layouts of a program's
maps (its ABI mirror) belong to the package that owns the program and are passed in.
"""
