"""The library's own greeting and negotiation (qmpshutdown._greeting), over socketpairs."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time

import anyio
import pytest

from qmpshutdown._errors import CommandError, MonitorClosedError
from qmpshutdown._greeting import CAPABILITIES, FIRST_ID, first_commands, negotiate, take_replies
from qmpshutdown._monitor import HandshakeFailed, HandshakeTimeout


def line(msg: object) -> bytes:
    return json.dumps(msg).encode() + b"\r\n"


def event(name: str, **data: object) -> bytes:
    stamp = {"seconds": 1, "microseconds": 2}
    return line({"timestamp": stamp, "event": name, **({"data": data} if data else {})})


GREETING = line({"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}},
                         "capabilities": []}})  # fmt: skip
MIGRATION = event("MIGRATION", status="setup")
RESUME = event("RESUME")
OK = line({"return": {}})
AFTER = event("SHUTDOWN")



def qemu_like(
    before: list[bytes], reply: bytes | None, after: bytes = b""
) -> tuple[socket.socket, list[bytes]]:
    """Our end of a socketpair whose other end sends *before*, reads the capabilities
    command, then sends *reply* + *after* at once (None: says nothing more) and holds on."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    heard: list[bytes] = []

    def serve() -> None:
        with theirs, contextlib.suppress(OSError):  # our end may close first
            for chunk in before:
                theirs.sendall(chunk)
                time.sleep(0.01)  # separate reads on our side
            theirs.settimeout(5)
            heard.append(theirs.recv(4096))
            if reply is not None:
                theirs.sendall(reply + after)
            theirs.recv(1)  # until our end closes

    threading.Thread(target=serve, daemon=True).start()
    return ours, heard


@pytest.mark.asyncio
async def test_a_greeting_then_the_reply_negotiates_and_nothing_after_it_is_taken() -> None:
    sock, heard = qemu_like([GREETING], OK, AFTER)
    with sock:
        with anyio.fail_after(3):
            early = await negotiate(sock, anyio.current_time() + 2)
        assert early == []
        assert heard == [CAPABILITIES]
        await anyio.sleep(0.05)
        assert sock.recv(4096) == AFTER  # left for qemu.qmp's reader


@pytest.mark.asyncio
async def test_events_before_the_greeting_are_kept_in_order() -> None:
    # QEMU 7.2 loading a state (-incoming) sent MIGRATION to a new connection first.
    sock, heard = qemu_like([MIGRATION, RESUME, GREETING], OK)
    with sock, anyio.fail_after(3):
        early = await negotiate(sock, anyio.current_time() + 2)
    assert [msg["event"] for msg in early] == ["MIGRATION", "RESUME"]
    assert early[0]["data"] == {"status": "setup"}
    assert heard == [CAPABILITIES]


@pytest.mark.asyncio
async def test_a_greeting_split_across_reads_is_one_line() -> None:
    cut = len(GREETING) // 3
    sock, _ = qemu_like([GREETING[:cut], GREETING[cut : 2 * cut], GREETING[2 * cut :]], OK)
    with sock, anyio.fail_after(3):
        assert await negotiate(sock, anyio.current_time() + 2) == []


@pytest.mark.asyncio
async def test_a_refused_negotiation_says_so() -> None:
    refused = b'{"error": {"class": "CommandNotFound", "desc": "nope"}}\r\n'
    sock, _ = qemu_like([GREETING], refused)
    with sock, pytest.raises(HandshakeFailed, match=r"qmp_capabilities\) failed: nope"):
        await negotiate(sock, anyio.current_time() + 2)


@pytest.mark.asyncio
async def test_no_reply_is_a_timeout_by_the_deadline() -> None:
    sock, _ = qemu_like([GREETING], None)
    started = time.monotonic()
    with sock, pytest.raises(HandshakeTimeout, match="negotiation"):
        await negotiate(sock, anyio.current_time() + 0.3)
    assert time.monotonic() - started < 2


@pytest.mark.asyncio
async def test_a_reply_before_any_greeting_is_not_qmp() -> None:
    sock, _ = qemu_like([OK], OK)
    with sock, pytest.raises(HandshakeFailed, match="before any greeting"):
        await negotiate(sock, anyio.current_time() + 2)


@pytest.mark.asyncio
async def test_half_a_greeting_then_a_hang_up_is_not_qmp() -> None:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.sendall(GREETING[:20])
    theirs.close()
    with ours, pytest.raises(HandshakeFailed, match="not a QMP monitor: the peer hung up mid-line"):
        await negotiate(ours, anyio.current_time() + 2)


@pytest.mark.asyncio
async def test_a_line_that_is_not_a_json_object_is_shown() -> None:
    sock, _ = qemu_like([b"[1, 2]\r\n"], OK)
    with sock, pytest.raises(HandshakeFailed, match=r"it says '\[1, 2\]'"):
        await negotiate(sock, anyio.current_time() + 2)


@pytest.mark.asyncio
async def test_a_line_over_the_limit_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("qmpshutdown._greeting.LINE_LIMIT", 1000)
    long = b'{"QMP": "' + b"x" * 5000 + b'"}\r\n'
    sock, _ = qemu_like([long], OK)
    with sock, pytest.raises(HandshakeFailed, match="over the 1000 byte limit"):
        await negotiate(sock, anyio.current_time() + 2)


def test_the_capabilities_command_is_what_qemu_expects() -> None:
    assert json.loads(CAPABILITIES) == {"execute": "qmp_capabilities"}


def test_what_goes_before_the_press_is_as_short_as_qemu_reads_it() -> None:
    # QEMU reads its monitor a byte per turn of its main loop (benchmarks/qmp_bytes.py):
    # no spaces, short ids: 138 bytes (the first version of this handshake wrote 179).
    first = first_commands([("query-status", None), ("set-action", {"reboot": "shutdown"})])
    sent = CAPABILITIES + first
    assert b" " not in sent and len(sent) == 138
    messages = first.replace(b"}{", b"}\n{").splitlines()
    assert [json.loads(msg)["id"] for msg in messages] == ["qsd0", "qsd1"]


# ---- the first commands, sent with the capabilities ------------------------------------

STATUS = [("query-status", None)]
QUERY_STATUS = first_commands(STATUS)
ARRIVAL_ID = FIRST_ID.format(0)


def status_reply(result: object = None, *, id_: str = ARRIVAL_ID, error: bool = False) -> bytes:
    if error:
        return line({"error": {"class": "GenericError", "desc": "no"}, "id": id_})
    return line({"return": result or {"status": "running", "running": True}, "id": id_})


async def ask(sock: socket.socket, within: float) -> tuple[list[object], object]:
    early = await negotiate(sock, anyio.current_time() + 2, STATUS)
    [answer] = await take_replies(sock, ["query-status"], anyio.current_time() + within, early)
    return list(early), answer


@pytest.mark.asyncio
async def test_query_status_goes_with_the_capabilities_and_its_reply_is_taken() -> None:
    sock, heard = qemu_like([GREETING], OK + RESUME + status_reply(), AFTER)
    with sock:
        with anyio.fail_after(3):
            early, answer = await ask(sock, 1.0)
        assert heard == [CAPABILITIES + QUERY_STATUS]  # one write: one round trip
        assert json.loads(QUERY_STATUS) == {"execute": "query-status", "id": ARRIVAL_ID}
        assert answer == {"status": "running", "running": True}
        assert [msg["event"] for msg in early] == ["RESUME"]  # read on the way, kept
        await anyio.sleep(0.05)
        assert sock.recv(4096) == AFTER  # not a byte past the reply


@pytest.mark.asyncio
async def test_without_first_commands_nothing_more_is_sent() -> None:
    sock, heard = qemu_like([GREETING], OK)
    with sock, anyio.fail_after(3):
        assert await negotiate(sock, anyio.current_time() + 2) == []
    assert heard == [CAPABILITIES]


@pytest.mark.asyncio
async def test_an_error_reply_is_a_command_error() -> None:
    sock, _ = qemu_like([GREETING], OK + status_reply(error=True))
    with sock, anyio.fail_after(3):
        _, answer = await ask(sock, 1.0)
    assert isinstance(answer, CommandError) and answer.error_class == "GenericError"


@pytest.mark.asyncio
async def test_no_reply_in_time_is_a_timeout_and_a_reply_cut_short_stays_whole() -> None:
    # Half the reply has come when the bound is up: none of it is taken (qemu.qmp's reader
    # must see a whole line), and the negotiation itself stands.
    half = status_reply()[:20]
    sock, _ = qemu_like([GREETING], OK + half)
    started = time.monotonic()
    with sock:
        with anyio.fail_after(3):
            early, answer = await ask(sock, 0.2)
        assert isinstance(answer, TimeoutError) and early == []
        assert 0.15 < time.monotonic() - started < 1.5
        assert sock.recv(4096) == half


@pytest.mark.asyncio
async def test_a_reply_with_another_id_is_dropped_as_qemu_qmp_would() -> None:
    sock, _ = qemu_like([GREETING], OK + status_reply(id_="someone-else"))
    with sock, anyio.fail_after(3):
        _, answer = await ask(sock, 0.2)
    assert isinstance(answer, TimeoutError)


@pytest.mark.asyncio
async def test_a_hang_up_before_the_reply_is_a_closed_monitor_not_a_failed_handshake() -> None:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)

    def serve() -> None:
        with theirs, contextlib.suppress(OSError):
            theirs.sendall(GREETING)
            theirs.recv(4096)
            theirs.sendall(OK)  # then QEMU exits

    threading.Thread(target=serve, daemon=True).start()
    with ours, anyio.fail_after(3):
        _, answer = await ask(ours, 1.0)
    assert isinstance(answer, MonitorClosedError) and "hung up" in str(answer)


@pytest.mark.asyncio
async def test_a_first_reply_that_is_not_json_is_not_a_qmp_monitor() -> None:
    sock, _ = qemu_like([GREETING], OK + b'{"return": {"status": "running", \r\n')
    with sock, pytest.raises(HandshakeFailed, match="not a QMP monitor: it says"):
        await ask(sock, 1.0)


@pytest.mark.asyncio
async def test_two_first_commands_go_in_one_write_and_their_replies_are_taken_in_order() -> None:
    first = [("query-status", None), ("set-action", {"reboot": "shutdown"})]
    replies = status_reply() + line({"return": {}, "id": FIRST_ID.format(1)})
    sock, heard = qemu_like([GREETING], OK + replies, AFTER)
    with sock:
        with anyio.fail_after(3):
            early = await negotiate(sock, anyio.current_time() + 2, first)
            names = [name for name, _ in first]
            answers = await take_replies(sock, names, anyio.current_time() + 1, early)
        assert answers == [{"status": "running", "running": True}, {}]
        sent = heard[0].removeprefix(CAPABILITIES).replace(b"}{", b"}\n{").splitlines()
        assert [json.loads(msg) for msg in sent] == [
            {"execute": "query-status", "id": FIRST_ID.format(0)},
            {"execute": "set-action", "id": FIRST_ID.format(1), "arguments": first[1][1]},
        ]
        await anyio.sleep(0.05)
        assert sock.recv(4096) == AFTER


@pytest.mark.asyncio
async def test_when_the_first_reply_is_late_the_later_ones_are_late_too() -> None:
    sock, _ = qemu_like([GREETING], OK)
    with sock, anyio.fail_after(3):
        early = await negotiate(sock, anyio.current_time() + 2, [("query-status", None)] * 2)
        answers = await take_replies(sock, ["query-status", "x"], anyio.current_time() + 0.2, early)
    assert [type(answer) for answer in answers] == [TimeoutError, TimeoutError]


@pytest.mark.asyncio
async def test_the_handshake_is_in_the_debug_log_as_qemu_qmp_logs_the_session(caplog) -> None:
    caplog.set_level("DEBUG", logger="qmpshutdown._greeting")
    sock, _ = qemu_like([GREETING], OK + status_reply())
    with sock, anyio.fail_after(3):
        await ask(sock, 1.0)
    said = [record.getMessage() for record in caplog.records]
    assert said[0].startswith('<-- {"QMP"')
    assert said[1] == "--> " + (CAPABILITIES + QUERY_STATUS).decode()
    assert said[2:] == ["<-- " + OK.decode().strip(), "<-- " + status_reply().decode().strip()]
