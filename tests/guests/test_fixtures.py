"""The test guests behave as tests/support/guests.py promises, proven with raw QMP.

Deliberately independent of qmpshutdown and qemu.qmp: a few lines of JSON over a
Unix socket, every read bounded, so these tests can vouch for the fixtures that
the library's own tests rely on.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar

import pytest

from support import saved
from support.guests import MODES, Guest, GuestFactory, RawAgent, decode_png, inspect_disk

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


@pytest.mark.skipif(not saved.ENABLED, reason="QMPSHUTDOWN_TEST_RESTORE=0 boots every guest")
@pytest.mark.parametrize("mode", ["needs-presses"])
async def test_a_restored_guest_is_the_booted_one_at_ready(guests: GuestFactory, mode: str) -> None:
    # The second of a kind (if not the first: another test booted the kind before) loads
    # the state saved at the first one's READY; a guest booted with restore=False does not.
    restored, booted = await all_of(
        guests.boot(mode, agent=True), guests.boot(mode, agent=True, restore=False)
    )
    assert restored.argv[-2] == "-incoming" and "-incoming" not in booted.argv
    for guest in (restored, booted):
        # The same console (the first one's lines, READY last), the same agent, the same button.
        assert guest.serial_lines()[-1] == f"QMPSHUTDOWN-GUEST-READY mode={mode}"
        agent = await RawAgent.connect(guest.agent_path)
        try:
            assert await agent.execute("guest-ping") == {}
        finally:
            await agent.close()
        async with qmp_of(guest) as qmp:
            assert await qmp.status() == "running"
            await press_and_see(guest, qmp, 1)  # the first of the two it needs
            assert await qmp.execute("system_powerdown") == {}
            shutdown = await qmp.wait_event("SHUTDOWN", REACTION_TIMEOUT)
            assert shutdown["data"] == GUEST_SHUTDOWN
            assert await guest.wait_exit(EXIT_TIMEOUT) == 0
        assert guest.stderr_text() == ""


@pytest.mark.skipif(not saved.ENABLED, reason="QMPSHUTDOWN_TEST_RESTORE=0 boots every guest")
async def test_a_restored_guest_with_a_disk_writes_on_and_powers_off_clean(
    guests: GuestFactory,
) -> None:
    # Restored (its kind's first guest, if none was, is booted and saved first): the disk
    # copied at the save's end is the one its page cache and journal expect.
    guest = await guests.boot("needs-presses", disk=True)
    assert guest.argv[-2] == "-incoming"
    assert "QMPSHUTDOWN-GUEST-DISK-MOUNTED dev=/dev/vda" in guest.serial_lines()
    before = max(wrote(guest), default=0)
    await wait_wrote(guest, before + 2)  # on from the counter the state holds
    async with qmp_of(guest) as qmp:
        await press_and_see(guest, qmp, 1)  # the first of the two it needs
        assert await qmp.execute("system_powerdown") == {}
        shutdown = await qmp.wait_event("SHUTDOWN", REACTION_TIMEOUT)
        assert shutdown["data"] == GUEST_SHUTDOWN
        assert await guest.wait_exit(EXIT_TIMEOUT) == 0
    assert "QMPSHUTDOWN-GUEST-DISK-UNMOUNTED" in guest.serial_lines()
    assert guest.disk_path is not None
    state = await asyncio.to_thread(inspect_disk, guest.disk_path)
    assert not state.needs_recovery, state.header
    assert state.counter == max(wrote(guest))


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


async def test_counts_ticks_from_ram_once_a_second_and_ignores_presses(
    guests: GuestFactory,
) -> None:
    guest = await guests.boot("counts")
    await guest.wait_for_serial("QMPSHUTDOWN-GUEST-TICK n=2\n", REACTION_TIMEOUT)
    async with qmp_of(guest) as qmp:
        for _ in range(2):
            assert await qmp.execute("system_powerdown") == {}
            await qmp.wait_event("POWERDOWN", REPLY_TIMEOUT)
        await guest.wait_for_serial("QMPSHUTDOWN-GUEST-TICK n=5\n", REACTION_TIMEOUT)
        assert await qmp.status() == "running"
        assert guest.alive()
    lines = guest.serial_lines()
    assert lines[0] == "QMPSHUTDOWN-GUEST-READY mode=counts"
    ticks = lines[1:]
    # One counter, counting on from 1 without a gap; nobody answers the button.
    assert ticks == [f"QMPSHUTDOWN-GUEST-TICK n={n}" for n in range(1, len(ticks) + 1)]


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


# --------------------------------------------------------------------------- helpers: agent, disk


async def quit_qemu(guest: Guest, qmp: RawQMP) -> None:
    """``quit`` (QEMU may close the socket before it answers), then wait for the exit."""
    with suppress(EOFError, ConnectionError, asyncio.TimeoutError):
        await qmp.execute("quit")
        await qmp.collect(EXIT_TIMEOUT)
    assert await guest.wait_exit(EXIT_TIMEOUT) == 0


def wrote(guest: Guest) -> list[int]:
    """The counter values the guest reported durable, in order."""
    prefix = "QMPSHUTDOWN-GUEST-WROTE n="
    return [int(line[len(prefix) :]) for line in guest.serial_lines() if line.startswith(prefix)]


async def wait_wrote(guest: Guest, n: int, timeout: float = REACTION_TIMEOUT) -> None:
    await guest.wait_for_serial(f"QMPSHUTDOWN-GUEST-WROTE n={n}\n", timeout)


@asynccontextmanager
async def agent_of(guest: Guest) -> AsyncIterator[RawAgent]:
    assert guest.agent_path is not None
    agent = await RawAgent.connect(guest.agent_path, REPLY_TIMEOUT)
    try:
        yield agent
    finally:
        await agent.close()


async def test_agent_answers_and_shuts_down_a_guest_that_ignores_the_button(
    guests: GuestFactory,
) -> None:
    guest = await guests.boot("ignores", agent=True, disk=True)
    assert "QMPSHUTDOWN-GUEST-AGENT-READY port=/dev/vport0p1" in guest.serial_lines()
    async with qmp_of(guest) as qmp, agent_of(guest) as agent:
        assert await agent.execute("guest-sync", id=12345) == 12345
        osinfo = await agent.execute("guest-get-osinfo")
        assert (osinfo["id"], osinfo["name"]) == ("debian", "Debian GNU/Linux")
        assert osinfo["variant-id"] == "qsd-test-guest"
        assert await agent.execute("guest-get-users") == []
        assert await agent.execute("guest-fsfreeze-status") == "thawed"
        await wait_wrote(guest, 2)
        assert await agent.execute("guest-fsfreeze-freeze") == 1
        assert await agent.execute("guest-fsfreeze-status") == "frozen"
        # A frozen agent refuses guest-shutdown (as on a real Debian guest).
        refused = await agent.call("guest-shutdown")
        assert refused["error"]["class"] == "CommandNotFound", refused
        assert "frozen" in refused["error"]["desc"]
        assert await agent.execute("guest-fsfreeze-thaw") == 1
        assert await agent.execute("guest-fsfreeze-status") == "thawed"
        after_thaw = max(wrote(guest))
        await wait_wrote(guest, after_thaw + 1)  # the writer goes on after the thaw

        assert await qmp.execute("system_powerdown") == {}
        await qmp.collect(1.0)
        assert await qmp.status() == "running"
        await agent.send_no_reply("guest-shutdown")
        shutdown = await qmp.wait_event("SHUTDOWN", REACTION_TIMEOUT)
        assert shutdown["data"] == GUEST_SHUTDOWN
        assert qmp.event_names() == ["POWERDOWN", "SHUTDOWN"]
        assert await guest.wait_exit(EXIT_TIMEOUT) == 0
    lines = guest.serial_lines()
    assert (
        "QMPSHUTDOWN-GUEST-SHUTDOWN-COMMAND action=poweroff args=-h -P +0 "
        "hypervisor initiated shutdown"
    ) in lines
    assert lines[-2:] == ["QMPSHUTDOWN-GUEST-DISK-UNMOUNTED", "QMPSHUTDOWN-GUEST-POWERING-OFF"]
    assert guest.disk_path is not None
    state = await asyncio.to_thread(inspect_disk, guest.disk_path)
    assert not state.needs_recovery, state.header
    assert state.fsck_clean
    assert state.counter == max(wrote(guest))


async def test_agent_shutdown_reboot_and_halt_modes(guests: GuestFactory) -> None:
    async def reboot() -> None:
        guest = await guests.boot("cooperative", agent=True, extra_args=["-no-reboot"])
        async with qmp_of(guest) as qmp, agent_of(guest) as agent:
            # Without a disk nothing is frozen, and that is no error.
            assert await agent.execute("guest-fsfreeze-freeze") == 0
            assert await agent.execute("guest-fsfreeze-thaw") == 0
            await agent.send_no_reply("guest-shutdown", mode="reboot")
            shutdown = await qmp.wait_event("SHUTDOWN", REACTION_TIMEOUT)
            assert shutdown["data"] == {"guest": True, "reason": "guest-reset"}
            assert await guest.wait_exit(EXIT_TIMEOUT) == 0
        assert "QMPSHUTDOWN-GUEST-REBOOTING" in guest.serial_lines()

    async def halt() -> None:
        guest = await guests.boot("cooperative", agent=True, disk=True)
        async with qmp_of(guest) as qmp, agent_of(guest) as agent:
            await wait_wrote(guest, 1)
            await agent.send_no_reply("guest-shutdown", mode="halt")
            await guest.wait_for_serial("QMPSHUTDOWN-GUEST-HALTING", REACTION_TIMEOUT)
            await qmp.collect(2.0)
            # A halted guest is not powered off: QEMU runs on, no SHUTDOWN.
            assert "SHUTDOWN" not in qmp.event_names()
            assert await qmp.status() == "running"
            await quit_qemu(guest, qmp)
        assert "QMPSHUTDOWN-GUEST-DISK-UNMOUNTED" in guest.serial_lines()
        assert guest.disk_path is not None
        state = await asyncio.to_thread(inspect_disk, guest.disk_path)
        assert not state.needs_recovery, state.header
        assert state.counter == max(wrote(guest))

    await all_of(reboot(), halt())


async def test_disk_quit_leaves_journal_dirty_freeze_then_quit_leaves_it_clean(
    guests: GuestFactory,
) -> None:
    async def forced_quit() -> None:
        guest = await guests.boot("cooperative", disk=True)
        async with qmp_of(guest) as qmp:
            await wait_wrote(guest, 3)
            await quit_qemu(guest, qmp)
        assert guest.disk_path is not None
        state = await asyncio.to_thread(inspect_disk, guest.disk_path)
        assert state.needs_recovery, state.header

    async def frozen_quit() -> None:
        guest = await guests.boot("cooperative", disk=True, agent=True)
        async with qmp_of(guest) as qmp, agent_of(guest) as agent:
            await wait_wrote(guest, 3)
            last_before = max(wrote(guest))
            assert await agent.execute("guest-fsfreeze-freeze") >= 1
            await quit_qemu(guest, qmp)
        assert guest.disk_path is not None
        state = await asyncio.to_thread(inspect_disk, guest.disk_path)
        assert not state.needs_recovery, state.header
        assert state.fsck_clean
        assert state.counter is not None
        # Every value reported durable is on disk; at most one more was written, unreported.
        assert last_before <= max(wrote(guest)) <= state.counter <= max(wrote(guest)) + 1

    await all_of(forced_quit(), frozen_quit())


# --------------------------------------------------------------------------- helpers: CPU


async def vcpu_thread(qmp: RawQMP) -> int:
    cpus = await qmp.execute("query-cpus-fast")
    assert len(cpus) == 1, cpus
    thread_id: int = cpus[0]["thread-id"]
    return thread_id


def cpu_seconds(pid: int, tid: int) -> float:
    """utime + stime of one thread of ``pid``, in seconds."""
    stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wanted_seconds(pid: int, tid: int) -> float:
    """Seconds one thread of ``pid`` ran or waited to run (schedstat: on CPU + runqueue)."""
    on_cpu, waiting, _ = Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()
    return (int(on_cpu) + int(waiting)) / 1e9


async def cpu_per_second(guest: Guest, tid: int, seconds: int) -> tuple[list[float], list[float]]:
    """The vCPU thread's CPU seconds, and seconds it wanted a CPU, in each next second.

    CPU seconds (``stat``) drop when other work on the host takes the cores; the time
    the thread ran or sat runnable (``schedstat``) stays near 1.0 s/s for a busy
    guest however loaded the host is, and near 0 for an idle one.
    """
    loop = asyncio.get_running_loop()
    cpu: list[float] = []
    wanted: list[float] = []
    before = cpu_seconds(guest.pid, tid), wanted_seconds(guest.pid, tid), loop.time()
    for _ in range(seconds):
        await asyncio.sleep(max(0.0, before[2] + 1.0 - loop.time()))
        now = cpu_seconds(guest.pid, tid), wanted_seconds(guest.pid, tid), loop.time()
        cpu.append(round((now[0] - before[0]) / (now[2] - before[2]), 2))
        wanted.append(round((now[1] - before[1]) / (now[2] - before[2]), 2))
        before = now
    return cpu, wanted


async def test_updating_burns_a_cpu_for_arg_seconds_then_powers_off(
    guests: GuestFactory,
) -> None:
    guest = await guests.boot("updating", arg=6)
    async with qmp_of(guest) as qmp:
        tid = await vcpu_thread(qmp)
        idle_cpu, idle_wanted = await cpu_per_second(guest, tid, 2)
        assert max(idle_cpu) < 0.1 and max(idle_wanted) < 0.15, (idle_cpu, idle_wanted)
        loop = asyncio.get_running_loop()
        pressed_at = loop.time()
        await press_and_see(guest, qmp, 1)
        await guest.wait_for_serial("QMPSHUTDOWN-GUEST-UPDATING-STARTED seconds=6", 5)
        busy_cpu, busy_wanted = await cpu_per_second(guest, tid, 4)
        assert min(busy_wanted) > 0.85, (busy_cpu, busy_wanted)
        assert min(busy_cpu) > 0.25, (busy_cpu, busy_wanted)  # even on a crowded host
        assert "SHUTDOWN" not in qmp.event_names()
        shutdown = await qmp.wait_event("SHUTDOWN", 6 + REACTION_TIMEOUT)
        assert loop.time() - pressed_at >= 6.0
        assert shutdown["data"] == GUEST_SHUTDOWN
        assert await guest.wait_exit(EXIT_TIMEOUT) == 0
    lines = guest.serial_lines()
    ticks = [line for line in lines if line.startswith("QMPSHUTDOWN-GUEST-UPDATING t=")]
    assert ticks == [f"QMPSHUTDOWN-GUEST-UPDATING t={t}" for t in range(1, 7)]
    assert lines[-1] == "QMPSHUTDOWN-GUEST-POWERING-OFF"


async def test_updating_writes_the_disk_and_ignores_more_presses(guests: GuestFactory) -> None:
    guest = await guests.boot("updating", arg=3, disk=True)
    async with qmp_of(guest) as qmp:
        await press_and_see(guest, qmp, 1)
        await press_and_see(guest, qmp, 2)
        await guest.wait_for_serial("QMPSHUTDOWN-GUEST-UPDATING-ALREADY", REACTION_TIMEOUT)
        shutdown = await qmp.wait_event("SHUTDOWN", 3 + REACTION_TIMEOUT)
        assert shutdown["data"] == GUEST_SHUTDOWN
        assert await guest.wait_exit(EXIT_TIMEOUT) == 0
    lines = guest.serial_lines()
    assert "QMPSHUTDOWN-GUEST-UPDATING t=3" in lines
    assert lines[-2:] == ["QMPSHUTDOWN-GUEST-DISK-UNMOUNTED", "QMPSHUTDOWN-GUEST-POWERING-OFF"]
    assert guest.disk_path is not None
    state = await asyncio.to_thread(inspect_disk, guest.disk_path)
    assert not state.needs_recovery, state.header
    assert state.counter == max(wrote(guest))


async def test_stalls_works_a_second_then_waits_forever(guests: GuestFactory) -> None:
    guest = await guests.boot("stalls")
    async with qmp_of(guest) as qmp:
        tid = await vcpu_thread(qmp)
        before = cpu_seconds(guest.pid, tid), wanted_seconds(guest.pid, tid)
        await press_and_see(guest, qmp, 1)
        await guest.wait_for_serial("QMPSHUTDOWN-GUEST-STALLED", REACTION_TIMEOUT)
        burst = cpu_seconds(guest.pid, tid) - before[0], wanted_seconds(guest.pid, tid) - before[1]
        assert burst[1] >= 0.9 and burst[0] >= 0.3, burst
        await asyncio.sleep(0.5)
        after_cpu, after_wanted = await cpu_per_second(guest, tid, 4)
        # Idle: a working guest wants near 1 s/s in every second. An idle one's wake-ups can
        # sit runnable for a while on a loaded host (CI: 0.31 s of one second, 0 s ran).
        idle_seconds = sum(wanted < 0.15 for wanted in after_wanted)
        assert max(after_cpu) < 0.1 and idle_seconds >= 3, (after_cpu, after_wanted)
        await press_and_see(guest, qmp, 2)
        await guest.wait_for_serial("QMPSHUTDOWN-GUEST-STALLED-ALREADY", REACTION_TIMEOUT)
        await qmp.collect(2.0)
        assert await qmp.status() == "running"
        assert "SHUTDOWN" not in qmp.event_names()
        assert guest.alive()


# --------------------------------------------------------------------------- helpers: display


async def screen_of(guest: Guest, qmp: RawQMP, name: str) -> list[bytes]:
    """A screendump of the guest's VGA console, checked to be 720x400 and not one colour."""
    path = guest.workdir / f"{name}.png"
    assert await qmp.execute("screendump", filename=str(path), format="png") == {}
    width, height, rows = await asyncio.to_thread(decode_png, path.read_bytes())
    assert (width, height) == (720, 400)
    colours = {row[x : x + 3] for row in rows[::4] for x in range(0, len(row), 3 * 3)}
    assert len(colours) >= 2, f"{name}: a single colour {colours}"
    return rows


async def test_display_shows_a_screen_per_behaviour(guests: GuestFactory) -> None:
    async def ignores() -> None:
        guest = await guests.boot("ignores", display=True)
        async with qmp_of(guest) as qmp:
            await screen_of(guest, qmp, "login")

    async def changes_on_press(mode: str, arg: int | None, line: str) -> None:
        guest = await guests.boot(mode, arg=arg, display=True)
        async with qmp_of(guest) as qmp:
            before = await screen_of(guest, qmp, "before")
            await press_and_see(guest, qmp, 1)
            await guest.wait_for_serial(line, REACTION_TIMEOUT)
            await asyncio.sleep(0.5)  # the console is redrawn at QEMU's next refresh
            after = await screen_of(guest, qmp, "after")
            assert before != after, f"{mode}: the screen did not change after the press"
            # The serial console still works beside the VGA one.
            assert guest.serial_lines()[0] == f"QMPSHUTDOWN-GUEST-READY mode={mode}"

    await all_of(
        ignores(),
        changes_on_press("slow", 30, "QMPSHUTDOWN-GUEST-SLOW-STOPPING"),
        changes_on_press("updating", 30, "QMPSHUTDOWN-GUEST-UPDATING t=1"),
        changes_on_press("stalls", None, "QMPSHUTDOWN-GUEST-STALLED"),
    )


async def test_every_mode_boots_with_agent_disk_and_display(guests: GuestFactory) -> None:
    async def boot(mode: str) -> None:
        # asleep and panics act on their own after READY: give them time to be asked.
        arg = 60 if mode in ("asleep", "panics") else None
        # Booted, never restored: the boot is what this test is about.
        guest = await guests.boot(
            mode, arg=arg, agent=True, disk=True, display=True, restore=False
        )
        async with agent_of(guest) as agent:
            assert await agent.execute("guest-sync", id=7) == 7
        await wait_wrote(guest, 1)
        lines = guest.serial_lines()
        assert lines.index("QMPSHUTDOWN-GUEST-DISK-MOUNTED dev=/dev/vda") < lines.index(
            f"QMPSHUTDOWN-GUEST-READY mode={mode}"
        )
        assert "QMPSHUTDOWN-GUEST-AGENT-READY port=/dev/vport0p1" in lines
        guest.popen.kill()  # this guest only; the fixture reaps it too
        await guest.wait_exit(EXIT_TIMEOUT)

    for start in range(0, len(MODES), 3):  # three at a time: the machine has two cores
        await all_of(*(boot(mode) for mode in MODES[start : start + 3]))
