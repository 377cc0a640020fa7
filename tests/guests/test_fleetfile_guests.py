"""The command line's fleet file on real guests (parsing: tests/test_fleetfile.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import anyio
import pytest
from test_fleetfile import write

from qmpshutdown import Stage
from support.records import as_pressed_record


@pytest.mark.asyncio
async def test_a_fleet_file_stops_its_groups_in_order(guests, tmp_path):
    web, db = await guests.boot_many("ignores", "cooperative")
    path = write(tmp_path, {"vms": [
        {"target": str(db.qmp_path), "name": "db", "group": 1},
        {"target": str(web.qmp_path), "name": "web", "pid": web.pid,
         "policy": {"powerdown_timeout": 2, "stages": ["powerdown", "quit"]}},
    ]})  # fmt: skip
    argv = [sys.executable, "-m", "qmpshutdown", "--json", "--deadline", "30", "--fleet", path]
    with anyio.fail_after(45):
        proc = await anyio.run_process(argv, check=False, stdin=subprocess.DEVNULL)
    err = proc.stderr.decode()
    assert proc.returncode == 1, err  # web needed force: the worst wins
    records = [as_pressed_record(json.loads(line)) for line in proc.stdout.decode().splitlines()]
    assert [(r["target"], r["stage"]) for r in records] == [
        ("db", Stage.POWERDOWN.value), ("web", Stage.QUIT.value),
    ]  # fmt: skip
    db_press = next(e["timestamp"] for e in records[0]["events"] if e["event"] == "POWERDOWN")
    web_off = next(e["timestamp"] for e in records[1]["events"] if e["event"] == "SHUTDOWN")
    assert db_press > web_off  # group 1 after group 0, on QEMU's own clock
    assert await web.wait_exit(5) == 0 and await db.wait_exit(5) == 0
