"""Record what the systemd guest really says, per scenario, into tests/data/systemd-guest/.

Boots each scenario of the systemd guest (fixtures/qemu-images/build_systemd.py), asks the
agent ``guest-get-osinfo`` and ``guest-info``, and runs through ``guest-exec`` (with
``capture-output``) the commands a diagnosis would run. In ``stop-job`` the commands run
again after a press, while the system is shutting down and the slow unit's stop job runs.

Files written, for a scenario S and a command W (see COMMANDS):

* ``S-W.txt``         the command's stdout, byte for byte;
* ``S-exec.json``     per command: argv, exitcode, stderr and the raw guest-exec-status reply
  (or the agent's error reply when guest-exec is refused);
* ``S-guest-info.json``, ``S-guest-get-osinfo.json``: the agent's ``return`` values.

``stop-job`` after the press: ``stop-job-pressed-W.txt`` and ``stop-job-pressed-exec.json``.

Run: ``PYTHONPATH=. .venv/bin/python tests/support/record_systemd_outputs.py [SCENARIO...]``
(two guests at a time; every QEMU it starts is killed at the end).
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from support.guests import (
    SYSTEMD_SCENARIOS,
    Guest,
    GuestFactory,
    RawAgent,
    guest_exec,
    qmp_connect,
    qmp_disconnect,
)

DATA = Path(__file__).resolve().parent.parent / "data" / "systemd-guest"
LOGIN1 = ("org.freedesktop.login1", "/org/freedesktop/login1", "org.freedesktop.login1.Manager")
SYSTEMD1 = ("org.freedesktop.systemd1", "/org/freedesktop/systemd1",
            "org.freedesktop.systemd1.Manager")  # fmt: skip
COMMANDS: dict[str, list[str]] = {
    "list-inhibitors": ["/usr/bin/busctl", "--json=short", "call", *LOGIN1, "ListInhibitors"],
    "handle-power-key": [
        "/usr/bin/busctl",
        "--json=short",
        "get-property",
        *LOGIN1,
        "HandlePowerKey",
    ],
    "logind-conf": ["/usr/bin/systemd-analyze", "cat-config", "systemd/logind.conf"],
    "list-jobs": ["/usr/bin/systemctl", "list-jobs", "--no-legend", "--no-pager"],
    "list-jobs-dbus": ["/usr/bin/busctl", "--json=short", "call", *SYSTEMD1, "ListJobs"],
}


async def record_commands(agent: RawAgent, prefix: str) -> None:
    report: dict[str, Any] = {}
    for what, argv in COMMANDS.items():
        try:
            result = await guest_exec(agent, argv)
        except RuntimeError as err:
            report[what] = {"argv": argv, "refused": str(err)}
            continue
        (DATA / f"{prefix}-{what}.txt").write_text(result.stdout)
        report[what] = {
            "argv": argv,
            "exitcode": result.exitcode,
            "stderr": result.stderr,
            "guest-exec-status": result.status,
        }
    (DATA / f"{prefix}-exec.json").write_text(json.dumps(report, indent=2) + "\n")


async def record(factory: GuestFactory, scenario: str) -> None:
    guest: Guest = await factory.boot_systemd(scenario)
    assert guest.agent_path is not None and guest.qmp_path is not None
    agent = await RawAgent.connect(guest.agent_path, timeout=30)
    try:
        for command in ("guest-info", "guest-get-osinfo"):
            value = await agent.execute(command)
            (DATA / f"{scenario}-{command}.json").write_text(json.dumps(value, indent=2) + "\n")
        await record_commands(agent, scenario)
        if scenario == "stop-job":
            qmp = await qmp_connect(guest.qmp_path)
            try:
                await qmp.execute("system_powerdown")
            finally:
                await qmp_disconnect(qmp)
            await guest.wait_for_serial("QMPSHUTDOWN-GUEST-STOP-JOB-STOPPING", 120)
            await asyncio.sleep(2)  # let the other stop jobs settle behind it
            await record_commands(agent, "stop-job-pressed")
    finally:
        await agent.close()
    print(f"{scenario}: recorded", flush=True)


async def main(scenarios: list[str]) -> int:
    DATA.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="qsd-record-") as scratch:
        factory = GuestFactory(Path(scratch))
        try:
            for start in range(0, len(scenarios), 2):
                pair = scenarios[start : start + 2]
                await asyncio.gather(*(record(factory, scenario) for scenario in pair))
        finally:
            factory.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:] or list(SYSTEMD_SCENARIOS))))
