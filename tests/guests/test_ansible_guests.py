"""The collection ``qmpshutdown.qemu`` run by a real ``ansible-playbook`` against real guests.

``ansible-playbook -i localhost, -c local`` with this interpreter on the managed
host (tests/support/playbooks.py); each test runs one play of several tasks
(ansible-playbook takes seconds to start). ``all: true`` always comes with a
``match`` only the test's own guests fit (its tmp dir): other QEMUs of this
host are not ours to stop. Each guest is killed and reaped by its test.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from support import policies
from support.guests import REPO_ROOT
from support.playbooks import play, run_playbook
from support.records import as_pressed_record

pytestmark = [pytest.mark.qemu]

#: Short but safe on 2 TCG cores (as the command's real-guest tests use).
FAST = {"powerdown_timeout": 2, "repress_interval": 1, "quit_timeout": 5,
        "terminate_timeout": 5, "kill_timeout": 5, "connect_timeout": 3,
        "command_timeout": 3}  # fmt: skip
#: For a play that stops only cooperative guests (as support.policies.PRESSED): the press
#: step ends when the guest is off and the wait for QEMU's exit after it at the exit, so long
#: ones cost nothing; loaded hosts have taken over 2 s and some 19 s for them (CI).
PATIENT = {**FAST, "powerdown_timeout": 30, "quit_timeout": 30}
#: For a play that stops cooperative and ignoring guests (as support.policies.MIXED).
MIXED = {key: getattr(policies.MIXED, key) for key in FAST}


def shutdown(register: str, **options: object) -> dict[str, object]:
    """A task of the module ``qmpshutdown.qemu.shutdown`` (failures do not end the play)."""
    return {"qmpshutdown.qemu.shutdown": options, "register": register, "ignore_errors": True}


@contextlib.contextmanager
def human_monitor(path: Path) -> Iterator[Path]:
    """A unix socket that answers like QEMU's human monitor (HMP), not QMP."""
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen(4)
    server.settimeout(0.2)
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.sendall(b"QEMU 7.2.0 monitor - type 'help' for more information\r\n(qemu) ")
                conn.settimeout(2)
                with contextlib.suppress(OSError):
                    conn.recv(1024)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield path
    finally:
        done.set()
        thread.join(5)
        server.close()


def stages(record: dict[str, object]) -> list[tuple[object, object]]:
    return [(step["stage"], step["outcome"]) for step in record["steps"]]  # type: ignore[index,union-attr]


@pytest.mark.asyncio
async def test_stops_a_cooperative_and_an_ignoring_guest_and_the_same_play_again_changes_nothing(
    guests, tmp_path
):
    good, deaf = await guests.boot_many("cooperative", "ignores")
    targets = [str(good.qmp_path), str(deaf.qmp_path)]
    tasks = [
        {**shutdown("checked", targets=targets, policy=MIXED), "check_mode": True},
        shutdown("stopped", targets=targets, policy=MIXED),
    ]
    run = await anyio.to_thread.run_sync(lambda: play(tmp_path, tasks))
    assert run.status == 0, run.out + run.err
    # Check mode: both run, and nothing was pressed (the real run found them running,
    # its first press the first the guests saw).
    assert run["checked"]["changed"] is True
    assert run["checked"]["running"] == targets
    assert run["checked"]["results"] == []
    stopped = run["stopped"]
    assert stopped["changed"] is True and not stopped.get("failed")
    first, second = stopped["results"]
    first = as_pressed_record(first)
    assert (first["target"], first["error"]) == (targets[0], None)
    assert (first["stage"], first["graceful"], first["reason"]) == (
        "powerdown", True, "guest-shutdown",
    )
    assert first["presses"] >= 1  # a loaded host can keep it past repress_interval
    assert (first["runstate"], first["pid"]) == ("running", good.pid)
    assert (second["target"], second["stage"], second["graceful"]) == (targets[1], "quit", False)
    assert (second["reason"], second["cause"], second["runstate"]) == (
        "host-qmp-quit", "ignored-power-button", "running",
    )
    assert second["presses"] in (2, 3)  # at 0 and 3 s, and maybe as the 6 s run out
    assert stages(second)[0] == ("powerdown", "timeout")
    assert ("quit", "done") in stages(second)
    assert good.serial_lines("QMPSHUTDOWN-GUEST-PRESS") == ["QMPSHUTDOWN-GUEST-PRESS n=1"]
    assert await good.wait_exit(5) == 0
    await deaf.wait_exit(5)
    # The same play again: both are stopped already, nothing would change, nothing changes.
    again = await anyio.to_thread.run_sync(lambda: play(tmp_path, tasks))
    assert again.status == 0, again.out + again.err
    assert (again["checked"]["changed"], again["checked"]["running"]) == (False, [])
    unchanged = again["stopped"]
    assert unchanged["changed"] is False and not unchanged.get("failed")
    assert [r["stage"] for r in unchanged["results"]] == ["already-off", "already-off"]
    assert [r["presses"] for r in unchanged["results"]] == [0, 0]
    assert all(
        r["error"].startswith(f"{t}: ") for r, t in zip(unchanged["results"], targets, strict=True)
    )


@pytest.mark.asyncio
async def test_a_guest_that_will_not_stop_fails_the_task_with_its_record(guests, tmp_path):
    deaf = await guests.boot("ignores")
    target = str(deaf.qmp_path)
    no_force = {**FAST, "stages": ["powerdown"]}
    with human_monitor(tmp_path / "hmp.sock") as hmp:
        tasks = [
            shutdown("refused", targets=[target], policy=no_force),
            shutdown("bad_value", targets=[target], policy={"powerdown_timeout": -1}),
            shutdown("bad_field", targets=[target], policy={"powerdown_timeot": 5}),
            shutdown("not_qmp", targets=[str(hmp), str(tmp_path / "gone.sock")], policy=FAST),
            {**shutdown("not_qmp_checked", targets=[str(hmp)], policy=FAST), "check_mode": True},
            shutdown("both", targets=[target], all=True, match=[f"{tmp_path}/*"]),
        ]
        run = await anyio.to_thread.run_sync(lambda: play(tmp_path, tasks))
    assert run.status == 0, run.out + run.err
    refused = run["refused"]
    assert refused["failed"] is True and refused["changed"] is False
    assert refused["msg"].startswith(f"1 of 1 VMs not stopped: {target}: ")
    (record,) = refused["results"]
    assert (record["stage"], record["graceful"], record["cause"]) == (
        None, False, "ignored-power-button",
    )
    assert record["presses"] in (2, 3) and record["pid"] == deaf.pid
    assert stages(record) == [("powerdown", "timeout")]
    assert deaf.alive()
    # The policy is the library's to validate: its message.
    assert run["bad_value"]["failed"] is True
    assert run["bad_value"]["msg"] == (
        "policy: powerdown_timeout must be a finite number of seconds > 0, not -1"
    )
    assert run["bad_field"]["failed"] is True
    assert "unexpected keyword argument 'powerdown_timeot'" in run["bad_field"]["msg"]
    assert "the fields are powerdown_timeout, repress_interval," in run["bad_field"]["msg"]
    # A peer that is not QMP fails; a socket that is gone beside it is already stopped.
    not_qmp = run["not_qmp"]
    assert not_qmp["failed"] is True and not_qmp["changed"] is False
    hmp_record, gone = not_qmp["results"]
    assert "human monitor (HMP), not QMP" in hmp_record["error"]
    assert (hmp_record["stage"], gone["stage"]) == (None, "already-off")
    assert gone["error"] == f"{tmp_path / 'gone.sock'}: No such file or directory"
    assert not_qmp["msg"].startswith(f"1 of 2 VMs not stopped: {hmp}: ")
    assert run["not_qmp_checked"]["failed"] is True
    assert "human monitor (HMP), not QMP" in run["not_qmp_checked"]["msg"]
    assert run["both"]["msg"] == "targets and all: true are exclusive: all finds the VMs itself"
    assert deaf.alive()


@pytest.mark.asyncio
async def test_info_lists_the_guests_and_all_with_match_stops_only_the_matched_one(
    guests, tmp_path
):
    hmp_name = f"hmp-{tmp_path.name}"
    hmp_spec = {"mode": "cooperative", "qmp": False, "extra_args": [
        "-name", hmp_name, "-monitor", f"unix:{tmp_path / 'hmp.sock'},server=on,wait=off"]}
    mine, other, hmp = await guests.boot_many("cooperative", "cooperative", hmp_spec)
    everything = [f"{tmp_path}/*", hmp_name]
    match = [f"{mine.workdir}/*", hmp_name]  # and the guest with a human monitor only
    tasks = [
        {"qmpshutdown.qemu.info": {"match": everything}, "register": "before"},
        {**shutdown("checked", all=True, match=match, policy=PATIENT), "check_mode": True},
        shutdown("stopped", all=True, match=match, policy=PATIENT),
        {"qmpshutdown.qemu.info": {"match": everything}, "register": "after"},
    ]
    run = await anyio.to_thread.run_sync(lambda: play(tmp_path, tasks))
    assert run.status == 0, run.out + run.err
    before = run["before"]
    assert before["changed"] is False
    why = "only a human monitor (HMP) at hmp.sock: it needs a QMP monitor (-qmp)"
    rows = {guest.pid: {"pid": guest.pid, "name": str(guest.qmp_path),
                        "target": str(guest.qmp_path), "agent": None, "why": None,
                        "runstate": "running"} for guest in (mine, other)}  # fmt: skip
    rows[hmp.pid] = {"pid": hmp.pid, "name": hmp_name, "target": None, "agent": None,
                     "why": why.replace("hmp.sock", str(tmp_path / "hmp.sock")),
                     "runstate": None}  # fmt: skip
    assert before["vms"] == [rows[pid] for pid in sorted(rows)]
    left_alone = [{k: v for k, v in rows[hmp.pid].items() if k != "runstate"}]
    assert run["checked"]["running"] == [str(mine.qmp_path)]
    assert run["checked"]["left_alone"] == left_alone
    stopped = run["stopped"]
    assert stopped["changed"] is True and stopped["left_alone"] == left_alone
    warning = f"left alone: {hmp_name} (pid {hmp.pid}): {left_alone[0]['why']}"
    assert stopped["warnings"] == [warning]
    (record,) = stopped["results"]
    record = as_pressed_record(record)
    assert (record["target"], record["pid"], record["stage"], record["graceful"]) == (
        str(mine.qmp_path), mine.pid, "powerdown", True,
    ), record
    assert sorted(vm["pid"] for vm in run["after"]["vms"]) == sorted([other.pid, hmp.pid])
    assert await mine.wait_exit(5) == 0
    assert other.alive() and hmp.alive()


@pytest.mark.asyncio
async def test_the_documented_rolling_stop_keeps_the_records_and_fetches_the_evidence(
    guests, tmp_path
):
    """docs/examples/ansible/stop-vms.yml (docs/many-hosts.md), on this host's own guests."""
    good, deaf = await guests.boot_many("cooperative", {"mode": "ignores", "display": True})
    playbook = tmp_path / "stop-vms.yml"
    shutil.copy(REPO_ROOT / "docs" / "examples" / "ansible" / "stop-vms.yml", playbook)
    no_save = {**MIXED, "stages": ["powerdown", "quit", "terminate", "kill"]}
    extra = {
        "target_hosts": "localhost", "ansible_become": False, "vm_match": [f"{tmp_path}/*"],
        "vm_policy": no_save, "state_dir": str(tmp_path / "state"),
    }  # fmt: skip
    run = await anyio.to_thread.run_sync(lambda: run_playbook(tmp_path, playbook, extra))
    assert run.returncode == 0, run.stdout + run.stderr
    records = json.loads((tmp_path / "records" / "localhost.json").read_text())
    assert sorted(vm["pid"] for vm in records["before"]) == sorted([good.pid, deaf.pid])
    by_pid = {vm["pid"]: as_pressed_record(vm) for vm in records["stopped"]}
    assert (by_pid[good.pid]["stage"], by_pid[good.pid]["screenshot"]) == ("powerdown", None)
    forced = by_pid[deaf.pid]
    assert (forced["stage"], forced["cause"]) == ("quit", "ignored-power-button")
    assert forced["screenshot"].startswith(str(tmp_path / "state" / "evidence") + "/")
    fetched = tmp_path / "evidence" / "localhost" / Path(forced["screenshot"]).name
    assert fetched.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (tmp_path / "evidence" / "localhost").iterdir()) == [
        fetched.name
    ]
    assert await good.wait_exit(5) == 0
    await deaf.wait_exit(5)
