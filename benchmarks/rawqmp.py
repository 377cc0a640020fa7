"""A minimal QMP client over a raw unix socket: the speed limit qmpshutdown is measured against.

Standard library only (socket, select.poll, os.pidfd_open), blocking, one
connection, no policy beyond what the benchmark needs: connect, read the
greeting, ``qmp_capabilities``, ``query-status``, ``system_powerdown``, wait for
SHUTDOWN (optionally only ``grace`` seconds, then ``quit``), and wait for QEMU's
exit through a pidfd. Every wait is bounded by ``limit``.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import struct
import time
from typing import Any

_UCRED = struct.Struct("3i")


class RawQMPError(RuntimeError):
    """The raw client could not do its job (bad reply, timeout, hang-up)."""


class RawQMP:
    """One blocking QMP connection to a unix socket, with QEMU's process pinned by a pidfd."""

    def __init__(self, path: str, limit: float = 30.0) -> None:
        self.deadline = time.monotonic() + limit
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(limit)
        self.sock.connect(path)
        self.sock.setblocking(False)
        pid = _UCRED.unpack(
            self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        )[0]
        self.pid = pid
        self.pidfd = os.pidfd_open(pid)
        self.buffer = b""
        self.eof = False
        self.events: list[dict[str, Any]] = []

    def close(self) -> None:
        self.sock.close()
        os.close(self.pidfd)

    # ---- reading -------------------------------------------------------------

    def _remaining(self, until: float | None = None) -> float:
        end = self.deadline if until is None else min(until, self.deadline)
        return end - time.monotonic()

    def _fill(self, until: float | None = None) -> bool:
        """Read more bytes; False on EOF or when *until* passed (raises past the deadline)."""
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        while True:
            left = self._remaining(until)
            if left <= 0:
                if until is not None and until <= self.deadline:
                    return False
                raise RawQMPError("no reply within the limit")
            if poller.poll(left * 1000):
                break
        try:
            chunk = self.sock.recv(65536)
        except (ConnectionResetError, BlockingIOError):
            chunk = b""
        if not chunk:
            self.eof = True
            return False
        self.buffer += chunk
        return True

    def read_message(self, until: float | None = None) -> dict[str, Any] | None:
        """The next JSON message, or None on EOF or when *until* (monotonic) passed."""
        while b"\n" not in self.buffer:
            if self.eof or not self._fill(until):
                return None
        line, self.buffer = self.buffer.split(b"\n", 1)
        message: dict[str, Any] = json.loads(line)
        if "event" in message:
            self.events.append(message)
        return message

    def execute(self, command: str) -> Any:
        """Send *command*; return its ``return`` value (events read meanwhile are kept)."""
        self.sock.sendall(json.dumps({"execute": command}).encode() + b"\n")
        while True:
            message = self.read_message()
            if message is None:
                raise EOFError(f"{command}: the monitor closed")
            if "return" in message:
                return message["return"]
            if "error" in message:
                raise RawQMPError(f"{command}: {message['error']}")

    def shutdown_event(self) -> dict[str, Any] | None:
        return next((e for e in self.events if e.get("event") == "SHUTDOWN"), None)

    # ---- the steps -------------------------------------------------------------

    def handshake(self) -> None:
        greeting = self.read_message()
        if greeting is None or "QMP" not in greeting:
            raise RawQMPError(f"not a QMP greeting: {greeting!r}")
        self.execute("qmp_capabilities")

    def wait_shutdown(self, until: float | None = None) -> dict[str, Any] | None:
        """Wait for SHUTDOWN until *until* (monotonic), or the limit; None if it did not come."""
        while (event := self.shutdown_event()) is None:
            if self.read_message(until) is None:
                return self.shutdown_event()
        return event

    def wait_exit(self) -> None:
        poller = select.poll()
        poller.register(self.pidfd, select.POLLIN)
        left = self._remaining()
        if left <= 0 or not poller.poll(left * 1000):
            raise RawQMPError(f"QEMU pid {self.pid} still running at the limit")


def stop(path: str, grace: float | None = None, limit: float = 30.0) -> str:
    """Stop the QEMU behind *path*; return the SHUTDOWN reason.

    :param grace: None waits for the guest (bounded by *limit*); a number
        waits that long after the press, then sends ``quit``.
    :return: the reason of the first SHUTDOWN event (``guest-shutdown``,
        ``host-qmp-quit``, ...).
    """
    return stop_with_events(path, grace, limit)[0]


def stop_with_events(
    path: str, grace: float | None = None, limit: float = 30.0
) -> tuple[str, list[dict[str, Any]]]:
    """Like :func:`stop`; also return every event QEMU sent."""
    qmp = RawQMP(path, limit)
    try:
        qmp.handshake()
        status = qmp.execute("query-status")["status"]
        if status != "running":
            raise RawQMPError(f"runstate {status!r}")
        qmp.execute("system_powerdown")
        until = None if grace is None else time.monotonic() + grace
        event = qmp.wait_shutdown(until)
        if event is None:
            if grace is None or qmp.eof:
                raise RawQMPError("no SHUTDOWN and the monitor closed")
            # QEMU may close the socket before it answers quit.
            with contextlib.suppress(EOFError, OSError):
                qmp.execute("quit")
            event = qmp.shutdown_event()
        qmp.wait_exit()
        if event is None:  # quit's SHUTDOWN may have come after the reply: drain
            while qmp.read_message(time.monotonic() + 0.5) is not None:
                pass
            event = qmp.shutdown_event()
        return (str(event["data"].get("reason")) if event else "unknown"), qmp.events
    finally:
        qmp.close()
