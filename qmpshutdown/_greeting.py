"""The QMP greeting and capabilities negotiation, read by the library itself.

qemu.qmp refuses a session whose first message is not the greeting, but QEMU
does not always greet first: QEMU 7.2 loading a state (``-incoming``) was seen
sending an event (MIGRATION) to a new connection before its greeting (CI of
stop 37). Refused, such a QEMU would be "not a QMP monitor", and a QEMU nobody
could ask is never signalled. So the library reads up to the greeting itself
(keeping the events before it for the record), negotiates capabilities, and
hands qemu.qmp the session from there on (its public ``await_greeting`` and
``negotiate`` switched off). It is also the shortest way: no task or queue of
qemu.qmp's runs until the session is open, and the ladder's first commands
(``query-status``, and ``set-action`` when the power button will need it) go
out in one write with ``qmp_capabilities``; QEMU runs them in order and answers
in order: two round trips fewer before the press.

Only whole lines are taken from the socket, never a byte past the reply to
``qmp_capabilities``: what QEMU sends after it stays for qemu.qmp's reader.
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Mapping, Sequence
from typing import Any

import anyio
from qemu.qmp.qmp_client import NegotiationError

from ._errors import CommandError, MonitorClosedError
from ._monitor import HandshakeFailed, HandshakeTimeout

#: The handshake's messages, as qemu.qmp logs the session's ("--> ", "<-- "), at DEBUG.
logger = logging.getLogger(__name__)

#: The longest line taken before the session: qemu.qmp's own limit for any line.
LINE_LIMIT = 10 * 1024 * 1024
#: How much of the socket's data one look shows.
PEEK = 65536
#: QEMU's commands need no newline (qemu.qmp sends none either), nor spaces: QEMU reads
#: its monitor one byte per turn of its main loop (1.6-1.9 us a byte on an idle QEMU 10.0
#: or 7.2, 2.5 us with a guest running: benchmarks/qmp_bytes.py, docs/why.md), so each
#: byte before the press delays it.
CAPABILITIES = b'{"execute":"qmp_capabilities"}'
#: The ids of the commands sent with the capabilities, short for the same reason;
#: qemu.qmp's own ids (``__qmp#00000``) differ.
FIRST_ID = "qsd{}"
#: JSON as compact as QEMU reads it (qemu.qmp writes its messages so too).
_COMPACT = (",", ":")

#: What became of one of those commands: its result, or the error it met (a
#: :class:`CommandError`, :class:`MonitorClosedError` or :class:`TimeoutError`).
Answer = object


def first_commands(commands: Sequence[tuple[str, Mapping[str, object] | None]]) -> bytes:
    """*commands* as QMP, each with its id, for one write after the capabilities."""
    out = b""
    for index, (name, arguments) in enumerate(commands):
        msg: dict[str, object] = {"execute": name, "id": FIRST_ID.format(index)}
        if arguments is not None:
            msg["arguments"] = arguments
        out += json.dumps(msg, separators=_COMPACT).encode()
    return out


class _HungUp(HandshakeFailed):
    """The peer closed the connection (EOF)."""


async def negotiate(
    sock: socket.socket,
    deadline: float,
    first: Sequence[tuple[str, Mapping[str, object] | None]] = (),
) -> list[Mapping[str, Any]]:
    """Read the greeting and negotiate capabilities, by the anyio clock's *deadline*.

    *first*: commands (name, arguments) that go out with ``qmp_capabilities``, in
    order; take their replies with :func:`take_replies` before qemu.qmp takes the
    session over.

    :raises HandshakeTimeout: the greeting or the reply did not come in time.
    :raises HandshakeFailed: the peer is not a QMP server, refused the
        negotiation, or hung up.
    :return: the events QEMU sent before the greeting or the reply, oldest first.
    """
    early: list[Mapping[str, Any]] = []
    while "QMP" not in (msg := await _message(sock, deadline, "greeting")):
        if not isinstance(msg.get("event"), str):
            raise HandshakeFailed(f"not a QMP monitor: it said {shown(msg)} before any greeting")
        early.append(msg)
    sent = CAPABILITIES + first_commands(first)
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug("--> %s", sent.decode(errors="replace"))
    try:
        sock.send(sent)
    except OSError as err:
        raise HandshakeFailed(f"not a QMP monitor: {describe_error(err)}") from err
    while isinstance((msg := await _message(sock, deadline, "negotiation")).get("event"), str):
        early.append(msg)
    if "return" not in msg:
        error = msg.get("error")
        desc = error.get("desc") if isinstance(error, Mapping) else None
        raise HandshakeFailed(
            "not a QMP monitor: capabilities negotiation (qmp_capabilities) failed"
            + (f": {desc}" if desc else f": it said {shown(msg)}")
        )
    return early


async def take_replies(
    sock: socket.socket, names: Sequence[str], by: float, early: list[Mapping[str, Any]]
) -> list[Answer]:
    """The replies to the commands :func:`negotiate` sent (*names*, in order), by the
    anyio clock's *by* (a command's bound, not the connection's); the events read on
    the way go to *early*.

    A reply not come in time stays whole in the socket: qemu.qmp drops it when it
    comes, as it drops any late reply. Those after it are TimeoutErrors too.

    :raises HandshakeFailed: a reply is not QMP (not JSON, over the line limit): the
        peer's first answers say it is not a QMP monitor.
    """
    answers: list[Answer] = []
    for index, name in enumerate(names):
        answer = await _reply(sock, name, FIRST_ID.format(index), by, early)
        answers.append(answer)
        if isinstance(answer, (TimeoutError, MonitorClosedError)):
            answers += [type(answer)(*answer.args) for _ in names[index + 1 :]]
            break
    return answers


async def _reply(
    sock: socket.socket, name: str, msg_id: str, by: float, early: list[Mapping[str, Any]]
) -> Answer:
    try:
        while True:
            msg = await _message(sock, by, f"reply to {name}", whole=True)
            if isinstance(msg.get("event"), str):
                early.append(msg)
            elif msg.get("id") == msg_id:
                break
            # else a reply to nothing asked (not QEMU's way): dropped, as qemu.qmp drops it
    except HandshakeTimeout:
        return TimeoutError()
    except _HungUp as err:
        return MonitorClosedError(f"{name}: {err}")
    if "return" in msg:
        return msg["return"]
    error = msg.get("error")
    error = error if isinstance(error, Mapping) else {}
    return CommandError(name, str(error.get("class", "")), str(error.get("desc", "")))


async def _message(
    sock: socket.socket, deadline: float, what: str, *, whole: bool = False
) -> Mapping[str, Any]:
    """Take the next line that is not empty from *sock*, and nothing after it; parse it.

    *whole*: a line is taken only once it has come whole (a line longer than one look
    shows is taken as it comes); a timeout leaves it in the socket.
    """
    while True:
        line, left = await _line(sock, deadline, what, whole=whole)
        if line.strip():
            break
        if left:
            sock.recv(len(line))  # QEMU sends no empty line; a stray CR LF costs nothing
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug("<-- %s", line.decode(errors="replace").rstrip())
    try:
        msg = json.loads(line)
    except ValueError:
        msg = None
    if left:
        sock.recv(len(line))  # whole: now taken
    if not isinstance(msg, dict):
        raise HandshakeFailed(f"not a QMP monitor: it says {shown(line)}")
    return msg


async def _line(
    sock: socket.socket, deadline: float, what: str, *, whole: bool
) -> tuple[bytes, bool]:
    """The next line of *sock*, its newline included, taken from the socket; with *whole*,
    a line that fits one look is only looked at. :return: the line, and True when it was
    left in the socket (for the caller to take).
    """
    taken = bytearray()  # a line longer than one look shows: its start, taken already
    while True:
        try:
            seen = sock.recv(PEEK, socket.MSG_PEEK)
        except BlockingIOError:
            with anyio.move_on_after(max(0.0, deadline - anyio.current_time())) as waited:
                await anyio.wait_readable(sock)
            if waited.cancelled_caught:
                raise HandshakeTimeout(f"no QMP {what} in time") from None
            continue
        except OSError as err:
            raise HandshakeFailed(f"not a QMP monitor: {describe_error(err)}") from err
        if not seen:
            how = "mid-line" if taken.strip() else f"before its {what}"
            raise _HungUp(f"not a QMP monitor: the peer hung up {how}")
        end = seen.find(b"\n")
        if whole and not taken and len(seen) < PEEK:
            if end >= 0:
                return seen[: end + 1], True
            if anyio.current_time() >= deadline:
                raise HandshakeTimeout(f"no QMP {what} in time")
            await anyio.sleep(0.001)  # the rest of the line is on its way
            continue
        taken += sock.recv(len(seen) if end < 0 else end + 1)
        if len(taken) > LINE_LIMIT:
            raise HandshakeFailed(f"not a QMP monitor: a line over the {LINE_LIMIT} byte limit")
        if end >= 0:
            return bytes(taken), False


def shown(what: object) -> str:
    """The first line of what a peer said, short and quoted, for an error message."""
    text = what.decode("utf-8", "replace") if isinstance(what, (bytes, bytearray)) else str(what)
    text = text.strip().splitlines()[0] if text.strip() else ""
    return repr(text[:60])


def describe_error(err: BaseException) -> str:
    """What went wrong with a peer, in a few words (qemu.qmp's wrapped errors unwrapped)."""
    while True:
        if isinstance(err, NegotiationError):
            return "capabilities negotiation (qmp_capabilities) failed"
        inner = getattr(err, "exc", None)
        if not isinstance(inner, BaseException):
            break
        err = inner
    if isinstance(err, (EOFError, BrokenPipeError, ConnectionResetError)):
        return "the peer hung up"
    text = str(err)
    return f"{type(err).__name__}: {text}" if text else type(err).__name__
