"""A reboot is not a refusal, on real QEMU guests (qmpshutdown/_rungs/reboot.py).

While the ladder presses the power button QEMU's reboot action is ``shutdown``:
a guest that reboots on the press ends QEMU unforced, with the very record a
``-no-reboot`` QEMU gives. A ladder that ends with QEMU still running puts the
command line's action back: the guest's next reboot is a reboot again (RESET,
the guest runs on). CI runs these on QEMU 7.2 and 10.0 (``QMPSHUTDOWN_QEMU``).
"""

from __future__ import annotations

import asyncio
import contextlib
import re

import anyio
import attrs
import pytest
from qemu.qmp import EventListener

import qmpshutdown
from qmpshutdown import Stage
from support.guests import RawAgent, qmp_connect, qmp_disconnect
from support.policies import GUEST
from support.records import as_pressed

pytestmark = [pytest.mark.asyncio, pytest.mark.qemu]

POLICY = GUEST
#: Bound for a guest's reaction (a reboot under TCG on 2 busy cores).
REACTION_TIMEOUT = 30.0


def record(result: qmpshutdown.ShutdownResult) -> tuple[object, ...]:
    """What a record says, times and the number of presses aside (a loaded host may re-press)."""
    pressed = re.compile(r"pressed (once|\d+ times)")
    return (
        result.stage, result.graceful, result.reason, result.cause,
        [(s.stage.value, s.outcome.value, pressed.sub("pressed", s.detail)) for s in result.steps],
        [(e.event, dict(e.data)) for e in result.events if e.event != "POWERDOWN"],
    )  # fmt: skip


async def stop(path, policy=POLICY):
    with anyio.fail_after(policy.bound + 10):
        return as_pressed(await qmpshutdown.shutdown(path, policy))


async def test_a_rebooting_guest_is_stopped_unforced_as_under_no_reboot(guests):
    rebooting, no_reboot = await guests.boot_many(
        "reboots", {"mode": "reboots", "extra_args": ["-no-reboot"]}
    )
    result, expected = await asyncio.gather(stop(rebooting.qmp_path), stop(no_reboot.qmp_path))
    assert record(result) == record(expected), (result.summary(), expected.summary())
    assert (result.stage, result.graceful, result.reason, result.cause) == (
        Stage.POWERDOWN, True, "guest-reset", None,
    )  # fmt: skip
    assert result.presses >= 1
    assert result.steps[0].detail.endswith("guest powered off (SHUTDOWN guest-reset)")
    assert [(s.stage.value, s.outcome.value) for s in result.steps] == [("powerdown", "done")]
    assert "RESET" not in [e.event for e in result.events]  # no new boot
    assert not result.forced
    assert await rebooting.wait_exit(5) == 0
    assert await no_reboot.wait_exit(5) == 0


@pytest.mark.parametrize("how", ["cancelled", "no-force", "never-pressed"])
async def test_a_ladder_ending_with_qemu_running_puts_the_reboot_action_back(guests, how):
    # never-pressed: the set-action went out with the handshake, and no press came to
    # take its answer (a paused guest and resume_paused off): put back all the same.
    paused = how == "never-pressed"
    guest = await guests.boot("ignores", agent=True, extra_args=["-S"] if paused else ())
    if paused:
        policy = attrs.evolve(POLICY, stages=("powerdown",))
        with pytest.raises(qmpshutdown.ShutdownFailed) as failed:
            await stop(guest.qmp_path, policy)
        result = failed.value.result
        assert (result.presses, result.runstate) == (0, "prelaunch")
        assert [(s.stage.value, s.outcome.value) for s in result.steps] == [
            ("powerdown", "skipped")
        ]
        client = await qmp_connect(guest.qmp_path)
        try:
            await client.execute("cont")
        finally:
            await qmp_disconnect(client)
        await guest.wait_for_serial("QMPSHUTDOWN-GUEST-AGENT-READY", REACTION_TIMEOUT * 4)
    elif how == "cancelled":
        with anyio.move_on_after(1.5) as scope:  # the press is sent at once; then cancel
            await stop(guest.qmp_path, attrs.evolve(POLICY, powerdown_timeout=30.0))
        assert scope.cancelled_caught
    else:
        policy = attrs.evolve(POLICY, powerdown_timeout=1.0, stages=("powerdown",))
        with pytest.raises(qmpshutdown.ShutdownFailed) as failed:
            await stop(guest.qmp_path, policy)
        assert failed.value.result.presses >= 1
    assert guest.alive()
    # The guest reboots (through its agent): with reboot=reset back, QEMU resets it and runs on.
    client = await qmp_connect(guest.qmp_path)
    try:
        listener = EventListener(("RESET", "SHUTDOWN"))
        with client.listen(listener):
            assert guest.agent_path is not None
            agent = await RawAgent.connect(guest.agent_path)
            try:
                await agent.send_no_reply("guest-shutdown", mode="reboot")
            finally:
                await agent.close()
            event = await asyncio.wait_for(listener.get(), REACTION_TIMEOUT)
        assert (event["event"], event["data"]) == (
            "RESET",
            {"guest": True, "reason": "guest-reset"},
        )
        await guest.wait_for_serial("QMPSHUTDOWN-GUEST-REBOOTING", REACTION_TIMEOUT)
        await anyio.sleep(0.5)
        assert guest.alive()
        assert (await client.execute("query-status"))["status"] == "running"
        with contextlib.suppress(Exception):  # QEMU may close the socket before it answers
            await asyncio.wait_for(client.execute("quit"), 5)
    finally:
        await qmp_disconnect(client)
    assert await guest.wait_exit(10) == 0
