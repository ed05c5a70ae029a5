"""What a benchmark run measures and for how long: a frozen ``Settings`` and the presets.

Pure. ``FULL`` is bounded to about 10 minutes on the 2-core machines (most of it is the
tcpmesh path with a TLS handshake per connection), ``QUICK`` to one or two minutes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

PATHS = ("direct", "tcpmesh", "stunnel", "haproxy")
PEERS = ("stunnel", "haproxy")


@dataclass(frozen=True)
class Settings:
    repetitions: int = 3
    bulk_seconds: float = 4.0          # per iperf3 test (one stream, then eight); whole seconds
    bulk_streams: tuple[int, ...] = (1, 8)
    rr_seconds: float = 3.0            # ping-pong on one connection
    rr_size: int = 1
    crr_seconds: float = 4.0           # new connections, measured part
    crr_warmup: float = 0.5            # new connections, not counted
    crr_concurrency: int = 32
    crr_size: int = 64                 # bytes each way per connection
    idle_connections: int = 1000       # held open for the memory figure
    capture_connects: int = 1000       # sequential connects per capture variant
    capture_max_seconds: float = 20.0  # cap on the measured capture run (both variants together)
    sockperf_seconds: float = 2.0      # the known-good reference on the direct path (0: skip)
    settle_seconds: float = 1.0        # pause before sampling memory
    load_connections: int = 8          # latency under load: ping-pong on this many connections (rr_seconds each run)
    same_node: bool = True             # also client and server pods on one node (direct vs tcpmesh): rr, bulk
    databases: bool = True             # PostgreSQL (pgbench) and Redis (redis-benchmark) through every path
    pgbench_seconds: float = 5.0       # per pgbench run (TPC-B, scale 1)
    pgbench_clients: int = 8
    redis_requests: int = 40000        # per redis-benchmark run, each of SET and GET (~1 s direct)
    redis_clients: tuple[int, ...] = (8, 50)

    def validate(self) -> "Settings":
        problems = []
        if self.repetitions < 1:
            problems.append(f"repetitions must be >= 1, not {self.repetitions}")
        for name in ("bulk_seconds", "rr_seconds", "crr_seconds"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be > 0, not {getattr(self, name)}")
        if self.pgbench_seconds < 1:
            problems.append(f"pgbench_seconds must be >= 1 (pgbench -T takes whole seconds), not {self.pgbench_seconds}")
        if self.pgbench_clients < 1 or self.redis_requests < 1 or not self.redis_clients or min(self.redis_clients) < 1:
            problems.append("pgbench_clients, redis_requests and every redis_clients entry must be >= 1")
        if self.idle_connections < 1 or self.capture_connects < 1 or self.crr_concurrency < 1:
            problems.append("idle_connections, capture_connects and crr_concurrency must be >= 1")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def to_json(self) -> dict:
        return asdict(self)


FULL = Settings()
QUICK = Settings(repetitions=1, bulk_seconds=2, rr_seconds=1.0, crr_seconds=1.5, crr_warmup=0.3,
                 capture_connects=300, capture_max_seconds=10.0, sockperf_seconds=1.0, settle_seconds=0.5,
                 pgbench_seconds=2, redis_requests=10000)
PRESETS = {"full": FULL, "quick": QUICK}


def with_overrides(base: Settings, **overrides) -> Settings:
    """``base`` with every override that is not None applied, validated."""
    return replace(base, **{k: v for k, v in overrides.items() if v is not None}).validate()
