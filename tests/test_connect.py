"""Reaching a monitor: a peer that says nothing is not one that says something other than QMP."""

from __future__ import annotations

import socket
import threading

import anyio
import pytest

from qmpshutdown import ConnectError
from qmpshutdown._connect import connect_socket, first_words, format_address, open_client
from qmpshutdown._monitor import HandshakeFailed, HandshakeTimeout

HMP_GREETING = b"QEMU 7.2.22 monitor - type 'help' for more information\r\n(qemu) "


def peer(says: bytes | None) -> socket.socket:
    """Our end of a socketpair whose other end says *says* (None: silence; b"": hangs up)."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    if says is None:
        threading.Timer(5.0, theirs.close).start()
    else:
        if says:
            theirs.sendall(says)
        theirs.close()
    return ours


@pytest.mark.asyncio
async def test_a_qmp_greeting_passes_and_nothing_is_read() -> None:
    with peer(b'{"QMP": {"version": {}}}\r\n') as sock:
        await first_words(sock, 1.0)
        assert sock.recv(7) == b'{"QMP":'  # peeked, not taken


@pytest.mark.asyncio
async def test_qemus_human_monitor_is_named_as_such() -> None:
    with peer(HMP_GREETING) as sock, pytest.raises(HandshakeFailed, match=r"human monitor \(HMP\)"):
        await first_words(sock, 1.0)


@pytest.mark.asyncio
async def test_other_text_is_not_qmp_and_says_what_it_said() -> None:
    says = r"not a QMP monitor: it says 'SSH-2\.0"
    with peer(b"SSH-2.0-OpenSSH_9.2\r\n") as sock, pytest.raises(HandshakeFailed, match=says):
        await first_words(sock, 1.0)


@pytest.mark.asyncio
async def test_a_peer_that_hangs_up_is_not_a_hung_qemu() -> None:
    with peer(b"") as sock, pytest.raises(HandshakeFailed, match="hung up"):
        await first_words(sock, 1.0)


@pytest.mark.asyncio
async def test_silence_is_a_timeout_within_the_limit() -> None:
    with peer(None) as sock, pytest.raises(HandshakeTimeout):
        with anyio.fail_after(2.0):
            await first_words(sock, 0.2)


@pytest.mark.asyncio
async def test_connecting_to_nothing_is_a_connect_error(tmp_path) -> None:
    with pytest.raises(ConnectError, match="No such file"):
        await connect_socket(str(tmp_path / "missing.sock"), 1.0)


@pytest.mark.asyncio
async def test_open_client_waits_for_the_socket_then_gives_up(tmp_path) -> None:
    # launch(): QEMU creates its socket a moment after it starts; never, here.
    with anyio.fail_after(3.0), pytest.raises(ConnectError, match="No such file"):
        await open_client(str(tmp_path / "later.sock"), 0.3)


def test_format_address() -> None:
    assert format_address("/run/vm.sock") == "/run/vm.sock"
    assert format_address(("127.0.0.1", 4444)) == "127.0.0.1:4444"
    assert format_address(("::1", 4444)) == "[::1]:4444"


@pytest.mark.asyncio
async def test_a_full_backlog_is_waited_for_and_the_wait_is_bounded(tmp_path) -> None:
    # QEMU listens with a backlog of 1: a second client waits until the first is accepted.
    path = str(tmp_path / "qmp.sock")
    with socket.socket(socket.AF_UNIX) as server, socket.socket(socket.AF_UNIX) as first:
        server.bind(path)
        server.listen(0)
        first.connect(path)  # fills the backlog
        with pytest.raises(ConnectError, match=r"no connection within 0\.2 s"):
            await connect_socket(path, 0.2)
        accepted: list[socket.socket] = []
        accepter = threading.Timer(0.1, lambda: accepted.append(server.accept()[0]))
        accepter.start()
        with await connect_socket(path, 5.0) as sock:  # connected once the first was accepted
            accepter.join(5.0)
            assert len(accepted) == 1
            assert sock.getpeername() == path
        for conn in accepted:
            conn.close()
