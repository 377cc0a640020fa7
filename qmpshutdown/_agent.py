"""The guest agent seam: qemu-ga's JSON over the unix socket of its virtio-serial chardev.

qemu-ga speaks QMP's JSON without a greeting or capabilities. The socket may
hold stale bytes (a late reply to an earlier client's command, half a line):
a session starts with ``guest-sync-delimited`` and a random id, whose reply
comes after a 0xFF byte; everything before it is discarded, and replies with
another id are skipped. Every call is bounded by the policy's
``command_timeout``; after any timeout the next call resynchronises first,
since the late reply may still arrive. An agent socket whose agent is not
running in the guest accepts the connection and never answers: that costs one
``command_timeout`` (KubeVirt's guests ended Failed because libvirt waited
60 s for an absent agent, kubevirt/kubevirt#18721).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import anyio
import anyio.abc
import attrs

from ._finding import Finding

logger = logging.getLogger("qmpshutdown")

#: qemu-ga puts this byte before its reply to ``guest-sync-delimited``.
DELIMITER = 0xFF
#: A line longer than this is garbage, not a reply (qemu-ga's replies are short).
_MAX_LINE = 1024 * 1024


class AgentError(Exception):
    """The agent could not be reached, closed, or sent something that is not a reply."""


class AgentRefused(AgentError):
    """The agent answered a command with an error (``class``, ``desc``)."""

    def __init__(self, command: str, error: Mapping[str, Any]) -> None:
        self.error_class = str(error.get("class", ""))
        self.desc = str(error.get("desc", ""))
        super().__init__(f"{command} refused: {self.desc or self.error_class or error}")


class AgentClient:
    """One connection to a guest agent.

    :param stream: the connected unix socket stream.
    :param timeout: the bound of every call (``command_timeout``).
    """

    def __init__(self, stream: anyio.abc.ByteStream, timeout: float) -> None:
        self._stream = stream
        self._buffer = bytearray()
        self.timeout = timeout
        self._stale = True  #: a resync is due before the next command

    @classmethod
    async def connect(cls, path: str, bound: float) -> AgentClient:
        """Connect to *path* and resynchronise, both within *bound* (``command_timeout``).

        :raises AgentError: no connection, or no matching sync reply in time.
        """
        client: AgentClient | None = None
        try:
            with anyio.fail_after(bound):
                client = cls(await anyio.connect_unix(path), bound)
                await client.sync()
        except BaseException as err:
            if client is not None:
                await client.close()
            if isinstance(err, TimeoutError):
                raise AgentError(f"no reply to guest-sync-delimited in {bound:g} s") from err
            if isinstance(err, OSError):
                raise AgentError(f"cannot connect to the agent socket {path}: {err}") from err
            raise
        return client

    async def sync(self) -> None:
        """Resynchronise: ``guest-sync-delimited`` with a random id, bounded.

        :raises AgentError: no 0xFF and matching reply within the bound (or EOF).
        """
        token = int.from_bytes(os.urandom(4), "big") % (2**31 - 1) + 1  # not secrets: its import
        try:
            with anyio.fail_after(self.timeout):
                await self._send("guest-sync-delimited", {"id": token})
                await self._discard_until_delimiter()
                while True:
                    reply = await self._next_reply()
                    if reply.get("return") == token:
                        break
                    logger.debug("agent: skipped a reply that is not our sync: %r", reply)
        except TimeoutError as err:
            raise AgentError(f"no reply to guest-sync-delimited in {self.timeout:g} s") from err
        self._stale = False

    async def execute(
        self,
        command: str,
        arguments: Mapping[str, object] | None = None,
        *,
        bound: float | None = None,
    ) -> Any:
        """Run *command*; return its ``return`` value (resynchronising first if due).

        :param bound: the command's own bound (default ``command_timeout``);
            the resync, if due, has its own ``command_timeout``.
        :raises AgentRefused: the agent answered with an error.
        :raises AgentError: EOF, or a resync that failed.
        :raises TimeoutError: no reply in time (the next call resynchronises).
        """
        if self._stale:
            await self.sync()
        try:
            with anyio.fail_after(self.timeout if bound is None else bound):
                await self._send(command, arguments)
                reply = await self._next_reply()
        except BaseException:
            self._stale = True  # its reply may still come, before the next one's
            raise
        if "error" in reply:
            error = reply["error"]
            raise AgentRefused(command, error if isinstance(error, Mapping) else {"desc": error})
        return reply["return"]

    async def send_only(self, command: str, arguments: Mapping[str, object] | None = None) -> None:
        """Send a command that never replies on success (``guest-shutdown``), bounded.

        An error reply, if one comes, is read by :meth:`next_error`.
        """
        if self._stale:
            await self.sync()
        self._stale = True  # an error reply may come later
        with anyio.fail_after(self.timeout):
            await self._send(command, arguments)

    async def next_error(self, command: str) -> AgentError:
        """Wait (unbounded: the caller bounds it) for an error reply or EOF; return it."""
        try:
            while True:
                reply = await self._next_reply()
                if "error" in reply:
                    error = reply["error"]
                    mapping = error if isinstance(error, Mapping) else {"desc": error}
                    return AgentRefused(command, mapping)
        except AgentError as err:
            return err

    async def close(self) -> None:
        """Close the connection (never raises)."""
        try:
            with anyio.move_on_after(self.timeout, shield=True):
                await self._stream.aclose()
        except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass

    # ---- the wire --------------------------------------------------------------------

    async def _send(self, command: str, arguments: Mapping[str, object] | None) -> None:
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = dict(arguments)
        try:
            await self._stream.send(json.dumps(request).encode() + b"\n")
        except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError) as err:
            raise AgentError(f"sending {command} to the agent failed: {err!r}") from err

    async def _receive(self) -> None:
        try:
            data = await self._stream.receive()
        except anyio.EndOfStream:
            data = b""
        except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError) as err:
            raise AgentError(f"reading from the agent failed: {err!r}") from err
        if not data:
            raise AgentError("the agent closed its socket")
        self._buffer += data

    async def _discard_until_delimiter(self) -> None:
        while (at := self._buffer.find(DELIMITER)) < 0:
            self._buffer.clear()
            await self._receive()
        del self._buffer[: at + 1]

    async def _next_reply(self) -> dict[str, Any]:
        """The next line that is a JSON object with ``return`` or ``error`` (garbage skipped)."""
        while True:
            while (end := self._buffer.find(b"\n")) < 0:
                if len(self._buffer) > _MAX_LINE:
                    self._buffer.clear()
                await self._receive()
            line = bytes(self._buffer[:end]).strip().lstrip(bytes([DELIMITER]))
            del self._buffer[: end + 1]
            try:
                message = json.loads(line)
            except ValueError:
                if line:
                    logger.debug("agent: skipped a line that is not JSON: %r", line[:80])
                continue
            if isinstance(message, dict) and ("return" in message or "error" in message):
                return message


@attrs.frozen
class GuestInfo:
    """What the agent said about its guest.

    :ivar os: ``pretty-name`` of ``guest-get-osinfo``, else ``name``, else None.
    :ivar users: the logged-in users (``guest-get-users``), None if it did not say.
    :ivar os_id: ``id`` of ``guest-get-osinfo`` (``mswindows``, ``debian`` …), else None.
    """

    os: str | None
    users: tuple[str, ...] | None
    os_id: str | None = None


class AgentLink:
    """A ladder's way to its guest's agent: the socket path, one connection, what it said.

    Shared by the agent rung and the freeze: the connection is opened once
    (connect and resync bounded by one ``command_timeout``), reused, and closed
    when the ladder ends. An agent that did not answer once is not asked again
    in the same ladder (each probe would cost another ``command_timeout``).

    :param path: the unix socket of the agent's chardev.
    :param timeout: ``command_timeout``.
    """

    def __init__(self, path: str, timeout: float) -> None:
        self.path = path
        self.timeout = timeout
        self.client: AgentClient | None = None
        self.unreachable: str | None = None  #: why it did not answer, once it did not
        self.info: GuestInfo | None = None  #: set by the agent rung when the agent answered
        self.freeze_sent = False  #: a freeze was asked for (it may finish late): thaw at the end
        self.diagnosed = False  #: the diagnose step ran (it runs at most once per ladder)
        #: what the diagnose step found (``()``: nothing); None when the guest was not asked
        self.diagnosis: tuple[Finding, ...] | None = None

    async def connect(self) -> AgentClient | None:
        """The open connection, opened (and resynced) now if need be; None if no answer."""
        if self.client is not None:
            return self.client
        if self.unreachable is not None:
            return None
        try:
            self.client = await AgentClient.connect(self.path, self.timeout)
        except AgentError as err:
            self.unreachable = str(err)
            return None
        return self.client

    async def drop(self) -> None:
        """Close the connection (after EOF or a failed resync); a later call reconnects."""
        client, self.client = self.client, None
        if client is not None:
            await client.close()

    async def close(self) -> None:
        """Close the connection for good (shielded, bounded)."""
        with anyio.CancelScope(shield=True):
            await self.drop()


async def read_guest_info(client: AgentClient) -> tuple[GuestInfo, str]:
    """Ask ``guest-get-osinfo`` and ``guest-get-users``; return what they said and a note.

    A failed or timed-out query leaves its field None (and is said in the note).
    """
    notes = []
    os_name: str | None = None
    os_id: str | None = None
    users: tuple[str, ...] | None = None
    try:
        osinfo = await client.execute("guest-get-osinfo")
        if isinstance(osinfo, Mapping):
            name = osinfo.get("pretty-name") or osinfo.get("name")
            os_name = str(name) if name else None
            os_id = str(osinfo["id"]) if osinfo.get("id") else None
    except (AgentError, TimeoutError) as err:
        notes.append(f"guest-get-osinfo failed: {str(err) or 'no reply'}")
    try:
        listed = await client.execute("guest-get-users")
        if isinstance(listed, list):
            users = tuple(str(u.get("user")) for u in listed if isinstance(u, Mapping))
    except (AgentError, TimeoutError) as err:
        notes.append(f"guest-get-users failed: {str(err) or 'no reply'}")
    info = GuestInfo(os_name, users, os_id)
    said = [f"os {os_name or '?'}"]
    if users is not None:
        said.append(f"users: {', '.join(users) if users else 'nobody logged in'}")
    return info, "; ".join(said + notes)


# ---- running a command in the guest (guest-exec) -------------------------------------

#: The first wait between two ``guest-exec-status`` polls; each next one doubles, up to
#: :data:`_POLL_MAX` (a command that ends at once costs one poll).
_POLL_FIRST = 0.02
_POLL_MAX = 0.25


@attrs.frozen
class ExecOutput:
    """What a command run through ``guest-exec`` did.

    :ivar exitcode: its exit status, None when it ended by a signal.
    :ivar stdout: its standard output, at most the cap asked for.
    :ivar stderr: its standard error, as capped.
    :ivar truncated: the agent or the cap cut some of it.
    """

    exitcode: int | None
    stdout: bytes
    stderr: bytes
    truncated: bool


def enabled_commands(info: object) -> frozenset[str] | None:
    """The commands ``guest-info`` lists as enabled; None when its answer has no list."""
    if not isinstance(info, Mapping) or not isinstance(info.get("supported_commands"), list):
        return None
    return frozenset(
        str(entry.get("name"))
        for entry in info["supported_commands"]
        if isinstance(entry, Mapping) and entry.get("enabled", True)
    )


async def guest_exec(client: AgentClient, argv: Sequence[str], *, cap: int) -> ExecOutput:
    """Run *argv* in the guest (``guest-exec``, output captured) and wait for its end.

    Nothing of *argv* goes through a shell: ``path`` is ``argv[0]``, ``arg`` the rest.
    Each agent call is bounded by ``command_timeout``; the caller bounds the whole (a
    command that never ends keeps polling until then).

    :param cap: keep at most this many bytes of each stream.
    :raises AgentRefused: the agent refused (guest-exec disabled, no such program).
    :raises AgentError: the agent closed or sent garbage.
    :raises TimeoutError: the agent did not answer one call in time.
    """
    import base64  # only when a guest is asked (the fast path never is)

    started = await client.execute(
        "guest-exec", {"path": argv[0], "arg": list(argv[1:]), "capture-output": True}
    )
    if not isinstance(started, Mapping) or not isinstance(started.get("pid"), int):
        raise AgentError(f"guest-exec gave no pid: {started!r:.80}")
    pause = _POLL_FIRST
    while True:
        status = await client.execute("guest-exec-status", {"pid": started["pid"]})
        if not isinstance(status, Mapping):
            raise AgentError(f"guest-exec-status gave {status!r:.80}")
        if status.get("exited"):
            break
        await anyio.sleep(pause)
        pause = min(pause * 2, _POLL_MAX)
    streams = []
    truncated = bool(status.get("out-truncated") or status.get("err-truncated"))
    for key in ("out-data", "err-data"):
        try:
            data = base64.b64decode(str(status.get(key) or ""), validate=False)
        except ValueError as err:
            raise AgentError(f"guest-exec-status: {key} is not base64: {err}") from err
        truncated = truncated or len(data) > cap
        streams.append(data[:cap])
    code = status.get("exitcode")
    exitcode = code if isinstance(code, int) and not isinstance(code, bool) else None
    return ExecOutput(exitcode, streams[0], streams[1], truncated)
