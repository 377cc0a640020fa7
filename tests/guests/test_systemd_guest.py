"""The systemd test guest (Debian 12: systemd, logind, dbus, udev, qemu-ga) on real QEMU.

One boot per scenario (``GuestFactory.boot_systemd``; fixtures/qemu-images/README.md):
each checks that the scenario does what the tests of "the guest's own words" rely on,
with QMP and the agent driven directly (never the library's ladder).
"""

from __future__ import annotations

import asyncio

import pytest

from support.guests import (
    SYSTEMD_STOP_INHIBITOR,
    Guest,
    RawAgent,
    guest_exec,
    qmp_connect,
    qmp_disconnect,
)

pytestmark = [pytest.mark.asyncio, pytest.mark.qemu, pytest.mark.timeout(480)]

LOGIN1 = ("org.freedesktop.login1", "/org/freedesktop/login1", "org.freedesktop.login1.Manager")
#: A powered-off systemd guest under TCG on a loaded machine: stop jobs, unmounts, sync.
POWEROFF_TIMEOUT = 120.0
#: How long a guest that refuses a press is watched to stay up.
REFUSED_WATCH = 10.0


async def press(guest: Guest) -> None:
    assert guest.qmp_path is not None
    qmp = await qmp_connect(guest.qmp_path)
    try:
        await qmp.execute("system_powerdown")
    finally:
        await qmp_disconnect(qmp)


async def agent(guest: Guest) -> RawAgent:
    assert guest.agent_path is not None
    return await RawAgent.connect(guest.agent_path, timeout=30)


async def still_running_after(guest: Guest, seconds: float) -> bool:
    await asyncio.sleep(seconds)
    return guest.alive()


async def test_cooperative_powers_off_on_a_press(systemd_guests):
    guest = await systemd_guests.boot_systemd("cooperative")
    assert "QMPSHUTDOWN-GUEST-AGENT-READY port=/dev/vport" in guest.serial_text()
    ga = await agent(guest)
    try:
        osinfo = await ga.execute("guest-get-osinfo")
        assert (osinfo["id"], osinfo["version-id"]) == ("debian", "12")
        key = await guest_exec(ga, ["/usr/bin/busctl", "--json=short", "get-property", *LOGIN1,
                                    "HandlePowerKey"])  # fmt: skip
        assert (key.exitcode, key.stdout.strip()) == (0, '{"type":"s","data":"poweroff"}')
    finally:
        await ga.close()
    await press(guest)
    assert await guest.wait_exit(POWEROFF_TIMEOUT) == 0
    assert "reboot: Power down" in guest.serial_text()


async def test_inhibitor_refuses_the_press_until_it_is_stopped(systemd_guests):
    guest = await systemd_guests.boot_systemd("inhibitor")
    ga = await agent(guest)
    try:
        listed = await guest_exec(ga, ["/usr/bin/busctl", "--json=short", "call", *LOGIN1,
                                       "ListInhibitors"])  # fmt: skip
        assert listed.exitcode == 0
        assert '"shutdown:handle-power-key","nightly-backup","writing the archive","block"' in (
            listed.stdout
        )
        await press(guest)
        assert await still_running_after(guest, REFUSED_WATCH), guest.describe()
        stopped = await guest_exec(ga, SYSTEMD_STOP_INHIBITOR)
        assert stopped.exitcode == 0, stopped
    finally:
        await ga.close()
    await press(guest)  # a refused press is dropped: it takes a new one
    assert await guest.wait_exit(POWEROFF_TIMEOUT) == 0


async def test_power_key_ignored_by_logind(systemd_guests):
    guest = await systemd_guests.boot_systemd("power-key-ignored")
    ga = await agent(guest)
    try:
        key = await guest_exec(ga, ["/usr/bin/busctl", "--json=short", "get-property", *LOGIN1,
                                    "HandlePowerKey"])  # fmt: skip
        assert key.stdout.strip() == '{"type":"s","data":"ignore"}'
        conf = await guest_exec(ga, ["/usr/bin/systemd-analyze", "cat-config",
                                     "systemd/logind.conf"])  # fmt: skip
        assert "# /run/systemd/logind.conf.d/50-qsd-scenario.conf" in conf.stdout
        assert "HandlePowerKey=ignore" in conf.stdout
    finally:
        await ga.close()
    await press(guest)
    assert await still_running_after(guest, REFUSED_WATCH), guest.describe()


async def test_stop_job_keeps_the_agent_answering_while_shutting_down(systemd_guests):
    guest = await systemd_guests.boot_systemd("stop-job")
    await press(guest)
    await guest.wait_for_serial("QMPSHUTDOWN-GUEST-STOP-JOB-STOPPING seconds=600", 120)
    ga = await agent(guest)
    try:
        jobs = await guest_exec(ga, ["/usr/bin/systemctl", "list-jobs", "--no-legend",
                                     "--no-pager"])  # fmt: skip
    finally:
        await ga.close()
    lines = {line.split()[1]: line.split()[2:] for line in jobs.stdout.splitlines()}
    assert lines["qsd-stop-job.service"] == ["stop", "running"]
    assert lines["poweroff.target"] == ["start", "waiting"]
    assert guest.alive()


async def test_exec_blocked_agent_says_guest_exec_is_disabled(systemd_guests):
    guest = await systemd_guests.boot_systemd("exec-blocked")
    ga = await agent(guest)
    try:
        info = await ga.execute("guest-info")
        enabled = {command["name"]: command["enabled"] for command in info["supported_commands"]}
        assert (enabled["guest-exec"], enabled["guest-exec-status"]) == (False, False)
        assert enabled["guest-shutdown"] is True
        reply = await ga.call("guest-exec", path="/bin/true")
    finally:
        await ga.close()
    assert "disabled" in reply["error"]["desc"], reply


async def test_reboots_on_a_press(systemd_guests):
    # -no-reboot: the guest's reboot ends QEMU (SHUTDOWN guest-reset) instead of a new boot.
    guest = await systemd_guests.boot_systemd("reboots", extra_args=["-no-reboot"])
    await press(guest)
    assert await guest.wait_exit(POWEROFF_TIMEOUT) == 0
    assert "reboot: Restarting system" in guest.serial_text()
