"""The monitor seam: QMP over a socket, through qemu.qmp, with every wait bounded.

qemu.qmp has no timeouts of its own and a few sharp edges (see QEMU-FACTS):
connecting is run in its own asyncio task so that a timeout never cancels it
half-way, event listeners never wake on disconnect (so callers race
:meth:`Monitor.next_event` against :meth:`Monitor.wait_closed`, or have the
events handed to a callback as they are read: :meth:`Monitor.on_event`), and
``disconnect()`` is bounded and its exceptions always retrieved.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import select
import socket
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import anyio
from qemu.qmp import ExecInterruptedError, ExecuteError, QMPClient, QMPError
from qemu.qmp.message import Message
from qemu.qmp.protocol import Runstate

from ._errors import CommandError, ConnectError, MonitorClosedError
from ._events import EventCallback, EventQueue, RecentEvents, event_record
from ._result import EventRecord

logger = logging.getLogger(__name__)

# How long a monitor that will not close politely gets before its socket is cut.
CLOSE_GRACE = 1.0
#: How many loop rounds a command waits, at most, for the client to read what QEMU sent.
_READ_FIRST_ROUNDS = 20


class FdPassingUnsupported(Exception):
    """The monitor cannot pass a file descriptor to QEMU (not QMP on a unix socket)."""


class HandshakeTimeout(Exception):
    """The greeting or the capabilities negotiation did not finish in time."""


class HandshakeFailed(Exception):
    """The peer is not a QMP server, or hung up during the handshake."""


@runtime_checkable
class Monitor(Protocol):
    """What the ladder needs of a QMP monitor.

    ``execute`` has no bound of its own: the ladder bounds every call. An
    implementation raises only :class:`CommandError` (QEMU said no) and
    :class:`MonitorClosedError` (the connection ended) from ``execute``; the
    other methods never raise.
    """

    async def execute(self, command: str, arguments: Mapping[str, object] | None = None) -> object:
        """Run *command* and return its result.

        :raises CommandError: QEMU answered with an error.
        :raises MonitorClosedError: the connection ended before the reply.
        """
        ...

    async def next_event(self) -> EventRecord:
        """Return the next event; after the monitor closes this may wait forever."""
        ...

    def on_event(self, callback: EventCallback | None) -> None:
        """Hand each event to *callback* as it is read (the waiting ones first), instead of
        queuing it for :meth:`next_event`; None queues them again. *callback* runs in the
        reader, so it must not block; what it raises is logged and dropped.

        New in 0.3; a monitor without it still works with :func:`~qmpshutdown.climb`
        (a task then reads :meth:`next_event`).
        """
        ...

    def pending_events(self) -> list[EventRecord]:
        """Return the events received but not yet taken, without waiting."""
        ...

    def is_closed(self) -> bool:
        """Tell whether the connection has ended."""
        ...

    def peer_hung_up(self) -> bool:
        """Tell whether the peer ended the connection (EOF, reset), not a protocol error."""
        ...

    def unanswered(self) -> int | None:
        """Return how many commands QEMU has been sent and has not answered yet (also those
        the ladder stopped waiting for), or None when this monitor cannot tell.

        New in 0.4.1; a monitor without it still works: a stopped QEMU then gets SIGTERM
        and SIGCONT at once (docs/why.md, the exit that crashes).
        """
        ...

    async def wait_closed(self) -> None:
        """Return once the connection has ended (EOF, reset, or :meth:`close`)."""
        ...

    async def close(self) -> None:
        """End the connection if this object owns it; bounded, never raises."""
        ...


class _Client(QMPClient):
    """A QMPClient that formats messages for its debug log only when that log is on.

    qemu.qmp pretty-prints every message in and out (json.dumps, indent 2) for
    a DEBUG line even when DEBUG is off: about a tenth of the library's CPU
    (benchmarks/profile_cpu.py). These two hooks are meant for subclasses.
    """

    def __init__(self, name: str | None = None) -> None:
        super().__init__(name)
        # Replace the default listener (unbounded queue and history) before anyone uses it.
        self._listeners.remove(self.events)
        self.events = RecentEvents()
        self.register_listener(self.events)
        #: Commands written and not answered yet, including those nobody waits for any
        #: more (qemu.qmp drops a late reply; it still counts here as the answer).
        self.unanswered = 0

    def _cb_outbound(self, msg: Message) -> Message:
        if "execute" in msg:
            self.unanswered += 1
        if self.logger.isEnabledFor(logging.DEBUG):
            self.logger.debug("--> %s", str(msg))
        return msg

    def _cb_inbound(self, msg: Message) -> Message:
        if self.unanswered and ("return" in msg or "error" in msg):
            self.unanswered -= 1
        if self.logger.isEnabledFor(logging.DEBUG):
            self.logger.debug("<-- %s", str(msg))
        return msg

    async def _bh_close_stream(self, error_pathway: bool = False) -> None:
        # qemu.qmp formats a whole traceback for a DEBUG line when closing a stream QEMU
        # already hung up (it does on every exit), even when DEBUG is off: 5 % of a stop's
        # CPU (benchmarks/phases.py). The same close, the traceback only when DEBUG is on.
        if not self._writer:
            return
        if not self._writer.is_closing():
            self._writer.close()
        try:
            await self._writer.wait_closed()
        except Exception:
            if not error_pathway:
                raise  # a new error: qemu.qmp raises it too
            if self.logger.isEnabledFor(logging.DEBUG):
                self.logger.debug("Discarding an exception from wait_closed", exc_info=True)


class QMPMonitor:
    """A :class:`Monitor` backed by a :class:`qemu.qmp.QMPClient`.

    :param client: a connected client.
    :param sock: the socket under the client, when this object owns the connection.
    :param owned: close the connection in :meth:`close` (False for a caller's client).
    :param early_events: events QEMU sent before the client's session (:mod:`._greeting`).
    :param arrivals: the answers to the commands the handshake sent, by name.
    """

    def __init__(
        self,
        client: QMPClient,
        sock: socket.socket | None,
        *,
        owned: bool,
        early_events: Sequence[Mapping[str, Any]] = (),
        arrivals: Mapping[str, object] | None = None,
    ) -> None:
        self.client = client
        self._arrivals = dict(arrivals or {})
        self._sock = sock
        self._owned = owned
        self._events = EventQueue()
        for msg in early_events:
            self._events.take(msg)
        client.register_listener(self._events)
        self._closed_by_us = False
        # A second descriptor of our own connection: when asyncio drops it on an error
        # (EPIPE on a write to a QEMU that just exited), QEMU's last words are still
        # readable through it (see pending_events). Owned connections only.
        self._spare: int | None = None
        if owned and sock is not None:
            with contextlib.suppress(OSError, ValueError):
                self._spare = os.dup(sock.fileno())

    async def execute(self, command: str, arguments: Mapping[str, object] | None = None) -> object:
        await self._read_first()
        if self.is_closed():
            raise MonitorClosedError(f"{command}: the monitor is closed")
        try:
            return await self.client.execute(command, arguments)
        except ExecuteError as err:
            raise CommandError(command, err.error_class, str(err)) from err
        except (ExecInterruptedError, EOFError, OSError, QMPError) as err:
            # QMPError here: StateError, the client is not connected any more.
            raise MonitorClosedError(f"{command}: {type(err).__name__}: {err}") from err

    async def _read_first(self) -> None:
        """Let the client read what QEMU already sent before anything is written.

        A write to a QEMU that has just exited fails with EPIPE, and asyncio then
        drops the connection *with* the bytes not yet read: the last events (the
        guest's SHUTDOWN) would be lost, and a graceful power-off recorded as
        QEMU gone without one. So while the socket has bytes waiting, the loop
        runs first (bounded): the events are read, and an EOF closes the monitor.
        """
        sock = self._sock if self._sock is not None else client_socket(self.client)
        for _ in range(_READ_FIRST_ROUNDS):
            if sock is None or self.is_closed() or not readable(sock):
                return
            await asyncio.sleep(0)
        await asyncio.sleep(0)  # the reader task handles the lines the transport just read

    def take_arrival(self, command: str) -> object:
        """Once: the reply to *command* sent with the handshake (or the error it met), or None."""
        return self._arrivals.pop(command, None)

    def send_fd(self, fd: int) -> None:
        """Send a copy of *fd* to QEMU over the monitor socket (SCM_RIGHTS); *fd* stays open.

        :raises FdPassingUnsupported: not a unix socket, or the send failed.
        :raises MonitorClosedError: the connection ended.
        """
        if self.is_closed():
            raise MonitorClosedError("send_fd: the monitor is closed")
        try:
            self.client.send_fd_scm(fd)
        except QMPError as err:  # "Sending file descriptors requires a UNIX socket."
            raise FdPassingUnsupported(str(err)) from err
        except OSError as err:
            raise MonitorClosedError(f"send_fd: {type(err).__name__}: {err}") from err

    async def next_event(self) -> EventRecord:
        return event_record(await self._events.get())

    def on_event(self, callback: EventCallback | None) -> None:
        self._events.callback = callback
        if callback is not None:
            for msg in self._events.clear():
                callback(event_record(msg))

    def pending_events(self) -> list[EventRecord]:
        queued = [event_record(msg) for msg in self._events.clear()]
        return queued + [event_record(msg) for msg in self._unread_events()]

    def _unread_events(self) -> list[Mapping[str, Any]]:
        """Events QEMU sent that the client never handled, once it dropped the connection.

        asyncio drops a connection on a write error without reading what is
        waiting: the lines its reader held and the bytes still in the socket
        (read through the spare descriptor). Only once the client's reader
        ended, so nothing is taken from under it; the spare is closed after.
        """
        reader_task = getattr(self.client, "_reader_task", None)
        if self._spare is None or not self.is_closed():
            return []
        if reader_task is not None and not reader_task.done():
            return []
        stream = getattr(self.client, "_reader", None)
        data = bytes(getattr(stream, "_buffer", b""))
        with contextlib.suppress(OSError):
            while chunk := os.read(self._spare, 65536):  # non-blocking: the loop's flag
                data += chunk
        self._close_spare()
        events: list[Mapping[str, Any]] = []
        for line in data.splitlines():
            try:
                msg = json.loads(line)
            except ValueError:
                continue  # a line cut short
            if isinstance(msg, dict) and isinstance(msg.get("event"), str):
                events.append(msg)
        if events:
            logger.debug("read %d event(s) the client dropped with its connection", len(events))
        return events

    def _close_spare(self) -> None:
        if self._spare is not None:
            with contextlib.suppress(OSError):
                os.close(self._spare)
            self._spare = None

    def is_closed(self) -> bool:
        return self._closed_by_us or self.client.runstate != Runstate.RUNNING

    def peer_hung_up(self) -> bool:
        # qemu.qmp drops the connection itself on a reply it cannot parse (or an
        # over-long line); that says nothing about QEMU's exit. Its reader task
        # holds the reason (no public API for it).
        reader = getattr(self.client, "_reader_task", None)
        if reader is None or not reader.done():
            return self.is_closed() and not self._closed_by_us
        if reader.cancelled():
            return False
        err = reader.exception()
        return err is None or isinstance(err, (EOFError, OSError))

    def unanswered(self) -> int | None:
        # Counted by our own client only; a caller's QMPClient (wrap_client) cannot tell.
        count = getattr(self.client, "unanswered", None)
        return count if isinstance(count, int) else None

    async def wait_closed(self) -> None:
        while not self.is_closed():
            await self.client.runstate_changed()

    async def close(self) -> None:
        if self._closed_by_us:
            return
        self._closed_by_us = True
        self._close_spare()
        with contextlib.suppress(Exception):
            self.client.remove_listener(self._events)
        if self._owned:
            with anyio.CancelScope(shield=True):
                await disconnect(self.client, self._sock)


async def disconnect(client: QMPClient, sock: socket.socket | None) -> None:
    """Disconnect *client*, bounded; cut the socket if a stopped peer blocks the flush.

    disconnect() re-raises whatever ended the connection (EOFError after QEMU
    exited, ConnectionResetError, ...): it is retrieved here and logged, never raised.
    """
    if client.runstate == Runstate.IDLE:
        return
    reader = getattr(client, "_reader_task", None)
    if reader is not None and reader.done():
        # QEMU hung up (it does when it exits): qemu.qmp flushes nothing then, only closes
        # the stream, so nothing here can block and no task of ours need bound it.
        try:
            await client.disconnect()
        except Exception as err:  # EOFError, ConnectionResetError: how the connection ended
            logger.debug("monitor connection ended with %r", err)
        return
    task = asyncio.ensure_future(client.disconnect())
    done, _ = await asyncio.wait({task}, timeout=CLOSE_GRACE)
    if not done and sock is not None:
        # A SIGSTOPped QEMU never reads: the flush in disconnect() would wait forever.
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        done, _ = await asyncio.wait({task}, timeout=CLOSE_GRACE)
    if not done:
        task.cancel()
        await asyncio.wait({task}, timeout=CLOSE_GRACE)
    if task.done() and not task.cancelled() and task.exception() is not None:
        logger.debug("monitor connection ended with %r", task.exception())


async def close_client(client: QMPClient) -> None:
    """Disconnect a caller's client, bounded and shielded; QEMU gone under it is fine."""
    with anyio.CancelScope(shield=True):
        await disconnect(client, client_socket(client))


def new_client(name: str | None = None) -> QMPClient:
    """A new, unconnected client of our own (it keeps the last events; see ``_Client``)."""
    return _Client(name)


def readable(sock: Any) -> bool:
    """True when *sock* has bytes (or an EOF) waiting to be read; never blocks."""
    try:
        fd = sock.fileno()
        if fd < 0:
            return False
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(0))
    except (OSError, ValueError):
        return False


def wrap_client(client: QMPClient) -> QMPMonitor:
    """Wrap a caller's connected client; it is used as is and left open."""
    if client.runstate != Runstate.RUNNING:
        state = client.runstate.name
        raise ConnectError(f"the QMPClient given is not connected (runstate {state})")
    return QMPMonitor(client, None, owned=False)


def client_socket(client: QMPClient) -> Any:
    """Return the socket under a connected client, or None (qemu.qmp has no API for it)."""
    writer = getattr(client, "_writer", None)
    return None if writer is None else writer.get_extra_info("socket")
