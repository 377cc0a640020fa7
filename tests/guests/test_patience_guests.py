"""Patience that reads the guest, against real guests: busy, stalled, deaf, and the same beside a
CPU-burning guest on the same cores.

Guests run in parallel within each test to keep the wall time small; the
bounds asserted are the ones the library promises (idle cutoff, re-press
interval, the cap), not speed.
"""

from __future__ import annotations

import asyncio

import anyio
import attrs
import pytest

import qmpshutdown
from qmpshutdown import Cause, Stage
from support.guests import qmp_connect, qmp_disconnect
from support.policies import GUEST
from support.records import as_pressed

pytestmark = [pytest.mark.asyncio, pytest.mark.qemu, pytest.mark.timeout(240)]

#: Adaptive, as the issue states the cases: a long timeout the idle cutoff must beat.
ADAPTIVE = attrs.evolve(
    GUEST, patience="adaptive", powerdown_timeout=60.0, max_powerdown_timeout=60.0,
    idle_cutoff=5.0, repress_interval=10.0,
)  # fmt: skip
#: An update of 14 s against a 6 s timeout: adaptive (cap 60) and fixed. (Each second of
#: update burns a CPU of the 2 the CI machine has: the figures are as small as keeps the
#: update well past the timeout and several readings busy.)
UPDATING_ADAPTIVE = attrs.evolve(ADAPTIVE, powerdown_timeout=6.0)
UPDATING_FIXED = attrs.evolve(GUEST, powerdown_timeout=6.0)
UPDATE_SECONDS = 14


def outcomes(result):
    return [(step.stage.value, step.outcome.value) for step in result.steps]


async def stop(guest, policy):
    """Stop with the pid given (sampling needs it).

    Known issue outside patience: with several guests connecting at once on a loaded
    host, the holder check can run before QEMU accept()ed the connection and says the
    pid does not hold it (PidMismatchError, raised before anything is sent; without
    pid= the pid is silently dropped). Retry that once, after a moment.
    """
    for attempt in (1, 2):
        try:
            with anyio.fail_after(policy.bound + 10):
                return as_pressed(
                    await qmpshutdown.shutdown(guest.qmp_path, policy, pid=guest.pid)
                )
        except qmpshutdown.PidMismatchError:
            if attempt == 2:
                raise
            await anyio.sleep(0.5)


async def burner(guests):
    """A guest burning a CPU (an ``updating`` guest pressed once, for longer than any test)."""
    guest = await guests.boot("updating", arg=600)
    client = await qmp_connect(guest.qmp_path)
    try:
        await client.execute("system_powerdown")
    finally:
        await qmp_disconnect(client)
    await guest.wait_for_serial("UPDATING t=1", 30)
    return guest


def assert_updating_waited_for(result):
    assert (result.stage, result.graceful, result.cause) == (Stage.POWERDOWN, True, None)
    assert outcomes(result) == [("powerdown", "done")]
    assert result.elapsed >= UPDATE_SECONDS
    activity = result.activity
    assert activity is not None and activity.ended == "powered-off"
    assert activity.vcpu_seconds > UPDATE_SECONDS / 4  # it ran a CPU (shared: 4 guests, 2 cores)
    assert activity.bytes_written >= 2**20  # and wrote its update (with fsync)
    assert activity.busy_seconds >= UPDATE_SECONDS - 3


def record(result):
    """What a failing assert shows: the steps and what the sampler read."""
    activity = result.activity.to_dict() if result.activity else None
    return f"{outcomes(result)} {result.cause} activity={activity}"


def assert_deaf_escalated_early(result, policy=ADAPTIVE):
    assert (result.stage, result.graceful) == (Stage.QUIT, False), record(result)
    assert result.cause is Cause.IGNORED_POWER_BUTTON, record(result)
    assert outcomes(result) == [("powerdown", "timeout"), ("quit", "done")]
    powerdown = result.step("powerdown")
    assert powerdown.ended - powerdown.started <= policy.idle_cutoff + policy.repress_interval + 2
    assert "escalating early" in powerdown.detail
    assert result.activity.ended == "idle-cutoff"
    assert result.activity.busy_seconds == 0


def assert_stalled_escalated_early(result, policy=ADAPTIVE):
    assert (result.stage, result.graceful) == (Stage.QUIT, False), record(result)
    assert result.cause is Cause.STALLED, record(result)
    assert outcomes(result) == [("powerdown", "timeout"), ("quit", "done")]
    powerdown = result.step("powerdown")
    # about 1 s of work, then the idle cutoff (and one re-press to show no reaction)
    bound = 3 + policy.idle_cutoff + policy.repress_interval + 2
    assert powerdown.ended - powerdown.started <= bound
    activity = result.activity
    assert activity.ended == "idle-cutoff" and activity.reacted and not activity.busy_at_end


async def test_an_updating_guest_gets_its_time_under_adaptive_and_is_busy_under_fixed(guests):
    adaptive, fixed = await guests.boot_many(
        {"mode": "updating", "arg": UPDATE_SECONDS, "disk": True},
        {"mode": "updating", "arg": UPDATE_SECONDS, "disk": True},
    )
    waited, forced = await asyncio.gather(
        stop(adaptive, UPDATING_ADAPTIVE), stop(fixed, UPDATING_FIXED)
    )
    assert (waited.pid, forced.pid) == (adaptive.pid, fixed.pid), forced.steps
    assert_updating_waited_for(waited)
    assert f"UPDATING t={UPDATE_SECONDS}" in adaptive.serial_text()
    assert (forced.stage, forced.graceful, forced.cause) == (Stage.QUIT, False, Cause.BUSY)
    assert outcomes(forced) == [("powerdown", "timeout"), ("quit", "done")]
    powerdown = forced.step("powerdown")
    timeout = UPDATING_FIXED.powerdown_timeout
    assert timeout <= powerdown.ended - powerdown.started < timeout + 2 * GUEST.command_timeout
    assert "busy at the end" in powerdown.detail
    assert forced.activity.ended == "timeout" and forced.activity.busy_at_end


async def test_idle_guests_escalate_early_and_a_cooperative_one_is_as_quick(guests):
    deaf, stalled, cooperative = await guests.boot_many("ignores", "stalls", "cooperative")
    deaf_result, stalled_result, quick = await asyncio.gather(
        stop(deaf, ADAPTIVE), stop(stalled, ADAPTIVE), stop(cooperative, ADAPTIVE)
    )
    assert_deaf_escalated_early(deaf_result)
    assert_stalled_escalated_early(stalled_result)
    assert "STALLED" in stalled.serial_text()
    assert (quick.stage, quick.graceful, quick.presses) == (Stage.POWERDOWN, True, 1)
    # As quick: gone long before the idle ones were given up on (not a wall-time bound).
    assert quick.elapsed < deaf_result.step(Stage.POWERDOWN).ended


async def test_the_same_outcomes_beside_a_cpu_burning_guest(guests):
    await burner(guests)
    # The deaf guest is booted, not restored: a restored guest's first press runs on an
    # empty TCG cache and costs 4x the vCPU time (0.04-0.05 s against 0.01 s, idle host),
    # and here that time is the evidence of no reaction.
    updating, deaf, stalled = await guests.boot_many(
        {"mode": "updating", "arg": UPDATE_SECONDS, "disk": True},
        {"mode": "ignores", "restore": False},
        "stalls",
    )
    waited, deaf_result, stalled_result = await asyncio.gather(
        stop(updating, UPDATING_ADAPTIVE), stop(deaf, ADAPTIVE), stop(stalled, ADAPTIVE)
    )
    assert_updating_waited_for(waited)
    assert_deaf_escalated_early(deaf_result)
    assert_stalled_escalated_early(stalled_result)
