"""Capture frames on an interface inside a lab namespace (AF_PACKET), and parse IPv4/TCP out of them.

Used by tests to prove what crosses the wire (e.g. that a tunnel carries TLS, not plaintext) without
tcpdump. Capture on a bridge *port* (``tm<node>`` in the wire netns), not on the bridge itself:
frames forwarded between ports never reach the bridge device. ``PacketCapture`` opens its socket inside the netns via ``nsenter.socket_in_netns`` and reads
on a background thread until stopped. ``parse_tcp`` is pure.
"""

from __future__ import annotations

import socket
import struct
import threading
from dataclasses import dataclass

from agent.lab.nsenter import run_in_netns

ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800
_ETH_HEADER = 14
MAX_FRAMES = 100_000


@dataclass(frozen=True)
class TcpSegment:
    src: str
    dst: str
    sport: int
    dport: int
    flags: int
    payload: bytes


def parse_tcp(frame: bytes) -> TcpSegment | None:
    """The TCP segment in an Ethernet frame, or None if the frame is not IPv4/TCP."""
    if len(frame) < _ETH_HEADER + 20 or struct.unpack("!H", frame[12:14])[0] != ETH_P_IP:
        return None
    ip = frame[_ETH_HEADER:]
    ihl = (ip[0] & 0x0F) * 4
    if ip[0] >> 4 != 4 or ip[9] != socket.IPPROTO_TCP or len(ip) < ihl + 20:
        return None
    total = struct.unpack("!H", ip[2:4])[0]
    tcp = ip[ihl:total]
    if len(tcp) < 20:
        return None
    sport, dport = struct.unpack("!HH", tcp[:4])
    offset = (tcp[12] >> 4) * 4
    return TcpSegment(socket.inet_ntoa(ip[12:16]), socket.inet_ntoa(ip[16:20]), sport, dport, tcp[13],
                      bytes(tcp[offset:]))


class PacketCapture:
    """Frames seen on ``ifname`` in ``netns`` (both directions). Use as a context manager::

        with PacketCapture("tcpmesh-demo-wire", "tmnode1") as cap:   # node1's port on the wire bridge
            ...
        payload = b"".join(s.payload for s in cap.tcp_segments() if s.dport == 15008)
    """

    def __init__(self, netns: str, ifname: str) -> None:
        self.netns = netns
        self.ifname = ifname
        self.frames: list[bytes] = []
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def start(self) -> "PacketCapture":
        def open_socket() -> socket.socket:
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            sock.bind((self.ifname, 0))  # the interface name is resolved in this thread's netns
            return sock

        self._sock = run_in_netns(self.netns, open_socket)
        self._sock.settimeout(0.1)
        self._thread = threading.Thread(target=self._read, name=f"capture:{self.ifname}", daemon=True)
        self._thread.start()
        return self

    def _read(self) -> None:
        assert self._sock is not None
        while True:
            try:
                frame = self._sock.recv(65535)
            except socket.timeout:
                if self._stop.is_set():  # stop only once the socket buffer is drained
                    return
                continue
            except OSError:
                return
            if len(self.frames) < MAX_FRAMES:
                self.frames.append(frame)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def tcp_segments(self) -> list[TcpSegment]:
        return [seg for seg in map(parse_tcp, list(self.frames)) if seg is not None]

    def __enter__(self) -> "PacketCapture":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
