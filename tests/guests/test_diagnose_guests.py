"""The guest's own words, on the real systemd guest (fixtures/qemu-images/build_systemd.py).

Each scenario is a real Debian 12 guest (systemd 252, logind, qemu-ga) that will not
power off for its own reason; the library asks it why through its agent and names it.
The guests boot in about 40 s under TCG, so each test boots one and asserts all it can.
"""

from __future__ import annotations

import json

import anyio
import attrs
import pytest

import qmpshutdown
from qmpshutdown import Cause, Stage
from support.policies import GUEST
from support.records import as_pressed

pytestmark = [pytest.mark.asyncio, pytest.mark.qemu]

#: The button, then quit: the guest is asked why between them (and frozen before quit).
POLICY = attrs.evolve(GUEST, stages=("powerdown", "quit"), powerdown_timeout=4.0,
                      repress_interval=2.0, diagnose_timeout=40.0, command_timeout=10.0,
                      freeze_timeout=10.0)  # fmt: skip
#: Slack for a loaded 2-core machine on top of the bound the library promises.
MARGIN = 5.0


def outcomes(result):
    return [(step.stage.value, step.outcome.value) for step in result.steps]


def record(result):
    """The whole record, for a failing assert: each step's detail says what happened."""
    return json.dumps(result.to_dict(), indent=1, default=str)


async def stop(guest, policy=POLICY, **kwargs):
    with anyio.fail_after(policy.bound + MARGIN):
        try:
            return as_pressed(
                await qmpshutdown.shutdown(
                    guest.qmp_path, policy, agent=guest.agent_path, pid=guest.pid, **kwargs
                )
            )
        except qmpshutdown.ShutdownFailed as failed:
            return failed.result


async def test_a_held_inhibitor_is_named_by_the_guest(systemd_guests):
    guest = await systemd_guests.boot_systemd("inhibitor")
    result = await stop(guest)
    assert outcomes(result)[:3] == [
        ("powerdown", "timeout"), ("diagnose", "done"), ("freeze", "done"),
    ]  # fmt: skip
    kinds = [finding.kind for finding in result.diagnosis]
    assert kinds == ["inhibitor"], result.diagnosis
    (finding,) = result.diagnosis
    assert "nightly-backup" in finding.detail and "writing the archive" in finding.detail
    assert finding.source.startswith("busctl --json=short call org.freedesktop.login1")
    assert (result.stage, result.cause) == (Stage.QUIT, Cause.INHIBITED)
    # Every question was asked before the freeze and before force.
    diagnose, freeze = result.step("diagnose"), result.step("freeze")
    assert diagnose.ended <= freeze.started


async def test_a_power_key_set_to_ignore_is_named_with_its_file(systemd_guests):
    guest = await systemd_guests.boot_systemd("power-key-ignored")
    result = await stop(guest, attrs.evolve(POLICY, freeze_before_force=False))
    (finding,) = result.diagnosis
    assert finding.kind == "power-key"
    assert "HandlePowerKey=ignore" in finding.detail and "logind.conf.d" in finding.detail
    assert result.cause is Cause.IGNORED_POWER_BUTTON


async def test_a_unit_still_stopping_is_a_stop_job(systemd_guests):
    guest = await systemd_guests.boot_systemd("stop-job")
    result = await stop(guest, attrs.evolve(POLICY, freeze_before_force=False))
    kinds = [finding.kind for finding in result.diagnosis]
    assert "stop-job" in kinds, result.diagnosis
    stop_job = next(f for f in result.diagnosis if f.kind == "stop-job")
    assert "qsd-slow-stop" in stop_job.detail or ".service" in stop_job.detail
    assert result.cause is Cause.BUSY


async def test_guest_exec_blocked_skips_the_diagnosis_and_says_so(systemd_guests):
    # qemu-ga with guest-exec blocked (guest-info says so), and logind ignoring the key.
    guest = await systemd_guests.boot_systemd("exec-blocked")
    result = await stop(guest, attrs.evolve(POLICY, freeze_before_force=False))
    step = result.step("diagnose")
    assert step is not None and step.outcome.value == "skipped", outcomes(result)
    assert "guest-exec is disabled" in step.detail
    assert result.diagnosis is None
    assert step.ended - step.started < POLICY.command_timeout * 2 + MARGIN
    assert result.stage is Stage.QUIT


async def test_adaptive_patience_waits_for_the_inhibitor_and_presses_at_its_release(
    systemd_guests,
):
    # The backup lets go of its inhibitor 12 s after the first press logind refused (from
    # inside the guest: the ladder holds the agent's socket, which takes one client).
    guest = await systemd_guests.boot_systemd("inhibitor", kernel_args=["qsd.release_after=12"])
    policy = attrs.evolve(POLICY, stages=("powerdown", "quit"), patience="adaptive",
                          powerdown_timeout=4.0, idle_cutoff=4.0, max_powerdown_timeout=120.0,
                          repress_interval=None)  # fmt: skip
    said: list[str] = []
    result = await stop(guest, policy, on_progress=lambda p: said.append(p.message))
    assert (result.stage, result.graceful) == (Stage.POWERDOWN, True), record(result)
    assert result.presses == 2
    assert result.elapsed >= 12.0
    assert any(m.startswith("the guest asks for time: nightly-backup") for m in said), said
    assert "the guest let go of its inhibitor: pressing again at once" in said
    assert "QMPSHUTDOWN-GUEST-INHIBITOR-RELEASED" in guest.serial_text()
    assert result.diagnosis is None  # it went by itself: never diagnosed
