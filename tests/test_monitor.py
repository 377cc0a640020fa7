"""The monitor seam over qemu.qmp: a caller's client keeps only its latest events."""

from __future__ import annotations

import json
import socket
import threading

import anyio
import pytest

from qmpshutdown import Monitor
from qmpshutdown._connect import connect_client
from qmpshutdown._events import EVENTS_KEPT, RecentEvents, event_record
from qmpshutdown._monitor import QMPMonitor, _Client


def message(n: int) -> dict[str, object]:
    return {
        "event": "RTC_CHANGE",
        "data": {"offset": n},
        "timestamp": {"seconds": n, "microseconds": 0},
    }


@pytest.mark.asyncio
async def test_a_long_lived_client_keeps_a_bounded_event_history() -> None:
    listener = RecentEvents(limit=10)
    for n in range(1000):
        await listener.put(message(n))  # type: ignore[arg-type]
    assert len(listener.history) == 10
    pending = listener.clear()
    assert [m["data"]["offset"] for m in pending] == list(range(990, 1000))


@pytest.mark.asyncio
async def test_the_client_replaces_qemu_qmps_unbounded_default_listener() -> None:
    client = _Client("test")
    assert isinstance(client.events, RecentEvents)
    assert client.events.limit == EVENTS_KEPT
    assert client._listeners == [client.events]  # the default one is gone


def test_qmp_monitor_implements_the_seam() -> None:
    assert issubclass(QMPMonitor, Monitor)


def test_event_record_reads_qemus_timestamp() -> None:
    record = event_record(message(5))
    assert (record.event, record.timestamp, dict(record.data)) == ("RTC_CHANGE", 5.0, {"offset": 5})
    assert event_record({"event": "STOP", "timestamp": "bogus"}).timestamp == 0.0


def _serve_then_vanish(sock: socket.socket, go: threading.Event) -> None:
    """A QEMU in miniature: greet, negotiate, then (on *go*) send its last events and exit."""
    greeting = {"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""},
                        "capabilities": []}}  # fmt: skip
    sock.sendall(json.dumps(greeting).encode() + b"\n")
    request = json.loads(sock.recv(65536))
    sock.sendall(json.dumps({"return": {}, "id": request.get("id")}).encode() + b"\n")
    go.wait(10)
    stamp = {"seconds": 1, "microseconds": 0}
    for event in ({"event": "POWERDOWN", "timestamp": stamp},
                  {"event": "SHUTDOWN", "data": {"guest": True, "reason": "guest-shutdown"},
                   "timestamp": stamp}):  # fmt: skip
        sock.sendall(json.dumps(event).encode() + b"\n")
    sock.close()


@pytest.mark.asyncio
async def test_events_sent_before_an_exit_survive_a_write_that_meets_epipe() -> None:
    # The race the long-run benchmark found: a command written to a QEMU that has just
    # exited fails with EPIPE, and asyncio drops the connection with its last events unread.
    ours, theirs = socket.socketpair()
    go = threading.Event()
    server = threading.Thread(target=_serve_then_vanish, args=(theirs, go))
    server.start()
    try:
        client = await connect_client(ours, 5.0, "vanishing")
        monitor = QMPMonitor(client, ours, owned=True)
        go.set()
        server.join(10)  # it sent its events and is gone; the loop has not read them
        client._writer.write(b'{"execute": "query-status"}\n')  # EPIPE, as a command would
        with anyio.fail_after(5):
            await monitor.wait_closed()
        assert [e.event for e in monitor.pending_events()] == ["POWERDOWN", "SHUTDOWN"]
        await monitor.close()
        assert monitor._spare is None  # the spare descriptor is closed
    finally:
        go.set()
        server.join(10)
        ours.close()


def test_a_stop_formats_no_traceback_for_qemu_hanging_up(fakes, monkeypatch):
    # qemu.qmp formats a whole traceback for a DEBUG line when it closes a stream QEMU
    # already hung up, DEBUG on or off; our client closes it the same way without one.
    import qemu.qmp.protocol

    import qmpshutdown

    formatted: list[str] = []

    def counting(prefix: str = "  | ") -> str:
        formatted.append(prefix)
        return ""

    monkeypatch.setattr(qemu.qmp.protocol, "pretty_traceback", counting)
    (path,) = fakes(1)
    result = qmpshutdown.shutdown_sync(path)
    assert result.graceful
    assert formatted == []
