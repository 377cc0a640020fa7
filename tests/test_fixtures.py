"""The test guests behave as tests/guests.py promises, proven with raw QMP.

Deliberately independent of qmpshutdown and qemu.qmp: a few lines of JSON over a
Unix socket, every read bounded, so these tests can vouch for the fixtures that
the library's own tests rely on.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar

import pytest

from guests import Guest, GuestFactory

pytestmark = [pytest.mark.qemu, pytest.mark.asyncio]

T = TypeVar("T")

#: Bound for one QMP reply (QEMU answers in milliseconds; TCG on 2 busy cores is slow).
REPLY_TIMEOUT = 10.0
#: Bound for a guest reaction to a press (handler start + poweroff under TCG).
REACTION_TIMEOUT = 20.0
#: Bound for QEMU's exit after SHUTDOWN (about 5 ms normally).
EXIT_TIMEOUT = 10.0
GUEST_SHUTDOWN = {"guest": True, "reason": "guest-shutdown"}


class RawQMP:
    """A minimal QMP client: JSON lines over a Unix socket, every read bounded."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._next_id = 0
        #: Every event received, in order.
        self.events: list[dict[str, Any]] = []
        self._taken = 0  # events[:_taken] have been handed out by wait_event

    @classmethod
    async def connect(cls, path: Path) -> RawQMP:
        reader, writer = await asyncio.wait_for(
            asyncio.open_unix_connection(str(path)), REPLY_TIMEOUT
        )
        client = cls(reader, writer)
        greeting = await client._read(REPLY_TIMEOUT)
        assert "QMP" in greeting, greeting
        assert await client.execute("qmp_capabilities") == {}
        return client

    async def _read(self, timeout: float) -> dict[str, Any]:
        line = await asyncio.wait_for(self._reader.readline(), timeout)
        if not line:
            raise EOFError(f"QMP socket closed; events so far: {self.event_names()}")
        message: dict[str, Any] = json.loads(line)
        return message

    async def _read_any(self, timeout: float) -> dict[str, Any]:
        message = await self._read(timeout)
        if "event" in message:
            self.events.append(message)
        return message

    async def execute(self, command: str, **arguments: Any) -> Any:
        """Run a command, return its ``return`` value (events read meanwhile are kept)."""
        self._next_id += 1
        request: dict[str, Any] = {"execute": command, "id": self._next_id}
        if arguments:
            request["arguments"] = arguments
        self._writer.write(json.dumps(request).encode() + b"\n")
        await asyncio.wait_for(self._writer.drain(), REPLY_TIMEOUT)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + REPLY_TIMEOUT
        while True:
            message = await self._read_any(max(0.0, deadline - loop.time()))
            if message.get("id") == self._next_id:
                assert "error" not in message, message
                return message["return"]

    async def status(self) -> str:
        reply = await self.execute("query-status")
        status: str = reply["status"]
        return status

    async def wait_event(self, name: str, timeout: float) -> dict[str, Any]:
        """The next event called ``name`` not returned before (earlier ones are skipped)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            for index in range(self._taken, len(self.events)):
                if self.events[index]["event"] == name:
                    self._taken = index + 1
                    return self.events[index]
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"no {name} within {timeout} s; events: {self.event_names()}")
            try:
                await self._read_any(remaining)
            except asyncio.TimeoutError:
                continue  # the loop raises with the event list

    async def collect(self, duration: float) -> None:
        """Read (and keep) events for ``duration`` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + duration
        while (remaining := deadline - loop.time()) > 0:
            try:
                await self._read_any(remaining)
            except asyncio.TimeoutError:
                return

    def event_names(self) -> list[str]:
        return [event["event"] for event in self.events]

    async def close(self) -> None:
        self._writer.close()
        with suppress(OSError, asyncio.TimeoutError):
            await asyncio.wait_for(self._writer.wait_closed(), REPLY_TIMEOUT)


@asynccontextmanager
async def qmp_of(guest: Guest) -> AsyncIterator[RawQMP]:
    assert guest.qmp_path is not None
    client = await RawQMP.connect(guest.qmp_path)
    try:
        yield client
    finally:
        await client.close()


async def start_paused(guests: GuestFactory, mode: str, **boot: Any) -> tuple[Guest, RawQMP]:
    """Boot with -S, connect, then ``cont``: the client sees every event from the start.

    The first event is then the RESUME that ``cont`` causes.
    """
    extra = (*boot.pop("extra_args", ()), "-S")
    guest = await guests.boot(mode, extra_args=extra, **boot)
    assert guest.qmp_path is not None
    qmp = await RawQMP.connect(guest.qmp_path)
    assert await qmp.status() == "prelaunch"
    await qmp.execute("cont")
    await guest.wait_for_serial(f"QMPSHUTDOWN-GUEST-READY mode={mode}", 60)
    return guest, qmp


async def all_of(*steps: Awaitable[T]) -> list[T]:
    """Run steps concurrently to their end, then raise the first failure if any."""
    results = await asyncio.gather(*steps, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results  # type: ignore[return-value]


def presses(guest: Guest) -> list[str]:
    return [line for line in guest.serial_lines() if line.startswith("QMPSHUTDOWN-GUEST-PRESS ")]


async def press_and_see(guest: Guest, qmp: RawQMP, n: int) -> None:
    """Press the button, check POWERDOWN, wait for the guest's n-th PRESS line."""
    assert await qmp.execute("system_powerdown") == {}
    await qmp.wait_event("POWERDOWN", REPLY_TIMEOUT)
    await guest.wait_for_serial(f"QMPSHUTDOWN-GUEST-PRESS n={n}\n", REACTION_TIMEOUT)


async def test_cooperative_powers_off_on_one_press(guests: GuestFactory) -> None:
    guest = await guests.boot("cooperative")
    async with qmp_of(guest) as qmp:
        assert await qmp.status() == "running"
        assert await qmp.execute("system_powerdown") == {}
        shutdown = await qmp.wait_event("SHUTDOWN", REACTION_TIMEOUT)
        assert shutdown["data"] == GUEST_SHUTDOWN
        assert qmp.event_names() == ["POWERDOWN", "SHUTDOWN"]
        assert await guest.wait_exit(EXIT_TIMEOUT) == 0
    assert presses(guest) == ["QMPSHUTDOWN-GUEST-PRESS n=1"]


async def test_no_shutdown_keeps_qemu_alive_after_guest_poweroff(guests: GuestFactory) -> None:
    guest = await guests.boot("cooperative", extra_args=["-no-shutdown"])
    async with qmp_of(guest) as qmp:
        assert await qmp.execute("system_powerdown") == {}
        shutdown = await qmp.wait_event("SHUTDOWN", REACTION_TIMEOUT)
        assert shutdown["data"] == GUEST_SHUTDOWN
        assert await qmp.status() == "shutdown"
        await qmp.collect(1.0)
        assert guest.alive()
        assert await qmp.status() == "shutdown"
        # Someone must say quit; QEMU may close the socket before it answers.
        with pytest.raises((EOFError, ConnectionError)):
            await qmp.execute("quit")
            await qmp.collect(EXIT_TIMEOUT)  # only EOF ends this early
            raise AssertionError("QMP socket still open after quit")
        quit_shutdown = await qmp.wait_event("SHUTDOWN", 0)
        assert quit_shutdown["data"] == {"guest": False, "reason": "host-qmp-quit"}
    assert await guest.wait_exit(EXIT_TIMEOUT) == 0


async def test_slow_powers_off_arg_seconds_after_press(guests: GuestFactory) -> None:
    guest = await guests.boot("slow", arg=3)
    async with qmp_of(guest) as qmp:
        loop = asyncio.get_running_loop()
        pressed_at = loop.time()
        await press_and_see(guest, qmp, 1)
        await guest.wait_for_serial("QMPSHUTDOWN-GUEST-SLOW-STOPPING seconds=3", REACTION_TIMEOUT)
        await qmp.collect(max(0.0, pressed_at + 2.0 - loop.time()))
        assert await qmp.status() == "running"
        assert guest.alive()
        assert "SHUTDOWN" not in qmp.event_names()
        shutdown = await qmp.wait_event("SHUTDOWN", 3 + 10)
        assert loop.time() - pressed_at >= 3.0
        assert shutdown["data"] == GUEST_SHUTDOWN
        assert await guest.wait_exit(EXIT_TIMEOUT) == 0
    assert "QMPSHUTDOWN-GUEST-SLOW-WORKING t=3" in guest.serial_lines()


async def test_needs_presses_powers_off_on_the_arg_th_press(guests: GuestFactory) -> None:
    guest = await guests.boot("needs-presses", arg=3)
    async with qmp_of(guest) as qmp:
        loop = asyncio.get_running_loop()
        for n in (1, 2):
            pressed_at = loop.time()
            await press_and_see(guest, qmp, n)
            await guest.wait_for_serial(
                f"QMPSHUTDOWN-GUEST-IGNORED-PRESS n={n} need=3", REACTION_TIMEOUT
            )
            await qmp.collect(max(0.0, pressed_at + 1.0 - loop.time()))
            assert await qmp.status() == "running"
        assert qmp.event_names() == ["POWERDOWN", "POWERDOWN"]
        assert await qmp.execute("system_powerdown") == {}
        shutdown = await qmp.wait_event("SHUTDOWN", REACTION_TIMEOUT)
        assert shutdown["data"] == GUEST_SHUTDOWN
        assert await guest.wait_exit(EXIT_TIMEOUT) == 0
    assert presses(guest) == [f"QMPSHUTDOWN-GUEST-PRESS n={n}" for n in (1, 2, 3)]


async def test_ignores_never_reacts_to_presses(guests: GuestFactory) -> None:
    guest = await guests.boot("ignores")
    async with qmp_of(guest) as qmp:
        for _ in range(3):
            assert await qmp.execute("system_powerdown") == {}
            await qmp.collect(1.0)
        await qmp.collect(5.0)
        assert qmp.event_names() == ["POWERDOWN"] * 3
        assert await qmp.status() == "running"
        assert guest.alive()
    assert guest.serial_lines() == ["QMPSHUTDOWN-GUEST-READY mode=ignores"]


async def test_asleep_suspends_q35_stays_deaf_after_wake_pc_wakes_and_obeys(
    guests: GuestFactory,
) -> None:
    async def common_start(machine: str, *extra: str) -> tuple[Guest, RawQMP]:
        guest, qmp = await start_paused(guests, "asleep", machine=machine, extra_args=extra)
        await qmp.wait_event("SUSPEND", 30)
        assert await qmp.status() == "suspended"
        assert "QMPSHUTDOWN-GUEST-SUSPENDING mem_sleep=[s2idle [deep]]" in guest.serial_lines()
        # A press to a sleeping guest: QEMU reports it, the guest sleeps on.
        assert await qmp.execute("system_powerdown") == {}
        await qmp.wait_event("POWERDOWN", REPLY_TIMEOUT)
        await qmp.collect(1.5)
        assert await qmp.status() == "suspended"
        # cont does not wake an S3 guest; system_wakeup does.
        assert await qmp.execute("cont") == {}
        assert await qmp.status() == "suspended"
        assert await qmp.execute("system_wakeup") == {}
        await qmp.wait_event("WAKEUP", REPLY_TIMEOUT)
        await guest.wait_for_serial("QMPSHUTDOWN-GUEST-RESUMED", REACTION_TIMEOUT)
        assert await qmp.status() == "running"
        # The press sent during sleep is lost, not delivered on wake-up.
        await qmp.collect(2.0)
        assert presses(guest) == []
        return guest, qmp

    async def q35() -> None:
        guest, qmp = await common_start("q35")
        try:
            # q35 + TCG + Debian 6.1: the button's interrupt never fires again after resume.
            assert await qmp.execute("system_powerdown") == {}
            await qmp.wait_event("POWERDOWN", REPLY_TIMEOUT)
            await qmp.collect(4.0)
            assert await qmp.status() == "running"
            assert guest.alive()
            assert presses(guest) == []
            assert qmp.event_names() == ["RESUME", "SUSPEND", "POWERDOWN", "WAKEUP", "POWERDOWN"]
        finally:
            await qmp.close()

    async def pc() -> None:
        guest, qmp = await common_start("pc", "-global", "PIIX4_PM.disable_s3=0")
        try:
            await press_and_see(guest, qmp, 1)
            shutdown = await qmp.wait_event("SHUTDOWN", REACTION_TIMEOUT)
            assert shutdown["data"] == GUEST_SHUTDOWN
            assert qmp.event_names() == [
                "RESUME", "SUSPEND", "POWERDOWN", "WAKEUP", "POWERDOWN", "SHUTDOWN"
            ]  # fmt: skip
            assert await guest.wait_exit(EXIT_TIMEOUT) == 0
        finally:
            await qmp.close()

    await all_of(q35(), pc())


async def test_panics_reports_guest_panicked_via_pvpanic(guests: GuestFactory) -> None:
    async def paused_on_panic() -> None:
        guest, qmp = await start_paused(
            guests, "panics", arg=1, extra_args=("-device", "pvpanic", "-action", "panic=pause")
        )
        try:
            panicked = await qmp.wait_event("GUEST_PANICKED", REACTION_TIMEOUT)
            assert panicked["data"]["action"] == "pause"
            # QEMU stops the vCPUs just after the event: wait for that before asking.
            await qmp.wait_event("STOP", REPLY_TIMEOUT)
            assert await qmp.status() == "guest-panicked"
            await qmp.collect(1.0)
            assert guest.alive()
            assert qmp.event_names() == ["RESUME", "GUEST_PANICKED", "STOP"]
        finally:
            await qmp.close()

    async def shut_down_on_panic() -> None:
        guest, qmp = await start_paused(guests, "panics", arg=1, extra_args=("-device", "pvpanic"))
        try:
            panicked = await qmp.wait_event("GUEST_PANICKED", REACTION_TIMEOUT)
            assert panicked["data"]["action"] == "poweroff"
            shutdown = await qmp.wait_event("SHUTDOWN", REACTION_TIMEOUT)
            assert shutdown["data"] == {"guest": True, "reason": "guest-panic"}
            names = qmp.event_names()
            assert names.index("GUEST_PANICKED") < names.index("SHUTDOWN"), names
            assert await guest.wait_exit(EXIT_TIMEOUT) == 0
        finally:
            await qmp.close()

    async def deaf_before_the_panic() -> None:
        # a damaged guest: nobody answers the button while it lasts
        guest = await guests.boot("panics", arg=30)
        async with qmp_of(guest) as qmp:
            assert await qmp.execute("system_powerdown") == {}
            await qmp.collect(2.0)
            assert qmp.event_names() == ["POWERDOWN"]
            assert await qmp.status() == "running"
        assert guest.serial_lines() == ["QMPSHUTDOWN-GUEST-READY mode=panics"]

    await all_of(paused_on_panic(), shut_down_on_panic(), deaf_before_the_panic())


async def test_reboots_resets_on_press_or_shuts_down_with_no_reboot(guests: GuestFactory) -> None:
    async def resets() -> None:
        guest = await guests.boot("reboots")
        async with qmp_of(guest) as qmp:
            await press_and_see(guest, qmp, 1)
            reset = await qmp.wait_event("RESET", REACTION_TIMEOUT)
            assert reset["data"] == {"guest": True, "reason": "guest-reset"}
            # The guest boots again, same kernel command line.
            await guest.wait_for_serial("QMPSHUTDOWN-GUEST-REBOOTING", 1)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 60
            while guest.serial_lines().count("QMPSHUTDOWN-GUEST-READY mode=reboots") < 2:
                assert loop.time() < deadline, guest.describe()
                await qmp.collect(0.1)
            assert await qmp.status() == "running"
            assert guest.alive()
            assert "SHUTDOWN" not in qmp.event_names()

    async def no_reboot() -> None:
        guest = await guests.boot("reboots", extra_args=["-no-reboot"])
        async with qmp_of(guest) as qmp:
            await press_and_see(guest, qmp, 1)
            shutdown = await qmp.wait_event("SHUTDOWN", REACTION_TIMEOUT)
            assert shutdown["data"] == {"guest": True, "reason": "guest-reset"}
            assert "RESET" not in qmp.event_names()
            assert await guest.wait_exit(EXIT_TIMEOUT) == 0

    await all_of(resets(), no_reboot())


async def test_boot_failure_reports_qemu_stderr(guests: GuestFactory) -> None:
    with pytest.raises(RuntimeError, match="'no-such-device' is not a valid device model name"):
        await guests.boot("cooperative", extra_args=["-device", "no-such-device"])
