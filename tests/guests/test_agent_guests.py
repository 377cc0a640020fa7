"""The agent rung and the freeze before force on real guests running Debian's qemu-ga.

The fixture guests' agent mode (``guests.boot(mode, agent=True)``) runs qemu-ga
on ``org.qemu.guest_agent.0``; ``disk=True`` adds the ext4 disk the guest
writes to, so that a freeze has a filesystem to freeze.
"""

from __future__ import annotations

import anyio
import attrs
import pytest

import qmpshutdown
from qmpshutdown import Cause, Stage
from support.guests import AGENT_PORT_NAME, RawAgent
from support.policies import GUEST
from support.records import as_pressed

pytestmark = [pytest.mark.asyncio, pytest.mark.qemu]

#: GUEST with the default ladder (the agent rung in it).
POLICY = attrs.evolve(
    GUEST, stages=("powerdown", "agent", "quit", "terminate", "kill"),
    agent_timeout=20.0, freeze_timeout=10.0,
)  # fmt: skip
#: Slack for a loaded 2-core machine on top of the bound the library promises.
MARGIN = 2.0


def outcomes(result):
    return [(step.stage.value, step.outcome.value) for step in result.steps]


async def stop(guest, policy=POLICY, **kwargs):
    with anyio.fail_after(policy.bound + 10):
        return as_pressed(
            await qmpshutdown.shutdown(guest.qmp_path, policy, agent=guest.agent_path, **kwargs)
        )


async def agent_status(guest) -> str:
    agent = await RawAgent.connect(guest.agent_path)
    try:
        status: str = await agent.execute("guest-fsfreeze-status")
        return status
    finally:
        await agent.close()


async def test_ignored_button_then_the_agent_powers_the_guest_off(guests):
    guest = await guests.boot("ignores", agent=True)
    result = await stop(guest)
    assert (result.stage, result.graceful, result.reason) == (Stage.AGENT, True, "guest-shutdown")
    # Asked why first: this busybox guest has no systemd, so no question could be read.
    assert outcomes(result) == [("powerdown", "timeout"), ("diagnose", "failed"), ("agent", "done")]
    diagnose = result.step("diagnose")
    assert "could not read 4" in diagnose.detail and "busctl" in diagnose.detail
    assert result.diagnosis == ()
    assert result.guest_users == ()
    assert result.guest_os  # the fixture's qemu-ga names the OS (pretty-name)
    assert result.cause is Cause.IGNORED_POWER_BUTTON
    assert "sent guest-shutdown" in result.step("agent").detail
    assert await guest.wait_exit(5.0) == 0


async def test_agent_first_on_a_cooperative_guest_sends_no_press(guests):
    guest = await guests.boot("cooperative", agent=True)
    policy = attrs.evolve(POLICY, stages=("agent", "powerdown", "quit"))
    result = await stop(guest, policy)
    assert (result.stage, result.graceful, result.presses) == (Stage.AGENT, True, 0)
    assert outcomes(result) == [("agent", "done")]
    assert "POWERDOWN" not in [event.event for event in result.events]
    assert not any("PRESS" in line for line in guest.serial_lines())


async def test_an_agent_socket_without_an_agent_is_skipped_within_command_timeout(guests, tmp_path):
    socket = tmp_path / "no-agent.sock"
    port = [
        "-chardev", f"socket,id=qga,path={socket},server=on,wait=off",
        "-device", "virtio-serial-pci,id=vser0",
        "-device", f"virtserialport,bus=vser0.0,chardev=qga,name={AGENT_PORT_NAME}",
    ]  # fmt: skip
    guest = await guests.boot("ignores", extra_args=port)  # no qemu-ga in this initramfs
    with anyio.fail_after(POLICY.bound + 10):
        result = await qmpshutdown.shutdown(guest.qmp_path, POLICY, agent=socket)
    assert outcomes(result) == [
        ("powerdown", "timeout"), ("diagnose", "skipped"), ("agent", "skipped"),
        ("freeze", "skipped"), ("quit", "done"),
    ]  # fmt: skip
    # The diagnosis is the first to try it, for one command_timeout; nobody tries again.
    diagnose, agent = result.step("diagnose"), result.step("agent")
    assert diagnose.ended - diagnose.started < POLICY.command_timeout + MARGIN
    assert agent.ended - agent.started < MARGIN
    assert agent.detail == diagnose.detail == (
        f"no agent answered (no reply to guest-sync-delimited in {POLICY.command_timeout:g} s)"
    )
    assert (result.stage, result.guest_os, result.guest_users) == (Stage.QUIT, None, None)


async def test_a_guest_left_frozen_is_thawed_then_shut_down_by_its_agent(guests):
    guest = await guests.boot("ignores", agent=True, disk=True)
    agent = await RawAgent.connect(guest.agent_path)
    try:
        assert await agent.execute("guest-fsfreeze-freeze") >= 1
    finally:
        await agent.close()  # a backup tool that crashed, leaving the guest frozen
    assert await agent_status(guest) == "frozen"
    result = await stop(guest, attrs.evolve(POLICY, stages=("agent",)))
    assert outcomes(result) == [("thaw", "done"), ("agent", "done")]
    assert result.step("thaw").detail.startswith("the guest was found frozen; thawed ")
    assert (result.stage, result.graceful, result.reason) == (Stage.AGENT, True, "guest-shutdown")


async def test_a_cancelled_caller_after_the_freeze_gets_a_thawed_running_guest(guests):
    guest = await guests.boot("ignores", agent=True, disk=True)
    policy = attrs.evolve(POLICY, stages=("quit",))
    ended = []
    with anyio.fail_after(policy.bound + 10), anyio.CancelScope() as caller:

        def on_progress(update):
            if update.step is not None:
                ended.append((update.step.stage.value, update.step.outcome.value))
                if update.step.stage is Stage.FREEZE:
                    caller.cancel()

        await qmpshutdown.shutdown(
            guest.qmp_path, policy, agent=guest.agent_path, on_progress=on_progress
        )
    assert caller.cancelled_caught
    assert ended == [("freeze", "done"), ("thaw", "done")]
    assert guest.alive()
    assert await agent_status(guest) == "thawed"
