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

Running commands in the guest (the diagnose step's questions): ``guest-exec``
(``path``, ``arg``, ``capture-output``) answers ``{"pid": N}`` and looks the argv up
in ``exec_outputs`` (argv → ``(exitcode, stdout, stderr)``; an argv not there
fails the way qemu-ga fails to spawn a program that is not installed);
``guest-exec-status`` answers ``exited: false`` for the first ``slow_polls``
polls of each pid, then the exit status and base64 output as qemu-ga does
(``out-data``/``err-data`` only when not empty). ``guest-info`` lists the
commands with ``guest-exec`` enabled unless ``exec_enabled=False``, which also
makes both exec commands answer qemu-ga's "has been disabled" error
(``qapi/qmp-dispatch.c``: class ``CommandNotFound``). ``silent_after=N`` answers
the first N commands (syncs included) and then nothing at all: an agent that
stops answering mid-diagnosis. A Windows guest: ``osinfo`` and ``exec_outputs``
from ``support.windows``.
"""

from __future__ import annotations

import base64
import contextlib
import json
from collections.abc import Callable, Mapping
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
        exec_outputs: Mapping[tuple[str, ...], tuple[int, str, str]] | None = None,
        exec_enabled: bool = True,
        slow_polls: int = 0,
        silent_after: int | None = None,
        version: str = "7.2.0",
    ) -> None:
        self.path = path
        self.behaviour = behaviour
        self.osinfo = osinfo if osinfo is not None else {"kernel-release": "6.1.0"}
        self.users = users if users is not None else []
        self.frozen = frozen
        self.on_shutdown = on_shutdown
        self.stale = stale  #: bytes sent before anything (a late reply to an old client)
        self.commands: list[str] = []
        self.exec_outputs = dict(exec_outputs or {})
        self.exec_enabled = exec_enabled
        self.slow_polls = slow_polls  #: polls of a pid that answer ``exited: false`` first
        self.silent_after = silent_after  #: answer this many commands, then none
        self.version = version
        self.execs: list[tuple[str, ...]] = []  #: every argv ``guest-exec`` was asked to run
        self._running: dict[int, tuple[tuple[str, ...], int]] = {}  # pid -> (argv, polls so far)
        self._next_pid = 4100

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
        if self.silent_after is not None and len(self.commands) > self.silent_after:
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
        elif command == "guest-info":
            value = self._info()
        elif command in ("guest-exec", "guest-exec-status"):
            if not self.exec_enabled:
                return _error("CommandNotFound", f"Command {command} has been disabled")
            if self.frozen:
                desc = f"Command {command} has been disabled: the agent is in frozen state"
                return _error("CommandNotFound", desc)
            return self._exec(arguments) if command == "guest-exec" else self._status(arguments)
        else:
            return _error("CommandNotFound", f"The command {command} has not been found")
        return json.dumps({"return": value}).encode() + b"\n"

    def _info(self) -> dict[str, Any]:
        names = ["guest-sync", "guest-sync-delimited", "guest-ping", "guest-info",
                 "guest-get-osinfo", "guest-get-users", "guest-fsfreeze-status",
                 "guest-fsfreeze-freeze", "guest-fsfreeze-thaw", "guest-shutdown",
                 "guest-exec", "guest-exec-status"]  # fmt: skip
        commands = [
            {"name": name, "enabled": self.exec_enabled or not name.startswith("guest-exec"),
             "success-response": name != "guest-shutdown"}
            for name in names
        ]  # fmt: skip
        return {"version": self.version, "supported_commands": commands}

    def _exec(self, arguments: dict[str, Any]) -> bytes:
        argv = (arguments["path"], *arguments.get("arg", []))
        self.execs.append(argv)
        if argv not in self.exec_outputs:
            # qemu-ga's g_spawn error for a program that is not there (qga/commands.c)
            why = f"Failed to execute child process “{argv[0]}” (No such file or directory)"
            return _error("GenericError", f"Guest agent command failed, error was '{why}'")
        pid = self._next_pid
        self._next_pid += 1
        self._running[pid] = (argv, 0)
        return json.dumps({"return": {"pid": pid}}).encode() + b"\n"

    def _status(self, arguments: dict[str, Any]) -> bytes:
        pid = arguments.get("pid")
        if pid not in self._running:
            return _error("GenericError", "Invalid parameter 'pid'")
        argv, polls = self._running[pid]
        if polls < self.slow_polls:
            self._running[pid] = (argv, polls + 1)
            return json.dumps({"return": {"exited": False}}).encode() + b"\n"
        del self._running[pid]  # qemu-ga forgets a process once its exit was read
        exitcode, out, err = self.exec_outputs[argv]
        value: dict[str, Any] = {"exited": True, "exitcode": exitcode}
        if out:
            value["out-data"] = base64.b64encode(out.encode()).decode()
        if err:
            value["err-data"] = base64.b64encode(err.encode()).decode()
        return json.dumps({"return": value}).encode() + b"\n"


def _error(klass: str, desc: str) -> bytes:
    return json.dumps({"error": {"class": klass, "desc": desc}}).encode() + b"\n"
