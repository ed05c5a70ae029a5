"""A Service from the Kubernetes source, meshed end to end: the source reads Pods, Nodes, a Service
and its EndpointSlice from the local list/watch server (test_kubernetes_apiserver.py) through the
official client; its snapshot is the registry of two nodes' real proxies on loopback (real TLS 1.3
mTLS, as in test_proxy_loopback.py, the capture's answer supplied by the test). A client dials the
ClusterIP and port.

Proves: the connection reaches the ready endpoint on the port its named targetPort resolves to,
over mTLS, with the endpoint's identity and the Service on both nodes' flow records (the OPEN's
SERVICE TLV, checked by the destination against its own registry); when the
EndpointSlice says that endpoint is terminating (not ready), the next connection is refused at
once with UH while the one already open keeps working; a new ready endpoint takes connections.
"""

from __future__ import annotations

import asyncio
import copy
import time

import pytest

from tests.conftest import require_module

require_module("kubernetes", "install the kubernetes extra (make setup does: pip install -e '.[test,kubernetes]')",
               module_level=True)

from agent.capture.origin import Origin  # noqa: E402
from agent.cli import run_event_loop  # noqa: E402
from agent.connection import flow as F  # noqa: E402
from agent.identity.ca import init_ca, load_ca  # noqa: E402
from agent.identity.store import IdentityStore  # noqa: E402
from agent.proxy.inbound import InboundProxy  # noqa: E402
from agent.proxy.outbound import OutboundProxy  # noqa: E402
from agent.proxy.server import ProxyContext  # noqa: E402
from agent.registry.kubernetes.source import KubernetesSource, make_api_client  # noqa: E402
from agent.registry.kubernetes.watch import Backoff  # noqa: E402
from agent.telemetry.flows import FlowTable  # noqa: E402
from agent.telemetry.metrics import Metrics  # noqa: E402
from prometheus_client import CollectorRegistry  # noqa: E402
from tests.integration.test_kubernetes_apiserver import FakeApiServer, recorded_objects  # noqa: E402
from tests.integration.test_proxy_loopback import free_port  # noqa: E402

TD = "cluster.local"
NODE1, NODE2 = "127.0.0.11", "127.0.0.12"
CLIENT_IP, DB0_IP, DB1_IP = "127.0.1.1", "127.0.2.1", "127.0.2.2"
CLUSTER_IP, SERVICE_PORT = "10.96.50.5", 5432
SLICE_UID = "eeeeeeee-0000-4000-8000-000000000001"
HOST = "db.data.svc.cluster.local"


def cluster(backend_port: int) -> dict[str, list[dict]]:
    """Two nodes, a client pod on node1, two database pods on node2, the Service and its slice —
    the recorded objects' shapes with loopback addresses."""
    recorded = recorded_objects()
    nodes = []
    for name, address in (("node1", NODE1), ("node2", NODE2)):
        node = copy.deepcopy(recorded["nodes"][0])
        node["metadata"]["name"] = name
        node["status"]["addresses"] = [{"type": "InternalIP", "address": address}, {"type": "Hostname", "address": name}]
        nodes.append(node)
    pods = []
    for name, namespace, account, node, ip in (("web", "shop", "web", "node1", CLIENT_IP),
                                               ("db-0", "data", "postgres", "node2", DB0_IP),
                                               ("db-1", "data", "postgres", "node2", DB1_IP)):
        pod = copy.deepcopy(recorded["pods"][0])
        pod["metadata"].update(name=name, namespace=namespace, uid=f"uid-{name}")
        pod["spec"].update(serviceAccountName=account, nodeName=node)
        pod["status"].update(podIP=ip, podIPs=[{"ip": ip}])
        pods.append(pod)
    service = copy.deepcopy(next(s for s in recorded["services"] if s["metadata"]["name"] == "postgres"))
    service["metadata"].update(name="db", uid="uid-svc-db")
    service["spec"].update(clusterIP=CLUSTER_IP, clusterIPs=[CLUSTER_IP],
                           ports=[{"name": "sql", "protocol": "TCP", "port": SERVICE_PORT, "targetPort": "pg"}])
    eps = copy.deepcopy(next(s for s in recorded["endpointslices"] if s["metadata"]["name"] == "postgres-q7v4n"))
    eps["metadata"].update(name="db-x1", uid=SLICE_UID, labels={"kubernetes.io/service-name": "db"})
    eps["ports"] = [{"name": "sql", "protocol": "TCP", "port": backend_port}]   # "pg" resolved by the controller
    eps["endpoints"] = [
        {"addresses": [DB0_IP], "conditions": {"ready": True, "serving": True, "terminating": False},
         "nodeName": "node2", "targetRef": {"kind": "Pod", "namespace": "data", "name": "db-0", "uid": "uid-db-0"}},
        {"addresses": [DB1_IP], "conditions": {"ready": False, "serving": False, "terminating": False},
         "nodeName": "node2", "targetRef": {"kind": "Pod", "namespace": "data", "name": "db-1", "uid": "uid-db-1"}}]
    return {"nodes": nodes, "pods": pods, "services": [service], "endpointslices": [eps]}


@pytest.fixture
def api():
    server = FakeApiServer({}).start()
    try:
        yield server
    finally:
        server.stop()


def test_a_service_from_the_kubernetes_source_is_meshed_end_to_end(api, tmp_path):
    init_ca(TD, tmp_path / "ca")
    ca = load_ca(tmp_path / "ca")
    kubeconfig = str(api.kubeconfig(tmp_path / "kubeconfig"))

    async def backend(name: str, reader, writer):
        try:
            while line := await reader.readline():
                writer.write(f"{name}:{line.decode()}".encode())
                await writer.drain()
        except ConnectionError:
            pass
        writer.close()

    async def main():
        loop = asyncio.get_running_loop()
        backend_port = free_port(DB0_IP)
        objects = cluster(backend_port)
        for kind, items in objects.items():
            for obj in items:
                api.put(kind, obj, silent=True)
        state = {}

        def on_snapshot(registry):
            state["registry"] = registry
            return True

        source = KubernetesSource(make_api_client(kubeconfig), "node1", TD, str(tmp_path / "cgroup"), on_snapshot,
                                  backoff_factory=lambda: Backoff(initial=0.05, maximum=0.4), min_interval=0.01)
        source.start()
        state["registry"] = await source.first_snapshot()
        task = loop.create_task(source.run())
        inbound_port = free_port(NODE2)
        origin = {"ip": CLUSTER_IP, "port": SERVICE_PORT}

        def context(node: str) -> ProxyContext:
            store = IdentityStore(ca, ca.cert_pem, 600)
            store.ensure(state["registry"].identities_on(node))
            return ProxyContext(loop=loop, node_name=node, registry=lambda: state["registry"], identities=store,
                                metrics=Metrics(CollectorRegistry()), flows=FlowTable(), inbound_port=inbound_port,
                                connect_timeout=2.0)

        src_ctx, dst_ctx = context("node1"), context("node2")
        outbound = OutboundProxy(src_ctx, lambda sock: Origin(origin["ip"], origin["port"], None, None, None, None, None))
        servers = [await asyncio.start_server(lambda r, w: backend("db-0", r, w), DB0_IP, backend_port),
                   await asyncio.start_server(lambda r, w: backend("db-1", r, w), DB1_IP, backend_port),
                   await loop.create_server(outbound.protocol_factory, NODE1, 0),
                   await loop.create_server(InboundProxy(dst_ctx).protocol_factory, NODE2, inbound_port)]
        outbound_address = servers[2].sockets[0].getsockname()[:2]

        async def dial():
            reader, writer = await asyncio.open_connection(*outbound_address, local_addr=(CLIENT_IP, 0))
            return reader, writer

        async def ask(conn, text: str) -> str:
            conn[1].write(text.encode() + b"\n")
            await conn[1].drain()
            return (await asyncio.wait_for(conn[0].readline(), 5)).decode().strip()

        async def until(predicate, what: str) -> None:
            deadline = time.monotonic() + 5
            while not predicate():
                assert time.monotonic() < deadline, f"timed out waiting for {what}"
                await asyncio.sleep(0.01)

        try:
            first = await dial()
            assert await ask(first, "hello") == "db-0:hello"   # the ready endpoint, on the named target port
            (src,) = [f for f in src_ctx.flows.snapshot()]
            await until(lambda: dst_ctx.flows.snapshot(), "the destination's flow")
            (dst,) = dst_ctx.flows.snapshot()
            for record in (src, dst):
                assert record["security"] == "mutual_tls", record
                assert record["destination_principal"] == f"spiffe://{TD}/ns/data/sa/postgres"
                assert record["destination_workload"] == "db-0"
            for record in (src, dst):   # both reporters name the Service the client dialled
                assert (record["destination_service"], record["destination_service_name"],
                        record["destination_service_namespace"]) == (HOST, "db", "data"), record["reporter"]

            # the EndpointSlice says db-0 is terminating and db-1 is still starting: nothing is ready
            eps = api.get("endpointslices", SLICE_UID)
            eps["endpoints"][0]["conditions"] = {"ready": False, "serving": True, "terminating": False}
            api.put("endpointslices", eps)
            await until(lambda: not state["registry"].service_at(CLUSTER_IP, SERVICE_PORT)[2], "db-0 not ready")
            refused = await dial()
            with pytest.raises(ConnectionResetError):     # no endpoint: reset at once, never a clean answer
                await asyncio.wait_for(refused[0].read(), 5)
            await until(lambda: any(f["response_flags"] == F.FLAG_NO_HEALTHY_UPSTREAM
                                    for f in src_ctx.flows.snapshot()), "the UH flow")
            assert await ask(first, "still there") == "db-0:still there"   # the open connection continues

            # db-1 turns ready: new connections go there
            eps["endpoints"][1]["conditions"] = {"ready": True, "serving": True, "terminating": False}
            api.put("endpointslices", eps)
            await until(lambda: state["registry"].service_at(CLUSTER_IP, SERVICE_PORT)[2], "db-1 ready")
            second = await dial()
            assert await ask(second, "again") == "db-1:again"
            for conn in (first, refused, second):
                conn[1].close()
        finally:
            task.cancel()
            await loop.run_in_executor(None, source.stop)
            for server in servers:
                server.close()
            for ctx in (src_ctx, dst_ctx):
                await ctx.drain(0.5)
            outbound.pool.close_all("test over")

    run_event_loop(asyncio.wait_for(main(), 60), "asyncio")
