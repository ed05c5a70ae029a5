"""The steady-state fields of the data path's objects, as the base classes that hold them.

A relay leg's byte counts and end-of-stream flags, a stream's window and credit, a relay's legs and
direction counts and a session's tunnel are read and written on every message. They live in fixed slots
of a base class — ``Leg(LegCore, ...)``, ``PlainLeg(Leg, PlainCore)``, ``TlsLeg(Leg, TlsCore)``,
``Stream(Leg, StreamCore)``, ``Relay(RelayCore)``, ``MuxSession(SessionCore)`` — so the compiled relay steps
(agent/proxy/_hotpath.c) read them as C struct fields, with no attribute lookup, while Python reads and
writes them as ordinary attributes. Two implementations with the same fields (tests/unit/test_hotpath.py
checks they match): the compiled module's core types (``T_OBJECT_EX`` members, exactly ``__slots__``)
when ``agent.proxy.hotpath`` chose it, else the pure-Python classes below, which are the reference.

Imports nothing of tcpmesh but agent.proxy.hotpath.
"""

from __future__ import annotations

from agent.proxy import hotpath

LEG_FIELDS = ("transport", "receiver", "bytes_read", "bytes_written", "peer_eof", "eof_sent")
PLAIN_FIELDS = ("_fd",)  # a field of its own: PlainLeg's layout base is then PlainCore (the steps check it)
TLS_FIELDS = ("_sslobj", "_incoming", "_outgoing")
STREAM_FIELDS = ("session", "id", "send_window", "_queued", "_writer_blocked", "_reading_paused", "_unreturned",
                 "_finished", "_sink", "_debt", "_threshold")
RELAY_FIELDS = ("a", "b", "_a_to_b", "_b_to_a")
SESSION_FIELDS = ("tls", "tunnel_blocked")


class PyLegCore:
    __slots__ = LEG_FIELDS


class PyPlainCore(PyLegCore):
    __slots__ = PLAIN_FIELDS


class PyTlsCore(PyLegCore):
    __slots__ = TLS_FIELDS


class PyStreamCore(PyLegCore):
    __slots__ = STREAM_FIELDS


class PyRelayCore:
    __slots__ = RELAY_FIELDS


class PySessionCore:
    __slots__ = SESSION_FIELDS


PYTHON = {"LegCore": PyLegCore, "PlainCore": PyPlainCore, "TlsCore": PyTlsCore, "StreamCore": PyStreamCore,
          "RelayCore": PyRelayCore, "SessionCore": PySessionCore}
FIELDS = {"LegCore": LEG_FIELDS, "PlainCore": PLAIN_FIELDS, "TlsCore": TLS_FIELDS, "StreamCore": STREAM_FIELDS,
          "RelayCore": RELAY_FIELDS, "SessionCore": SESSION_FIELDS}  # each core's own fields (beyond its base's)

_cores = hotpath.compiled  # the compiled module when chosen (TCPMESH_HOTPATH), else None
LegCore = _cores.LegCore if _cores else PyLegCore
PlainCore = _cores.PlainCore if _cores else PyPlainCore
TlsCore = _cores.TlsCore if _cores else PyTlsCore
StreamCore = _cores.StreamCore if _cores else PyStreamCore
RelayCore = _cores.RelayCore if _cores else PyRelayCore
SessionCore = _cores.SessionCore if _cores else PySessionCore
