"""The library's own connection sends the ladder's first commands with the capabilities.

Against stand-in QEMUs (tests/support/fakeqemu.py, real processes pinned like QEMU):
``query-status`` and the power button's ``set-action`` go out with
``qmp_capabilities`` (qmpshutdown/_greeting.py), each exactly once, and the
record reads as it did when they were sent one by one. Real guests:
tests/guests/test_reboot_guests.py (the action put back when no press came).
"""

from __future__ import annotations

import anyio
import attrs
import pytest

import qmpshutdown
from qmpshutdown import Stage
from support.policies import FAKE

pytestmark = pytest.mark.asyncio


async def stop_logged(fakes, tmp_path, monkeypatch, version: str = "7.2", policy=FAKE):
    log = tmp_path / "commands.log"
    monkeypatch.setenv("FAKEQEMU_LOG", str(log))
    (path,) = fakes(1, version=version)
    with anyio.fail_after(30):
        result = await qmpshutdown.shutdown(str(path), policy)
    return result, log.read_text().split()


async def test_query_status_and_set_action_go_with_the_capabilities_once_each(
    fakes, tmp_path, monkeypatch
) -> None:
    result, commands = await stop_logged(fakes, tmp_path, monkeypatch)
    assert commands == ["qmp_capabilities", "query-status", "set-action", "system_powerdown"]
    assert (result.stage, result.graceful, result.runstate) == (Stage.POWERDOWN, True, "running")
    assert result.steps[0].detail == "pressed once; guest powered off (SHUTDOWN guest-shutdown)"


async def test_a_qemu_older_than_6_0_refuses_it_and_the_step_says_so(
    fakes, tmp_path, monkeypatch
) -> None:
    result, commands = await stop_logged(fakes, tmp_path, monkeypatch, version="5.2")
    assert commands == ["qmp_capabilities", "query-status", "set-action", "system_powerdown"]
    assert result.steps[0].detail.startswith(
        "reboot action left as it is (QEMU older than 6.0: no set-action); pressed once"
    )


async def test_a_plan_without_the_power_button_sends_no_set_action(
    fakes, tmp_path, monkeypatch
) -> None:
    policy = attrs.evolve(FAKE, stages=("quit",))
    result, commands = await stop_logged(fakes, tmp_path, monkeypatch, policy=policy)
    assert commands == ["qmp_capabilities", "query-status", "quit"]
    assert result.stage is Stage.QUIT
