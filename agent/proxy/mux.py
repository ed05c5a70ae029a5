"""tcpmesh/2 framing: many application connections (streams) over one mTLS tunnel. Pure, sans-io.

    frame = type:u8 flags:u8 reserved:u16 stream:u32 length:u32 payload[length]      (12-byte header)

| type | name   | payload                                   | direction |
|------|--------|-------------------------------------------|-----------|
| 1    | OPEN   | CONNECT TLV body (agent.proxy.header)     | client → server, new odd stream id |
| 2    | STATUS | status:u8 reason                          | server → client, once per stream, before DATA |
| 3    | DATA   | application bytes                         | both |
| 4    | FIN    | —  (sender will send no more DATA)        | both |
| 5    | RST    | reason (utf-8)                            | both; the stream is gone |
| 6    | WINDOW | credit:u32 (bytes the sender may add)     | both |
| 7    | GOAWAY | reason (utf-8); no new streams            | both |

Each stream starts with ``INITIAL_WINDOW`` bytes of credit in each direction; a receiver returns
credit (WINDOW) as it delivers data onward, so one slow application cannot stall the tunnel.
``FrameDecoder`` bounds every frame (``MAX_FRAME``) and rejects unknown types.
"""

from __future__ import annotations

import enum
import ssl
import struct
from typing import NamedTuple

from agent.proxy import hotpath

HEADER = struct.Struct("!BBHII")
HEADER_SIZE = HEADER.size
MAX_FRAME = 1024 * 1024
MAX_CONTROL_PAYLOAD = 1024
INITIAL_WINDOW = 4 * 1024 * 1024
MAX_STREAM_ID = 0xFFFFFFFF


class FrameType(enum.IntEnum):
    OPEN = 1
    STATUS = 2
    DATA = 3
    FIN = 4
    RST = 5
    WINDOW = 6
    GOAWAY = 7


_FRAME_TYPES = {t.value: t for t in FrameType}  # a dict lookup: FrameType(n) costs ~0.5 us per frame


class MuxProtocolError(Exception):
    """The peer sent a frame that breaks tcpmesh/2 (the whole tunnel is closed)."""


class Frame(NamedTuple):  # a tuple: cheap to make (here and in agent/proxy/_hotpath.c), once per frame
    type: FrameType
    stream: int
    payload: bytes = b""


def encode_header(frame_type: FrameType, stream: int, length: int) -> bytes:
    return HEADER.pack(frame_type, 0, 0, stream, length)


def encode(frame_type: FrameType, stream: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(frame_type, 0, 0, stream, len(payload)) + payload


def encode_window(stream: int, credit: int) -> bytes:
    return encode(FrameType.WINDOW, stream, struct.pack("!I", credit))


def window_credit(frame: Frame) -> int:
    if len(frame.payload) != 4:
        raise MuxProtocolError(f"WINDOW frame on stream {frame.stream} has {len(frame.payload)} payload bytes, not 4")
    credit = struct.unpack("!I", frame.payload)[0]
    if credit == 0:
        raise MuxProtocolError(f"WINDOW frame on stream {frame.stream} grants no credit")
    return credit


class PyFrameDecoder:
    """Accumulates bytes and returns complete frames; bounded by MAX_FRAME per frame.

    ``feed`` returns whole frames. ``feed_parts`` (the tunnel's receive path) returns a DATA frame's
    payload in parts, as its bytes arrive — consecutive ``Frame``s of the same stream, together the
    payload — each a ``memoryview`` of ``data`` (which may be a reused buffer's view: valid only until
    the caller's buffer is reused, so whoever keeps a part copies it), never copied nor accumulated
    here. Control frames come whole, as bytes, either way. Use one method per decoder.

    The reference implementation: ``agent.proxy._hotpath.FrameDecoder`` is its compiled twin (same
    frames, limits and errors); ``FrameDecoder`` is whichever ``agent.proxy.hotpath`` chose.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._data_stream = 0
        self._data_left = 0  # feed_parts: payload bytes of the current DATA frame still to come

    def feed(self, data: bytes) -> list[Frame]:
        buffer = self._buffer
        if not buffer and len(data) >= HEADER_SIZE:
            return self._feed_fast(data)
        buffer += data
        frames, consumed = _parse(buffer)
        del buffer[:consumed]
        return frames

    def _feed_fast(self, data: bytes) -> list[Frame]:
        """Common case: parse straight from ``data`` and keep only the incomplete tail."""
        frames, consumed = _parse(data)
        if consumed < len(data):
            self._buffer += data[consumed:]
        return frames

    def feed_parts(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        frames: list[Frame] = []
        view = memoryview(data)
        buffer = self._buffer
        pos, end = 0, len(view)
        while True:
            if self._data_left:
                if pos == end:
                    break
                take = min(self._data_left, end - pos)
                frames.append(Frame(FrameType.DATA, self._data_stream, view[pos:pos + take]))
                self._data_left -= take
                pos += take
                continue
            if buffer:  # a header (or a control frame) begun in an earlier call
                if len(buffer) < HEADER_SIZE:
                    take = min(HEADER_SIZE - len(buffer), end - pos)
                    buffer += view[pos:pos + take]
                    pos += take
                    if len(buffer) < HEADER_SIZE:
                        break
                kind, stream, length = _check_header(buffer, 0)
                if kind is FrameType.DATA:
                    buffer.clear()
                    self._start_data(stream, length, frames)
                    continue
                take = min(HEADER_SIZE + length - len(buffer), end - pos)
                buffer += view[pos:pos + take]
                pos += take
                if len(buffer) < HEADER_SIZE + length:
                    break
                frames.append(Frame(kind, stream, bytes(buffer[HEADER_SIZE:])))
                buffer.clear()
                continue
            if end - pos < HEADER_SIZE:
                buffer += view[pos:end]
                break
            kind, stream, length = _check_header(view, pos)
            start = pos + HEADER_SIZE
            if kind is FrameType.DATA:
                pos = start
                self._start_data(stream, length, frames)
                continue
            if end - start < length:
                buffer += view[pos:end]
                break
            frames.append(Frame(kind, stream, bytes(view[start:start + length])))
            pos = start + length
        return frames

    def _start_data(self, stream: int, length: int, frames: list[Frame]) -> None:
        self._data_stream, self._data_left = stream, length
        if length == 0:
            frames.append(Frame(FrameType.DATA, stream, b""))

    @property
    def pending(self) -> int:
        """Bytes received but not yet returned (for ``feed_parts``: also the rest of a DATA frame to come)."""
        return len(self._buffer)

    @property
    def in_data(self) -> bool:
        """``feed_parts``: in the middle of a DATA frame's payload."""
        return self._data_left > 0


def _check_header(data, offset: int) -> tuple[FrameType, int, int]:
    frame_type, _flags, _reserved, stream, length = HEADER.unpack_from(data, offset)
    if length > MAX_FRAME:
        raise MuxProtocolError(f"frame of {length} bytes on stream {stream} exceeds the limit of {MAX_FRAME}")
    kind = _FRAME_TYPES.get(frame_type)
    if kind is None:
        raise MuxProtocolError(f"unknown frame type {frame_type} on stream {stream}")
    if kind is not FrameType.DATA and length > MAX_CONTROL_PAYLOAD:
        raise MuxProtocolError(f"{kind.name} frame of {length} bytes exceeds {MAX_CONTROL_PAYLOAD}")
    if stream == 0 and kind is not FrameType.GOAWAY:
        raise MuxProtocolError(f"{kind.name} frame on stream 0")
    return kind, stream, length


def _parse(data: bytes | bytearray) -> tuple[list[Frame], int]:
    frames: list[Frame] = []
    offset = 0
    end = len(data)
    view = memoryview(data)
    while end - offset >= HEADER_SIZE:
        kind, stream, length = _check_header(data, offset)
        start = offset + HEADER_SIZE
        if end - start < length:
            break
        frames.append(Frame(kind, stream, bytes(view[start:start + length])))
        offset = start + length
    view.release()
    return frames, offset


DECODERS: dict[str, type] = {"python": PyFrameDecoder}  # every implementation (tests run each)
if hotpath.built is not None:
    hotpath.built.configure(Frame, list(FrameType), MuxProtocolError, ssl.SSLWantReadError,
                               ssl.SSLZeroReturnError, MAX_FRAME, MAX_CONTROL_PAYLOAD)
    DECODERS["compiled"] = hotpath.built.FrameDecoder
FrameDecoder = DECODERS[hotpath.name()]
