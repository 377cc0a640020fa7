"""The monitor seam over qemu.qmp: a caller's client keeps only its latest events."""

from __future__ import annotations

import pytest

from qmpshutdown import Monitor
from qmpshutdown._monitor import EVENTS_KEPT, QMPMonitor, _Client, _RecentEvents, event_record


def message(n: int) -> dict[str, object]:
    return {
        "event": "RTC_CHANGE",
        "data": {"offset": n},
        "timestamp": {"seconds": n, "microseconds": 0},
    }


@pytest.mark.asyncio
async def test_a_long_lived_client_keeps_a_bounded_event_history() -> None:
    listener = _RecentEvents(limit=10)
    for n in range(1000):
        await listener.put(message(n))  # type: ignore[arg-type]
    assert len(listener.history) == 10
    pending = listener.clear()
    assert [m["data"]["offset"] for m in pending] == list(range(990, 1000))


@pytest.mark.asyncio
async def test_the_client_replaces_qemu_qmps_unbounded_default_listener() -> None:
    client = _Client("test")
    assert isinstance(client.events, _RecentEvents)
    assert client.events.limit == EVENTS_KEPT
    assert client._listeners == [client.events]  # the default one is gone


def test_qmp_monitor_implements_the_seam() -> None:
    assert issubclass(QMPMonitor, Monitor)


def test_event_record_reads_qemus_timestamp() -> None:
    record = event_record(message(5))
    assert (record.event, record.timestamp, dict(record.data)) == ("RTC_CHANGE", 5.0, {"offset": 5})
    assert event_record({"event": "STOP", "timestamp": "bogus"}).timestamp == 0.0
