"""An NBD server that holds reads of its last part: a QEMU whose exit waits on a read.

QEMU's exit drains every block request in flight (``vm_shutdown()`` drains all nodes,
then ``job_cancel_sync_all()``), and its main thread waits there, as in the stalled
exit of docs/why.md: a real QEMU that has sent its guest's SHUTDOWN and neither exits
nor answers. A ``blockdev-backup`` job from this export (tests/guests/test_faults.py)
reads into its held part and waits; the read is answered when
:meth:`HoldingNbd.release` is called (or never). A guest's own disk would not do:
its power-off drains the device (QEMU's main loop blocked) before any SHUTDOWN.

Read-only, one export of :data:`SIZE` bytes of zeros, the fixed newstyle handshake
(``NBD_OPT_GO`` or ``NBD_OPT_EXPORT_NAME``; every other option is unsupported), simple
replies. Enough for QEMU's own NBD client (7.2 and 10.0), nothing more.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from pathlib import Path

#: The export's size; reads that touch the last :data:`HELD` bytes are held.
SIZE = 4 * 1024 * 1024
HELD = 1024 * 1024

_NBDMAGIC, _IHAVEOPT, _REPLY_MAGIC = 0x4E42444D41474943, 0x49484156454F5054, 0x3E889045565A9
_REQUEST_MAGIC, _SIMPLE_REPLY_MAGIC = 0x25609513, 0x67446698
_OPT_EXPORT_NAME, _OPT_ABORT, _OPT_GO = 1, 2, 7
_REP_ACK, _REP_INFO, _REP_ERR_UNSUP = 1, 3, 2**31 + 1
_FLAG_FIXED_NEWSTYLE, _FLAG_NO_ZEROES = 1, 2
_FLAG_HAS_FLAGS, _FLAG_READ_ONLY = 1, 2
_CMD_READ, _CMD_DISC = 0, 2
_EPERM, _EINVAL = 1, 22


class HoldingNbd:
    """Serves :data:`SIZE` bytes of zeros on the unix socket *path*, holding some reads."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.held = 0  #: reads held so far (answered or not)
        self.arrived = asyncio.Event()  #: set when the first read is held
        self._released = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> HoldingNbd:
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()
        assert self._server is not None
        self._server.close()
        if self._tasks:  # a QEMU still connected: its exit (or the fixture's kill) ends them
            await asyncio.wait(list(self._tasks), timeout=5)
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 5)
        self.path.unlink(missing_ok=True)

    def release(self) -> None:
        """Answer the held reads, and every later one at once."""
        self._released.set()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            if await self._handshake(reader, writer):
                await self._transmission(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # QEMU went (its exit, or SIGKILL)
        except asyncio.CancelledError:
            pass  # closed under a QEMU that stays: the test's end (asyncio would log it)
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _handshake(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(struct.pack(">QQH", _NBDMAGIC, _IHAVEOPT,
                                 _FLAG_FIXED_NEWSTYLE | _FLAG_NO_ZEROES))  # fmt: skip
        (client_flags,) = struct.unpack(">I", await reader.readexactly(4))
        zeroes = not client_flags & _FLAG_NO_ZEROES
        flags = _FLAG_HAS_FLAGS | _FLAG_READ_ONLY
        while True:
            magic, option, length = struct.unpack(">QII", await reader.readexactly(16))
            assert magic == _IHAVEOPT, hex(magic)
            await reader.readexactly(length)
            if option == _OPT_EXPORT_NAME:
                writer.write(struct.pack(">QH", SIZE, flags) + (b"\0" * 124 if zeroes else b""))
                return True
            if option == _OPT_ABORT:
                return False
            if option == _OPT_GO:
                info = struct.pack(">HQH", 0, SIZE, flags)  # NBD_INFO_EXPORT
                reply = struct.pack(">QIII", _REPLY_MAGIC, option, _REP_INFO, len(info))
                writer.write(reply + info)
                writer.write(struct.pack(">QIII", _REPLY_MAGIC, option, _REP_ACK, 0))
                return True
            writer.write(struct.pack(">QIII", _REPLY_MAGIC, option, _REP_ERR_UNSUP, 0))

    async def _transmission(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        while True:
            magic, _flags, kind, cookie, offset, length = struct.unpack(
                ">IHHQQI", await reader.readexactly(28)
            )
            assert magic == _REQUEST_MAGIC, hex(magic)
            if kind == _CMD_DISC:
                return
            if kind != _CMD_READ:
                error = _EPERM if kind == 1 else _EINVAL  # a write to a read-only export
                writer.write(struct.pack(">IIQ", _SIMPLE_REPLY_MAGIC, error, cookie))
                continue
            if offset + length > SIZE - HELD and not self._released.is_set():
                self.held += 1
                self.arrived.set()
                await self._released.wait()
            writer.write(struct.pack(">IIQ", _SIMPLE_REPLY_MAGIC, 0, cookie) + b"\0" * length)
            await writer.drain()


def held_job_args(sock: Path) -> list[str]:
    """QEMU options for a held exit: the export at *sock* as node ``src``, a null ``dst``."""
    return [
        "-blockdev", f"driver=nbd,node-name=src,server.type=unix,server.path={sock},read-only=on",
        "-blockdev", f"driver=null-co,node-name=dst,size={SIZE}",
    ]  # fmt: skip


async def start_held_job(qmp_path: Path, nbd: HoldingNbd, limit: float = 10.0) -> None:
    """Start ``blockdev-backup`` src → dst over a client of our own (closed before
    returning), and return once the job waits on a held read (within *limit* s)."""
    from support.guests import qmp_connect, qmp_disconnect

    client = await qmp_connect(qmp_path)
    try:
        await client.execute("blockdev-backup", {
            "job-id": "held", "device": "src", "target": "dst", "sync": "full",
        })  # fmt: skip
        await asyncio.wait_for(nbd.arrived.wait(), limit)
    finally:
        await qmp_disconnect(client)
