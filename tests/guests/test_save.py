"""The save rung and ``launch(restore=...)`` against real guests (issue 16)."""

from __future__ import annotations

import json
import os
import re
import stat
import sys
from pathlib import Path

import anyio
import attrs
import pytest

import qmpshutdown
from qmpshutdown import Cause, Outcome, Stage
from support.guests import Guest, GuestFactory, guest_argv
from support.policies import GUEST
from support.records import as_pressed

pytestmark = [pytest.mark.asyncio, pytest.mark.qemu]

#: Ask for the save rung; a short press (the guests here ignore it).
POLICY = attrs.evolve(
    GUEST, powerdown_timeout=1.0, stages=("powerdown", "save", "quit", "terminate", "kill")
)
#: Ticks are a second apart; TCG on two busy cores may be slower.
TICK_TIMEOUT = 20.0
_TICK = re.compile(r"QMPSHUTDOWN-GUEST-TICK n=(\d+)")


def ticks(text: str) -> list[int]:
    return [int(n) for n in _TICK.findall(text)]


def outcomes(result: qmpshutdown.ShutdownResult) -> list[tuple[str, str]]:
    return [(step.stage.value, step.outcome.value) for step in result.steps]


async def stop(guest: Guest, policy: qmpshutdown.ShutdownPolicy = POLICY, **kwargs: object):
    with anyio.fail_after(policy.bound + 10):
        return as_pressed(await qmpshutdown.shutdown(guest.qmp_path, policy, **kwargs))  # type: ignore[arg-type]


async def wait_for_file_text(path: Path, pattern: re.Pattern[str], timeout: float) -> str:
    with anyio.fail_after(timeout):
        while True:
            text = path.read_text(errors="replace") if path.exists() else ""
            if pattern.search(text):
                return text
            await anyio.sleep(0.1)


async def test_ignoring_guest_is_saved_then_restored_and_counts_on(
    guests: GuestFactory, tmp_path: Path
) -> None:
    guest = await guests.boot("counts")
    await guest.wait_for_serial("QMPSHUTDOWN-GUEST-TICK n=3\n", TICK_TIMEOUT)
    states = tmp_path / "states"
    states.mkdir()
    result = await stop(guest, save_dir=states)
    assert (result.stage, result.graceful, result.reason) == (Stage.SAVE, False, "host-qmp-quit")
    assert result.cause is Cause.IGNORED_POWER_BUTTON
    assert outcomes(result) == [("powerdown", "timeout"), ("save", "done")]
    assert await guest.wait_exit(5.0) == 0
    saved = result.saved_state
    assert saved is not None and Path(saved).parent == states
    assert os.listdir(states) == [Path(saved).name]
    assert stat.S_IMODE(os.stat(saved).st_mode) == 0o600
    size = os.stat(saved).st_size
    assert size > 1 << 20
    assert f"saved {size / 2**20:.1f} MiB ({size} bytes) to {saved}" in result.step("save").detail
    assert result.to_dict()["saved_state"] == saved
    last = ticks(guest.serial_text())[-1]
    assert last >= 3

    again = tmp_path / "again"
    again.mkdir()
    argv = guest_argv("counts", workdir=again, qmp=False)
    stop_policy = attrs.evolve(POLICY, stages=("powerdown", "quit"))
    async with qmpshutdown.launch(argv, stop_policy, restore=saved) as vm:
        reply = await vm.monitor.execute("query-status")
        assert reply["status"] == "running"
        serial = again / "serial.log"
        text = await wait_for_file_text(serial, re.compile(rf"TICK n={last + 2}\b"), TICK_TIMEOUT)
    # It went on counting where it was: no new boot, no count from 1.
    assert "QMPSHUTDOWN-GUEST-READY" not in text
    restored = ticks(text)
    assert restored[0] in (last + 1, last + 2), (last, restored)
    assert restored == list(range(restored[0], restored[0] + len(restored)))
    # The counts guest ignores the button (like ignores): the teardown's quit ends it.
    assert vm.result is not None
    assert (vm.result.stage, vm.result.cause) == (Stage.QUIT, Cause.IGNORED_POWER_BUTTON)
    assert vm.result.presses >= 1


async def test_without_save_dir_the_save_is_skipped_and_quit_ends_it(
    guests: GuestFactory,
) -> None:
    guest = await guests.boot("ignores")
    result = await stop(guest)
    assert outcomes(result) == [("powerdown", "timeout"), ("save", "skipped"), ("quit", "done")]
    assert result.step("save").detail == "no save_dir given: nowhere to keep the state"
    assert (result.stage, result.saved_state) == (Stage.QUIT, None)
    assert await guest.wait_exit(5.0) == 0


async def test_too_little_space_skips_the_save_with_the_figures(
    guests: GuestFactory, tmp_path: Path
) -> None:
    small = tmp_path / "small"
    small.mkdir()
    mounted = await anyio.run_process(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(small)], check=False
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.decode().strip()}")
    try:
        guest = await guests.boot("ignores")
        result = await stop(guest, save_dir=small)
        assert outcomes(result) == [
            ("powerdown", "timeout"), ("save", "skipped"), ("quit", "done")
        ]  # fmt: skip
        detail = result.step("save").detail
        assert detail.startswith(f"too little space in {small}: 8.0 MiB free (8388608 bytes)")
        assert "needs 320.0 MiB (335544320 bytes: RAM 256.0 MiB + margin 64.0 MiB)" in detail
        assert os.listdir(small) == []
        assert (result.stage, result.saved_state) == (Stage.QUIT, None)
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.run_process(["umount", str(small)])


async def test_a_save_out_of_time_is_cancelled_its_file_removed_then_quit(
    guests: GuestFactory, tmp_path: Path
) -> None:
    states = tmp_path / "states"
    states.mkdir()
    guest = await guests.boot("ignores")
    result = await stop(guest, attrs.evolve(POLICY, save_timeout=0.001), save_dir=states)
    assert outcomes(result) == [("powerdown", "timeout"), ("save", "timeout"), ("quit", "done")]
    detail = result.step("save").detail
    assert detail.endswith(
        "save timed out after 0.001 s; cancelled, partial file removed; guest left running"
    ), detail
    assert os.listdir(states) == []
    assert (result.stage, result.saved_state) == (Stage.QUIT, None)
    assert result.step("quit").outcome is Outcome.DONE


async def test_a_save_dir_with_quotes_spaces_and_semicolons_is_only_a_name(
    guests: GuestFactory, tmp_path: Path
) -> None:
    parent = tmp_path / "states"
    parent.mkdir()
    weird = parent / 'it\'s "a" dir; touch PWNED; $(touch PWNED2) `touch PWNED3`'
    weird.mkdir()
    guest = await guests.boot("ignores")
    result = await stop(guest, save_dir=weird)
    assert (result.stage, outcomes(result)[-1]) == (Stage.SAVE, ("save", "done"))
    assert result.saved_state is not None
    assert os.listdir(weird) == [Path(result.saved_state).name]
    assert os.stat(result.saved_state).st_size > 1 << 20
    # Nothing ran: no file made anywhere a shell would have made it.
    assert os.listdir(parent) == [weird.name]
    for where in (Path.cwd(), guest.workdir):
        assert not any(name.startswith("PWNED") for name in os.listdir(where))


async def test_cli_save_dir_prints_the_state_file_and_its_size(
    guests: GuestFactory, tmp_path: Path
) -> None:
    states = tmp_path / "states"
    states.mkdir()
    guest = await guests.boot("ignores")
    argv = [
        sys.executable, "-m", "qmpshutdown", "--json", "--timeout", "1", "--save-dir",
        str(states), str(guest.qmp_path),
    ]  # fmt: skip
    with anyio.fail_after(60):
        done = await anyio.run_process(argv, check=False)
    assert done.returncode == 1, done.stderr  # forced
    record = json.loads(done.stdout)
    assert record["stage"] == "save"
    assert os.listdir(states) == [Path(record["saved_state"]).name]
    assert record["saved_state_bytes"] == os.stat(record["saved_state"]).st_size > 1 << 20
    assert [s["stage"] for s in record["steps"]] == ["powerdown", "agent", "save"]
    assert record["steps"][1]["outcome"] == "skipped"  # no agent socket given
