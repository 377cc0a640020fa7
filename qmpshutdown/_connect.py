"""Reaching a monitor: the socket, the peer's first words, and the QMP handshake.

Every wait is bounded. A peer that says nothing is told apart from one that
says something other than QMP (QEMU's human monitor above all): only the
first can be a hung QEMU; the second must never be taken for one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
from collections.abc import Mapping, Sequence
from typing import Union

import anyio
from qemu.qmp import QMPClient

from ._errors import ConnectError
from ._greeting import describe_error, negotiate, shown, take_replies
from ._monitor import (
    CLOSE_GRACE,
    HandshakeFailed,
    HandshakeTimeout,
    QMPMonitor,
    disconnect,
    new_client,
    readable,
)

#: A unix socket path, or a ``(host, port)`` TCP address.
Address = Union[str, "os.PathLike[str]", tuple[str, int]]


async def connect_socket(address: Address, limit: float) -> socket.socket:
    """Open a stream socket to *address*, bounded by *limit* seconds.

    :raises ConnectError: no such socket, refused, permission denied, an
        unresolvable host, or no answer in time.
    """
    loop = asyncio.get_running_loop()
    where = format_address(address)
    try:
        if not isinstance(address, tuple):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                if not _connected_at_once(sock, os.fspath(address)):
                    with anyio.fail_after(limit):
                        await _connect_unix(sock, os.fspath(address))
            except BaseException:
                sock.close()
                raise
            return sock
        with anyio.fail_after(limit):  # a TCP monitor
            host, port = address
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            last: OSError | None = None
            for family, kind, proto, _name, sockaddr in infos:
                sock = socket.socket(family, kind, proto)
                sock.setblocking(False)
                try:
                    await loop.sock_connect(sock, sockaddr)
                    return sock
                except OSError as err:
                    sock.close()
                    last = err
                except BaseException:
                    sock.close()
                    raise
            raise last or OSError(f"no address for {host}")
    except TimeoutError as err:
        raise ConnectError(f"{where}: no connection within {limit:g} s") from err
    except socket.gaierror as err:
        raise ConnectError(f"{where}: cannot resolve host: {err.strerror}") from err
    except OSError as err:
        # asyncio's own wording ("Connect call failed (...)") hides the reason
        why = os.strerror(err.errno) if err.errno else (err.strerror or str(err))
        raise ConnectError(f"{where}: {why}") from err


def _connected_at_once(sock: socket.socket, path: str) -> bool:
    """Connect a non-blocking unix socket if that needs no wait; False when it must wait."""
    try:
        sock.connect(path)
    except BlockingIOError:
        return False
    return True


async def _connect_unix(sock: socket.socket, path: str) -> None:
    """Connect a non-blocking unix socket, waiting while the listener's backlog is full.

    A unix connect() that would block fails with EAGAIN and does *not* go on
    in the background (unlike TCP), so asyncio's sock_connect would report a
    socket that never connected. QEMU listens with a backlog of 1 and accepts
    the next client only after it has dropped the previous one.
    """
    delay = 0.002
    while True:
        try:
            sock.connect(path)
            return
        except BlockingIOError:
            await anyio.sleep(delay)
            delay = min(delay * 2, 0.05)


async def first_words(sock: socket.socket, limit: float) -> None:
    """Wait for the peer's first bytes and check that they can start a QMP greeting.

    A peer that says nothing in time (QEMU stopped or hung, its monitor held by
    another client) is a :class:`HandshakeTimeout`; one that says something
    else — QEMU's human monitor (HMP) above all, an easy mistake — is a
    :class:`HandshakeFailed` that says what it is. Nothing is read: qemu.qmp
    reads the greeting itself.

    :raises HandshakeTimeout: nothing within *limit* seconds.
    :raises HandshakeFailed: the peer hung up, or its first words are not JSON.
    """
    if not readable(sock):  # (most often it is: the caller waited for QEMU's accept())
        with anyio.move_on_after(limit):
            await anyio.wait_readable(sock)
        if not readable(sock):
            raise HandshakeTimeout("no QMP greeting in time")
    try:
        head = sock.recv(256, socket.MSG_PEEK)
    except OSError as err:
        raise HandshakeFailed(f"not a QMP monitor: {describe_error(err)}") from err
    text = head.lstrip()
    if not head:
        raise HandshakeFailed("not a QMP monitor: the peer hung up")
    if text.startswith(b"{"):
        return
    if re.match(rb"QEMU \S+ monitor", text):
        raise HandshakeFailed(
            "this is QEMU's human monitor (HMP), not QMP: pass the socket of "
            "QEMU's -qmp option (or of a -mon mode=control chardev)"
        )
    raise HandshakeFailed(f"not a QMP monitor: it says {shown(text)}")


async def handshake(
    sock: socket.socket,
    limit: float,
    *,
    first: Sequence[tuple[str, Mapping[str, object] | None]] = (),
    first_within: float = 0.0,
) -> QMPMonitor:
    """Greet and negotiate capabilities over a connected socket; wrap the client.

    The library reads the greeting and negotiates itself (:func:`~._greeting.negotiate`),
    then hands the open session to qemu.qmp. *first*: commands (name, arguments) sent
    with the capabilities, their replies waited for up to *first_within* seconds (a
    command's bound); each answer waits in the monitor
    (:meth:`~._monitor.QMPMonitor.take_arrival`).

    :raises HandshakeTimeout: no greeting or no negotiation within *limit* seconds.
    :raises HandshakeFailed: the peer is not a QMP server (HMP, other text) or hung up.
    """
    deadline = anyio.current_time() + limit
    await first_words(sock, limit)
    early = await negotiate(sock, deadline, first)  # events before the greeting too
    left = max(0.0, deadline - anyio.current_time())  # a command's wait is not the connect's
    names = [name for name, _ in first]
    answers = await take_replies(sock, names, anyio.current_time() + first_within, early)
    client = await connect_client(sock, left, negotiated=True)
    late = sum(isinstance(answer, TimeoutError) for answer in answers)
    if late and isinstance(getattr(client, "unanswered", None), int):
        client.unanswered += late  # type: ignore[attr-defined]  # their replies may still come
    arrivals = dict(zip(names, answers, strict=True))
    return QMPMonitor(client, sock, owned=True, early_events=early, arrivals=arrivals)


async def open_client(path: str, limit: float, name: str | None = None) -> QMPClient:
    """Connect a caller's client to the QMP unix socket *path*, waiting for it to appear.

    For ``launch()``: QEMU creates its sockets early in its start-up, with no
    event to say so. The client keeps only its latest events.

    :raises ConnectError: no socket, or no greeting, within *limit* seconds.
    """
    deadline = anyio.current_time() + limit
    delay = 0.005
    while True:
        try:
            sock = await connect_socket(path, max(0.0, deadline - anyio.current_time()))
            break
        except ConnectError as err:
            if anyio.current_time() >= deadline or not isinstance(
                err.__cause__, (FileNotFoundError, ConnectionRefusedError)
            ):
                raise
            await anyio.sleep(delay)
            delay = min(delay * 2, 0.05)
    try:
        return await connect_client(sock, max(0.0, deadline - anyio.current_time()), name)
    except (HandshakeTimeout, HandshakeFailed) as err:
        sock.close()
        raise ConnectError(f"{path}: {err}") from err


def format_address(address: Address) -> str:
    """Return *address* as a user would write it: a path, or ``HOST:PORT``."""
    if isinstance(address, tuple):
        host, port = address
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return os.fspath(address)


async def connect_client(
    sock: socket.socket, limit: float, name: str | None = None, *, negotiated: bool = False
) -> QMPClient:
    """Return a :class:`QMPClient` connected over *sock*, greeted and negotiated.

    *negotiated*: the greeting and ``qmp_capabilities`` are done already (the
    library's own handshake); the client only takes the session over.

    Otherwise the client's connect() runs in its own asyncio task, bounded by
    *limit*: cancelling it from an anyio scope leaves qemu.qmp wedged (it is
    cancelled again while it cleans up).

    :raises HandshakeTimeout: no greeting or no negotiation within *limit* seconds.
    :raises HandshakeFailed: the peer is not a QMP server or hung up.
    """
    client = new_client(name)
    if negotiated:
        # The session is open: qemu.qmp only starts its reader and writer, waiting on no
        # peer, so it runs to its end here, shielded (no task of its own to bound it).
        client.await_greeting = client.negotiate = False  # qemu.qmp's public switches
        with anyio.CancelScope(shield=True):
            try:
                await client.connect(sock)
            except Exception as err:  # OSError (a socket gone bad), QMPError
                raise HandshakeFailed(f"not a QMP monitor: {describe_error(err)}") from err
        return client
    task = asyncio.ensure_future(client.connect(sock))
    try:
        done, _ = await asyncio.wait({task}, timeout=limit)
    except BaseException:
        await _abandon(task, client, sock)
        raise
    if not done:
        await _abandon(task, client, sock)
        raise HandshakeTimeout("no QMP greeting and negotiation in time")
    try:
        task.result()
    except Exception as err:  # QMPError, OSError, EOFError, ValueError (an over-long line), ...
        raise HandshakeFailed(f"not a QMP monitor: {describe_error(err)}") from err
    return client


async def _abandon(task: asyncio.Future[None], client: QMPClient, sock: socket.socket) -> None:
    """Cancel a connect() in flight and wait for it, shielded and bounded."""
    with anyio.CancelScope(shield=True):
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=CLOSE_GRACE)
        if not done:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            await asyncio.wait({task}, timeout=CLOSE_GRACE)
        if task.done() and not task.cancelled() and task.exception() is None:
            # It connected just as we gave up on it: close what it opened.
            await disconnect(client, sock)
    with contextlib.suppress(OSError):
        sock.close()
