"""An in-process fake qemu-ga on a unix socket: honest, silent, or lying in one chosen way.

``FakeAgent(path, behaviour)`` serves one client at a time (as QEMU's chardev
does) inside the test's task group. Behaviours:

* ``honest``       answers like qemu-ga (sync-delimited after 0xFF, osinfo, users,
                   fsfreeze status/freeze/thaw; ``guest-shutdown`` calls ``on_shutdown``);
* ``silent``       accepts and never answers (a socket whose agent is not running);
* ``garbage``      answers every line with bytes that are not JSON, forever;
* ``wrong-id``     answers syncs with another id;
* ``closes``       sends half a reply and closes the connection;
* ``hangs-freeze`` honest, but never answers ``guest-fsfreeze-freeze``.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from typing import Any

import anyio
import anyio.abc


class FakeAgent:
    def __init__(
        self,
        path: str,
        behaviour: str = "honest",
        *,
        osinfo: dict[str, Any] | None = None,
        users: list[dict[str, Any]] | None = None,
        frozen: bool = False,
        on_shutdown: Callable[[], None] | None = None,
        stale: bytes = b"",
    ) -> None:
        self.path = path
        self.behaviour = behaviour
        self.osinfo = osinfo if osinfo is not None else {"kernel-release": "6.1.0"}
        self.users = users if users is not None else []
        self.frozen = frozen
        self.on_shutdown = on_shutdown
        self.stale = stale  #: bytes sent before anything (a late reply to an old client)
        self.commands: list[str] = []

    async def serve(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED):
        listener = await anyio.create_unix_listener(self.path)
        task_status.started()
        async with listener:
            while True:
                stream = await listener.accept()
                async with stream:
                    with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                        await self._session(stream)

    async def _session(self, stream: anyio.abc.SocketStream) -> None:
        if self.stale:
            await stream.send(self.stale)
        buffer = b""
        while True:
            while b"\n" not in buffer:
                data = await stream.receive()
                buffer += data
            line, buffer = buffer.split(b"\n", 1)
            request = json.loads(line)
            command = request["execute"]
            self.commands.append(command)
            reply = self._reply(command, request.get("arguments", {}))
            if reply is None:
                continue
            if reply.endswith(b"CLOSE"):
                await stream.send(reply.removesuffix(b"CLOSE"))
                return
            await stream.send(reply)

    def _reply(self, command: str, arguments: dict[str, Any]) -> bytes | None:
        if self.behaviour == "silent":
            return None
        if self.behaviour == "garbage":
            return b"\xff<<not json>> \x00\x01{{{\n"
        if self.behaviour == "closes":
            return b'\xff{"return": CLOSE'  # half a reply, then the socket closes
        if command in ("guest-sync", "guest-sync-delimited"):
            token = arguments["id"] + (1 if self.behaviour == "wrong-id" else 0)
            head = b"\xff" if command == "guest-sync-delimited" else b""
            return head + json.dumps({"return": token}).encode() + b"\n"
        if self.behaviour == "closes-after-sync":
            return b"CLOSE"
        value: Any
        if command == "guest-get-osinfo":
            value = self.osinfo
        elif command == "guest-get-users":
            value = self.users
        elif command == "guest-fsfreeze-status":
            value = "frozen" if self.frozen else "thawed"
        elif command == "guest-fsfreeze-freeze":
            if self.behaviour == "hangs-freeze":
                return None
            self.frozen = True
            value = 1
        elif command == "guest-fsfreeze-thaw":
            self.frozen = False
            value = 1
        elif command == "guest-shutdown":
            if self.frozen:
                desc = "Command guest-shutdown has been disabled: the agent is in frozen state"
                return _error("CommandNotFound", desc)
            if self.on_shutdown is not None:
                self.on_shutdown()
            return None  # no reply on success
        else:
            return _error("CommandNotFound", f"The command {command} has not been found")
        return json.dumps({"return": value}).encode() + b"\n"


def _error(klass: str, desc: str) -> bytes:
    return json.dumps({"error": {"class": klass, "desc": desc}}).encode() + b"\n"
