"""The ladder's schedule on a clock the test controls (looptime's virtual loop time).

Presses and timeouts are counted in the event loop's time; here that time is
virtual — it jumps to the next timer whenever the loop is idle — so the
schedule is exact whatever the machine is doing, and the test takes no real
time for its waits.
"""

from __future__ import annotations

import time

import anyio
import looptime
import pytest

from qmpshutdown import Cause, ShutdownPolicy, Stage, climb
from support.fakes import FakeQemu
from support.policies import FAKE


def run_on_virtual_time(qemu: FakeQemu, policy: ShutdownPolicy = FAKE):
    async def stop():
        return await climb(
            qemu.monitor, qemu.process, policy, started=anyio.current_time(), name="fake"
        )

    loop = looptime.new_event_loop()
    try:
        return loop.run_until_complete(stop())
    finally:
        loop.close()


def outcomes(result):
    return [(step.stage.value, step.outcome.value) for step in result.steps]


def test_ignored_button_escalates_to_quit_after_the_powerdown_timeout():
    result = run_on_virtual_time(FakeQemu(guest="ignores"))
    assert result.stage is Stage.QUIT
    assert result.graceful is False
    assert result.reason == "host-qmp-quit"
    assert result.presses == 3  # at 0, 0.1 and 0.2 s of a 0.25 s wait
    assert result.cause is Cause.IGNORED_POWER_BUTTON
    assert outcomes(result) == [("powerdown", "timeout"), ("quit", "done")]
    powerdown = result.step("powerdown")
    assert powerdown is not None and powerdown.ended == pytest.approx(0.25, abs=0.01)


@pytest.mark.parametrize(
    ("timeout", "interval", "presses"), [(60, 10, 6), (60, 7, 9), (5, None, 1)]
)
def test_presses_follow_the_repress_schedule(timeout, interval, presses):
    policy = ShutdownPolicy(powerdown_timeout=timeout, repress_interval=interval)
    wall = time.monotonic()
    result = run_on_virtual_time(FakeQemu(guest="ignores"), policy)
    assert result.presses == presses
    assert result.step("powerdown").ended == pytest.approx(timeout, abs=0.01)
    assert time.monotonic() - wall < 10  # a minute of the ladder's time, in virtual time
