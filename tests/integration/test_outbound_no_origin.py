"""A connection at the outbound port with no origin record: the flow's detail says what is known (no record for
this connection, client → outbound port) and what it most likely means, told apart by who the client is.

Seen failing before: every such connection read "has no original destination (it was not captured by tcpmesh;
do not connect to the outbound port directly)" — also for a captured pod whose record was lost (a hand-over slot
reused after 30 s in the accept queue, full record maps), which sent operators after a misconfigured client.
"""

from __future__ import annotations

import asyncio
import socket

import pytest

from agent.connection import flow as F
from tests.integration.test_proxy_loopback import CLIENT_IP, NODE1, OTHER_IP, run_mesh, wait_closed_flows  # noqa: F401


async def _connect_from(mesh, source_ip: str) -> tuple[str, int]:
    sock = socket.socket()
    sock.bind((source_ip, 0))
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, mesh.outbound_address)
    reader, writer = await asyncio.open_connection(sock=sock)
    address = sock.getsockname()[:2]
    writer.write(b"hello")
    with pytest.raises(ConnectionResetError):
        await reader.read()
    writer.close()
    return address


def test_a_pod_of_this_node_without_a_record_gets_the_causes_in_order(run_mesh):
    async def body(mesh):
        mesh.origin = {"missing": True}
        client = await _connect_from(mesh, CLIENT_IP)
        (flow,) = await wait_closed_flows(mesh.contexts["node1"], 1)
        detail = flow["detail"]
        assert flow["response_flags"] == F.FLAG_NO_ROUTE
        outbound = f"{mesh.outbound_address[0]}:{mesh.outbound_address[1]}"
        assert detail.startswith(f"no origin record for {client[0]}:{client[1]} → {outbound}"), detail
        assert "shop/web" in detail, detail
        first, lost = detail.index("dialled the outbound port itself"), detail.index("record was lost")
        assert first < lost, detail  # the likely cause first
        assert "to_redirect" in detail and "handover_reclaimed" in detail, detail  # where to look
        assert "docs/capture-connect.md" in detail, detail

    run_mesh(body)


@pytest.mark.parametrize("source", [NODE1, OTHER_IP])  # the node itself; a workload of another node
def test_a_client_that_is_no_pod_of_this_node_dialled_the_outbound_port_directly(run_mesh, source):
    async def body(mesh):
        mesh.origin = {"missing": True}
        client = await _connect_from(mesh, source)
        (flow,) = await wait_closed_flows(mesh.contexts["node1"], 1)
        detail = flow["detail"]
        assert detail.startswith(f"no origin record for {client[0]}:{client[1]} → "), detail
        assert f"{source} is no workload of node node1" in detail, detail
        assert "dialled the outbound port directly" in detail, detail
        assert "record was lost" not in detail, detail  # only this node's pods are captured: nothing to lose

    run_mesh(body)
