"""Every capture mode offers the whole ``Capture`` interface, optional features declared (None), so the
composition root never probes with hasattr/getattr (agent/capture/interface.py)."""

from __future__ import annotations

import inspect

import pytest

from agent.capture.interface import Capture, EgressEvents, InboundEnforcement, NodeRefusals
from agent.capture.node_rules import NodeRules
from agent.capture.modes import ConnectMode, NoCapture
from agent.capture.tc_mode import TcCapture
from agent.capture.tproxy_mode import TproxyCapture

MODES = [NoCapture, ConnectMode, TcCapture, TproxyCapture]


def declared(protocol: type) -> tuple[set[str], set[str]]:
    """(attributes, methods) a Protocol declares."""
    attributes = set(inspect.get_annotations(protocol))
    methods = {name for name, value in vars(protocol).items() if inspect.isfunction(value) and not name.startswith("_")}
    return attributes, methods


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.__name__)
def test_every_mode_has_every_attribute_and_method_of_the_interface(mode):
    attributes, methods = declared(Capture)
    assert attributes == {"name", "listener", "inbound", "egress", "refusals"}
    missing = [a for a in attributes | methods if not hasattr(mode, a)]
    assert missing == [], f"{mode.__name__} lacks {missing}"
    for method in methods:
        wanted = list(inspect.signature(getattr(Capture, method)).parameters)
        assert list(inspect.signature(getattr(mode, method)).parameters) == wanted, f"{mode.__name__}.{method}"


def test_only_ebpf_connect_enforces_inbound_mode_in_the_kernel():
    _, methods = declared(InboundEnforcement)
    assert methods == {"set_inbound_mode", "plaintext"}
    assert all(callable(getattr(ConnectMode, m, None)) for m in methods)
    assert isinstance(inspect.getattr_static(ConnectMode, "inbound"), property)
    assert [m.__name__ for m in MODES if m.inbound is None] == ["NoCapture", "TcCapture", "TproxyCapture"]


def test_only_ebpf_connect_reports_connects_outside_the_mesh_from_the_kernel():
    _, methods = declared(EgressEvents)
    assert methods == {"egress_reader"}
    assert isinstance(inspect.getattr_static(ConnectMode, "egress"), property)
    assert [m.__name__ for m in MODES if m.egress is None] == ["NoCapture", "TcCapture", "TproxyCapture"]


def test_only_the_packet_level_modes_count_the_connections_their_node_table_resets():
    _, methods = declared(NodeRefusals)
    assert methods == {"read_refusals"} and callable(NodeRules.read_refusals)
    assert isinstance(inspect.getattr_static(TcCapture, "refusals"), property)
    assert isinstance(inspect.getattr_static(TproxyCapture, "refusals"), property)
    assert [m.__name__ for m in MODES if m.refusals is None] == ["NoCapture", "ConnectMode"]
