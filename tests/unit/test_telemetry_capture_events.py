"""The capture-events collector: one sample per kernel reason, labelled by mode; nothing on a failed read."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from agent.telemetry.capture_events import CaptureEventsCollector


def scrape(read) -> str:
    registry = CollectorRegistry()
    registry.register(CaptureEventsCollector("ebpf-connect", read))
    return generate_latest(registry).decode()


def test_every_reason_is_a_sample_with_the_mode():
    text = scrape(lambda: {"captured": 7, "guard_denied": 2})
    assert 'tcpmesh_capture_events_total{mode="ebpf-connect",reason="captured"} 7.0' in text
    assert 'tcpmesh_capture_events_total{mode="ebpf-connect",reason="guard_denied"} 2.0' in text


def test_a_failed_or_partial_read_emits_no_sample_and_the_scrape_still_answers():
    def broken():
        raise OSError(9, "Bad file descriptor")

    for read in (broken, lambda: {}):
        text = scrape(read)
        assert "tcpmesh_capture_events_total{" not in text
        assert "# TYPE tcpmesh_capture_events_total counter" in text
