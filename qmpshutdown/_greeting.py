"""The QMP greeting and capabilities negotiation, read by the library itself.

qemu.qmp refuses a session whose first message is not the greeting, but QEMU
does not always greet first: QEMU 7.2 loading a state (``-incoming``) was seen
sending an event (MIGRATION) to a new connection before its greeting (CI of
stop 37). Refused, such a QEMU would be "not a QMP monitor", and a QEMU nobody
could ask is never signalled. So the library reads up to the greeting itself
(keeping the events before it for the record), negotiates capabilities, and
hands qemu.qmp the session from there on (its public ``await_greeting`` and
``negotiate`` switched off). It is also the shortest way: no task or queue of
qemu.qmp's runs until the session is open.

Only whole lines are taken from the socket, never a byte past the reply to
``qmp_capabilities``: what QEMU sends after it stays for qemu.qmp's reader.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Mapping
from typing import Any

import anyio

from ._monitor import HandshakeFailed, HandshakeTimeout

#: The longest line taken before the session: qemu.qmp's own limit for any line.
LINE_LIMIT = 10 * 1024 * 1024
#: QEMU's commands need no newline; qemu.qmp sends none either.
CAPABILITIES = b'{"execute": "qmp_capabilities"}'


async def negotiate(sock: socket.socket, deadline: float) -> list[Mapping[str, Any]]:
    """Read the greeting, negotiate capabilities, by the anyio clock's *deadline*.

    :raises HandshakeTimeout: the greeting or the reply did not come in time.
    :raises HandshakeFailed: the peer is not a QMP server, refused the
        negotiation, or hung up.
    :return: the events QEMU sent before the greeting or the reply, oldest first.
    """
    early: list[Mapping[str, Any]] = []
    while "QMP" not in (msg := await _message(sock, deadline, "greeting")):
        if not isinstance(msg.get("event"), str):
            raise HandshakeFailed(f"not a QMP monitor: it said {_shown(msg)} before any greeting")
        early.append(msg)
    try:
        sock.send(CAPABILITIES)
    except OSError as err:
        raise HandshakeFailed(f"not a QMP monitor: {_os_error(err)}") from err
    while isinstance((msg := await _message(sock, deadline, "negotiation")).get("event"), str):
        early.append(msg)
    if "return" not in msg:
        error = msg.get("error")
        desc = error.get("desc") if isinstance(error, Mapping) else None
        raise HandshakeFailed(
            "not a QMP monitor: capabilities negotiation (qmp_capabilities) failed"
            + (f": {desc}" if desc else f": it said {_shown(msg)}")
        )
    return early


async def _message(sock: socket.socket, deadline: float, what: str) -> Mapping[str, Any]:
    """Take the next line from *sock* (and nothing after it) that is not empty; parse it."""
    while not (line := await _line(sock, deadline, what)).strip():
        pass  # QEMU sends no empty line; a stray CR LF costs nothing
    try:
        msg = json.loads(line)
    except ValueError:
        msg = None
    if not isinstance(msg, dict):
        raise HandshakeFailed(f"not a QMP monitor: it says {_shown(line)}")
    return msg


async def _line(sock: socket.socket, deadline: float, what: str) -> bytes:
    """Take one whole line from *sock*, its newline included, and nothing after it."""
    taken = bytearray()  # a line longer than the peek shows: its start, taken already
    while True:
        try:
            seen = sock.recv(65536, socket.MSG_PEEK)
            end = seen.find(b"\n")
            data = sock.recv(len(seen) if end < 0 else end + 1) if seen else b""
        except BlockingIOError:
            with anyio.move_on_after(max(0.0, deadline - anyio.current_time())) as waited:
                await anyio.wait_readable(sock)
            if waited.cancelled_caught:
                raise HandshakeTimeout(f"no QMP {what} in time") from None
            continue
        except OSError as err:
            raise HandshakeFailed(f"not a QMP monitor: {_os_error(err)}") from err
        if not data:
            how = "mid-line" if taken.strip() else f"before its {what}"
            raise HandshakeFailed(f"not a QMP monitor: the peer hung up {how}")
        taken += data
        if len(taken) > LINE_LIMIT:
            raise HandshakeFailed(f"not a QMP monitor: a line over the {LINE_LIMIT} byte limit")
        if end >= 0:
            return bytes(taken)


def _shown(what: object) -> str:
    text = what.decode("utf-8", "replace") if isinstance(what, (bytes, bytearray)) else str(what)
    text = text.strip().splitlines()[0] if text.strip() else ""
    return repr(text[:60])


def _os_error(err: OSError) -> str:
    if isinstance(err, (BrokenPipeError, ConnectionResetError)):
        return "the peer hung up"
    return f"{type(err).__name__}: {err}"
