"""The database scenario (issue #19): real PostgreSQL and Redis in the server pod, pgbench and
redis-benchmark from the client pod, through every path of the run.

``Databases`` starts both servers once, in the server pod's netns and the servers' cgroup
(``<bench>/server``), and initialises pgbench's tables once (scale 1, over the direct path);
``close`` stops them. ``pgbench`` and ``redis`` run one measurement of one path and return plain
dicts of raw results, like bench/scenarios.py; bench/dbfigures.py turns them into figures. The
servers and the parsers are agent/lab/realservers.py's, the same the real-workload tests use.

PostgreSQL runs as the ``postgres`` user (setpriv), which clears the parent-death signal: if the
bench is SIGKILLed, the next run's stale-run cleanup kills what is left in the dead run's cgroups.
"""

from __future__ import annotations

import subprocess

from agent.lab import realservers
from bench import host
from bench.settings import Settings
from bench.world import Path_, World

PGBENCH_SCALE = 1
REDIS_TESTS = ("SET", "GET")


class Databases:
    """PostgreSQL and Redis in the server pod for the lifetime of the object (``close`` stops them)."""

    def __init__(self, world: World) -> None:
        problem = realservers.missing_tools()
        if problem:
            raise RuntimeError(problem)
        self.world = world
        self.servers: list[realservers.Server] = []
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    def _launch(self, argv: list[str], **popen_kwargs) -> subprocess.Popen:
        world = self.world
        return world.start(argv, world.server_pod.netns, world.server_cgroup, **popen_kwargs)

    def _start(self) -> None:
        world = self.world
        hba = (f"host all all {world.plan.pod_gateway}/32 trust",
               *(f"host all all {node.pod_cidr} trust" for node in world.plan.nodes))
        self.servers.append(realservers.Postgres(self._launch, world.server_pod.ip, hba, where=world.server_pod.name))
        self.servers[-1].start()
        self.servers.append(realservers.Redis(self._launch, world.server_pod.ip, where=world.server_pod.name))
        self.servers[-1].start()
        direct = world.paths(("direct",))["direct"]
        host_, port = world.address(direct, "postgres", realservers.PG_PORT)
        world.run(pgbench_argv(host_, port, "-i", "-q", "-s", str(PGBENCH_SCALE)), direct.client_netns,
                  direct.client_cgroup, timeout=120)

    def close(self) -> None:
        for server in reversed(self.servers):
            server.stop()
            if server.proc is not None:
                self.world.stop(server.proc)
        self.servers.clear()


def pgbench_argv(host: str, port: int, *args: str) -> list[str]:
    return [f"{realservers.PG_BIN}/pgbench", "-h", host, "-p", str(port), "-U", "postgres", *args, "postgres"]


def redis_argv(host: str, port: int, clients: int, requests: int) -> list[str]:
    """SET and GET, one request in flight per connection (-P 1), quiet output (one line per test)."""
    return ["redis-benchmark", "-h", host, "-p", str(port), "-c", str(clients), "-n", str(requests), "-P", "1",
            "-t", ",".join(t.lower() for t in REDIS_TESTS), "-q"]


def _cpu(world: World, path: Path_) -> tuple[dict, dict, dict]:
    return (host.cpu_snapshot([path.client_cgroup]), host.cpu_snapshot([world.server_cgroup]),
            host.cpu_snapshot(path.datapath_cgroups))


def _cpu_result(snapshots: tuple[dict, dict, dict]) -> dict:
    client, server, datapath = snapshots
    return {"client_cpu_s": host.cpu_seconds_since(client), "server_cpu_s": host.cpu_seconds_since(server),
            "datapath_cpu_s": host.cpu_seconds_since(datapath)}


def pgbench(world: World, path: Path_, settings: Settings) -> dict:
    """TPC-B (pgbench's built-in script) with ``pgbench_clients`` connections, one thread, for
    ``pgbench_seconds``; tps excludes the connection setup."""
    host_, port = world.address(path, "postgres", realservers.PG_PORT)
    seconds = max(1, round(settings.pgbench_seconds))
    argv = pgbench_argv(host_, port, "-c", str(settings.pgbench_clients), "-j", "1", "-T", str(seconds))
    snapshots = _cpu(world, path)
    out = world.run(argv, path.client_netns, path.client_cgroup, timeout=seconds + 60)
    result = realservers.parse_pgbench(out)
    if result.failed or not result.processed:
        raise RuntimeError(f"pgbench through {path.name}: {result.failed} failed, {result.processed} processed")
    return {"clients": settings.pgbench_clients, "seconds": seconds, "tps": result.tps,
            "processed": result.processed, "latency_ms": result.latency_ms, **_cpu_result(snapshots)}


def redis(world: World, path: Path_, settings: Settings, clients: int) -> dict:
    """SET and GET with ``clients`` connections, ``redis_requests`` each: requests per second per test."""
    host_, port = world.address(path, "redis", realservers.REDIS_PORT)
    snapshots = _cpu(world, path)
    out = world.run(redis_argv(host_, port, clients, settings.redis_requests), path.client_netns,
                    path.client_cgroup, timeout=120)
    rates, errors = realservers.parse_redis_benchmark(out)
    missing = [t for t in REDIS_TESTS if t not in rates]
    if errors or missing:
        raise RuntimeError(f"redis-benchmark through {path.name}: missing {missing}, errors {errors[:3]}: "
                           f"{out.strip()[-300:]}")
    return {"clients": clients, "requests": settings.redis_requests, "rps": {t: rates[t] for t in REDIS_TESTS},
            **_cpu_result(snapshots)}
