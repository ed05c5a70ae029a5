"""Whether this host can run the tunnels on kernel TLS: the probe behind ``proxy.kernel_tls`` and doctor's ktls row.

The probe is the real thing, not a look at the kernel's options: a TLS 1.3 pair on loopback with the tunnels'
own contexts (agent.identity.tls: the suite the agent negotiates, TLS 1.3 only, no tickets) and a throwaway CA,
both ends through the agent's own switch (agent.proxy.kernel_leg), bytes both ways, then close_notify from one end
that the other must read as the end of the tunnel. A cheap first step (the "tls" ULP on a loopback socket) says at
once when the kernel has no kernel TLS at all, so a host without it pays about a millisecond at start.

``kernel_tls_for(setting)`` is what the composition root calls at start: off — user-space TLS, no probe; auto —
kernel TLS when the probe passes, otherwise user-space TLS and one log line saying why; on — kernel TLS, or
``KernelTlsUnavailable`` naming the field and the fix (the agent refuses to start).

Imports agent.proxy.kernel_tls, agent.proxy.kernel_leg and agent.identity (CA, SVID, TLS contexts: lazily, only
when the probe gets past the ULP step).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from datetime import datetime, timezone

from agent.errors import EnvironmentProblem
from agent.proxy.kernel_leg import KernelTls, KernelTlsLeg
from agent.proxy.kernel_tls import FIX, TCP_ULP, KernelTlsError, KeyLog

log = logging.getLogger("tcpmesh.kernel_tls")
PROBE_TRUST_DOMAIN = "kernel-tls-probe.invalid"
PROBE_TIMEOUT_SECONDS = 10.0  # two handshakes on loopback; generous for emulated VMs
PROBE_BYTES = 64 * 1024 + 7  # several records each way


class KernelTlsUnavailable(EnvironmentProblem):
    """proxy.kernel_tls is on and this host cannot run it."""


def ulp_problem() -> str | None:
    """None when the kernel takes the "tls" ULP on a loopback TCP connection; else why not."""
    with socket.create_server(("127.0.0.1", 0)) as server, \
            socket.create_connection(server.getsockname()[:2], timeout=2) as client:
        peer, _ = server.accept()  # kept open: the ULP needs an ESTABLISHED socket
        with peer:
            try:
                client.setsockopt(socket.IPPROTO_TCP, TCP_ULP, b"tls")
            except OSError as exc:
                return (f"setsockopt(TCP_ULP, \"tls\"): {exc.strerror}: this kernel offers no kernel TLS (CONFIG_TLS "
                        f"off, or the tls module is not loaded and cannot be)")
    return None


class _Collect:
    """A leg's receiver for the probe: what arrived, and whether the end came."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.ended = asyncio.get_running_loop().create_future()

    def leg_data(self, leg, data) -> None:
        self.data += data

    def leg_eof(self, leg) -> None:
        if not self.ended.done():
            self.ended.set_result("end")

    def leg_closed(self, leg, exc) -> None:
        if not self.ended.done():
            self.ended.set_result(f"lost: {exc}" if exc else "closed")

    def leg_pause_writing(self, leg) -> None:
        pass

    def leg_resume_writing(self, leg) -> None:
        pass


def probe_contexts():
    """(client context, server context, SNI): the tunnels' own TLS contexts (agent.identity.tls) for a throwaway
    identity of a throwaway CA, in memory."""
    from cryptography.hazmat.primitives.serialization import Encoding

    from agent.identity.ca import generate_ca
    from agent.identity.issue import issue_svid
    from agent.identity.spiffe import SpiffeId
    from agent.identity.tls import client_context, server_context

    now = datetime.now(timezone.utc)
    ca = generate_ca(PROBE_TRUST_DOMAIN, valid_days=1, now=now)
    spiffe_id = SpiffeId(PROBE_TRUST_DOMAIN, "probe", "probe")
    svid = issue_svid(ca, spiffe_id, 600, now=now, min_ttl_seconds=60)
    bundle = ca.certificate.public_bytes(Encoding.PEM)
    return client_context(svid, bundle), server_context(svid, bundle), spiffe_id.sni


async def loopback_pair(timeout: float = PROBE_TIMEOUT_SECONDS) -> str:
    """Run the switch on a loopback pair; the negotiated suite when every step held, else KernelTlsError/OSError."""
    from agent.identity.tls import ALPN
    client_ctx, server_ctx, sni = probe_contexts()
    keylog = KeyLog()
    kernel = KernelTls("probe", keylog, "probe")
    loop = asyncio.get_running_loop()
    accepted: asyncio.Future = loop.create_future()

    def server_leg():
        leg = kernel.leg(server_ctx, True)
        if not accepted.done():
            accepted.set_result(leg)
        return leg

    server = await loop.create_server(server_leg, "127.0.0.1", 0)
    legs: list = []
    try:
        port = server.sockets[0].getsockname()[1]
        _, client = await loop.create_connection(
            lambda: kernel.leg(client_ctx, False, sni), "127.0.0.1", port)
        legs.append(client)
        legs.append(await asyncio.wait_for(accepted, timeout))
        await asyncio.wait_for(asyncio.gather(*(leg.handshake_done for leg in legs)), timeout)
        for leg, side in zip(legs, ("client", "server")):
            if not isinstance(leg, KernelTlsLeg):
                raise KernelTlsError(f"the {side} end did not switch to kernel TLS")
            if leg.alpn != ALPN:
                raise KernelTlsError(f"the {side} end lost ALPN across the switch ({leg.alpn!r})")
        received = [_Collect(), _Collect()]
        for leg, receiver in zip(legs, received):
            leg.set_receiver(receiver)
        payloads = [bytes(range(256)) * (PROBE_BYTES // 256) + b"client", b"server" * (PROBE_BYTES // 6)]
        for leg, payload in zip(legs, payloads):
            leg.write(payload)
        deadline = loop.time() + timeout
        while (received[1].data != payloads[0] or received[0].data != payloads[1]) and loop.time() < deadline:
            if any(r.ended.done() for r in received):
                break
            await asyncio.sleep(0.005)
        if received[1].data != payloads[0] or received[0].data != payloads[1]:
            raise KernelTlsError(f"bytes did not cross intact (server read {len(received[1].data)} of "
                                 f"{len(payloads[0])}, client {len(received[0].data)} of {len(payloads[1])})")
        legs[0].write_eof()  # close_notify as an alert record: the server's kernel fails the read with EIO
        ending = await asyncio.wait_for(received[1].ended, timeout)
        if ending != "end":
            raise KernelTlsError(f"close_notify did not end the tunnel cleanly at the other end ({ending})")
        return legs[0].ssl_object.cipher()[0]
    finally:
        for leg in legs:
            leg.close()
        server.close()
        keylog.close()


async def probe() -> tuple[str | None, str]:
    """(None, what passed) or (why kernel TLS cannot run here, "")."""
    problem = ulp_problem()
    if problem is not None:
        return problem, ""
    try:
        suite = await loopback_pair()
    except (OSError, asyncio.TimeoutError, ValueError) as exc:
        return f"a loopback TLS 1.3 pair through the agent's switch failed: {exc or type(exc).__name__}", ""
    return None, (f"a loopback TLS 1.3 pair ({suite}) switched both ends, carried bytes both ways and ended with "
                  f"close_notify")


async def kernel_tls_for(setting: str) -> KernelTls:
    """The agent's kernel TLS for ``proxy.kernel_tls`` = ``setting`` (see the module docstring)."""
    if setting == "off":
        log.info("tunnels run user-space TLS (proxy.kernel_tls off)")
        return KernelTls.off()
    problem, passed = await probe()
    if problem is None:
        log.info("tunnels run kernel TLS (proxy.kernel_tls %s): %s", setting, passed)
        return KernelTls(setting, KeyLog(), f"the start-up probe passed: {passed}")
    if setting == "on":
        raise KernelTlsUnavailable(f"proxy.kernel_tls is on but this host cannot run kernel TLS: {problem}. Fix: {FIX}")
    log.warning("tunnels run user-space TLS (proxy.kernel_tls auto): %s", problem)
    return KernelTls(setting, None, f"the start-up probe failed: {problem}")
