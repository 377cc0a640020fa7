"""The floor our mandated dependency sets: a bare qemu.qmp client doing a cooperative stop.

The same exchange as qmpshutdown's fast path and as ``rawqmp.py``, with nothing
else: open the unix socket, read its peer's pid (``SO_PEERCRED``) and pin it
(``pidfd_open``), let ``QMPClient`` greet and negotiate, ``query-status``,
``system_powerdown``, wait for SHUTDOWN among the client's events, wait for the
pidfd, disconnect. Plain asyncio, no policy, no checks, no record: qmpshutdown
is measured against this in the same run (``benchmarks/phases.py``, ``fleet_gc.py``).

``quiet=True`` uses :class:`QuietClient`: qemu.qmp's own hooks for subclasses, the way
qmpshutdown's monitor uses them, so that no message is pretty-printed and no traceback
formatted for a DEBUG line that is off. Plain ``QMPClient`` does both on every message
and every close; the library does neither, so against the plain client it is credited
with that saving. The quiet client is the floor with it taken away.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
from collections.abc import Callable

from qemu.qmp import QMPClient
from qemu.qmp.message import Message

_UCRED = struct.Struct("3i")


class QuietClient(QMPClient):
    """QMPClient formatting messages and tracebacks only when its DEBUG log is on."""

    def _cb_outbound(self, msg: Message) -> Message:
        if self.logger.isEnabledFor(logging.DEBUG):
            self.logger.debug("--> %s", str(msg))
        return msg

    def _cb_inbound(self, msg: Message) -> Message:
        if self.logger.isEnabledFor(logging.DEBUG):
            self.logger.debug("<-- %s", str(msg))
        return msg

    async def _bh_close_stream(self, error_pathway: bool = False) -> None:
        if not self._writer:
            return
        if not self._writer.is_closing():
            self._writer.close()
        try:
            await self._writer.wait_closed()
        except Exception:
            if not error_pathway:
                raise


def _unmarked(step: str) -> None:
    pass


async def stop(
    path: str, limit: float = 30.0, *, quiet: bool = False, mark: Callable[[str], None] = _unmarked
) -> list[str]:
    """Stop the QEMU behind *path* with one press; return the events seen, by name.

    :param quiet: use :class:`QuietClient` instead of a plain ``QMPClient``.
    :param mark: called with each step's name as it ends (``cpu_timeline.py``).
    """
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    await loop.sock_connect(sock, path)
    mark("connected")
    pid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))[0]
    pidfd = os.pidfd_open(pid)
    client = (QuietClient if quiet else QMPClient)("bare")
    mark("pinned (SO_PEERCRED, pidfd), client made")

    async def exchange() -> list[str]:
        await client.connect(sock)
        mark("greeting and capabilities")
        await client.execute("query-status")
        mark("query-status")
        await client.execute("system_powerdown")
        mark("the press")
        seen: list[str] = []
        while "SHUTDOWN" not in seen:
            seen.append((await client.events.get())["event"])
        mark("the events, till SHUTDOWN")
        exited = loop.create_future()
        loop.add_reader(pidfd, exited.set_result, None)
        try:
            await exited
        finally:
            loop.remove_reader(pidfd)
        mark("the exit (pidfd)")
        return seen

    try:
        return await asyncio.wait_for(exchange(), limit)
    finally:
        # QEMU hung up first, as it does when it exits: qemu.qmp re-raises that here.
        with contextlib.suppress(EOFError):
            await client.disconnect()
        os.close(pidfd)
        mark("disconnected")
