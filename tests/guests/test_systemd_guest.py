"""The systemd test guest (Debian 12: systemd, logind, dbus, udev, qemu-ga) on real QEMU.

The cooperative scenario (``GuestFactory.boot_systemd``; fixtures/qemu-images/README.md),
with QMP and the agent driven directly (never the library's ladder): the guest, its agent
and logind work. The other scenarios are each booted once, through the library, by
test_diagnose_guests.py (a boot is ~20 CPU-s under TCG: CI boots each scenario once per
QEMU version).
"""

from __future__ import annotations

import asyncio

import pytest

from support.guests import (
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
