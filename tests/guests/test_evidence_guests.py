"""Evidence when a guest will not stop: the screenshot step on real guests.

The plain logic (names and files) is in tests/test_evidence.py.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import anyio
import attrs
import pytest

import qmpshutdown
from qmpshutdown import Outcome, ShutdownFailed, Stage
from support.guests import decode_png
from support.policies import FAULTS, PRESSED
from support.records import as_pressed

POLICY = FAULTS


def outcomes(result):
    return [(step.stage.value, step.outcome.value) for step in result.steps]


async def stop(target, policy=POLICY, **kwargs):
    with anyio.fail_after(policy.bound + 10):
        return as_pressed(await qmpshutdown.shutdown(target, policy, **kwargs))


def read_png(path: str | Path) -> tuple[int, int, set[bytes]]:
    """Width, height and the set of colours of an 8-bit RGB PNG (decoded with zlib)."""
    width, height, rows = decode_png(Path(path).read_bytes())
    assert all(len(row) == width * 3 for row in rows), "8-bit RGB"
    return width, height, {row[i : i + 3] for row in rows for i in range(0, len(row), 3)}


def pngs(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.png"))


@pytest.mark.asyncio
@pytest.mark.qemu
async def test_a_forced_guest_leaves_a_screenshot_before_the_first_forced_rung(guests, tmp_path):
    evidence = tmp_path / "evidence"
    evidence.mkdir()
    guest = await guests.boot("ignores", display=True)
    result = await stop(guest.qmp_path, evidence_dir=evidence)
    assert outcomes(result) == [
        ("powerdown", "timeout"),
        ("screenshot", "done"),
        ("quit", "done"),
    ]
    assert (result.stage, result.graceful) == (Stage.QUIT, False)
    assert result.screenshot is not None and Path(result.screenshot).parent == evidence
    assert pngs(evidence) == [Path(result.screenshot)]
    shot = result.step("screenshot")
    assert shot.path == result.screenshot and shot.detail == f"saved {result.screenshot}"
    width, height, pixels = read_png(result.screenshot)
    assert (width, height) == (720, 400)
    assert len(pixels) > 1, "not a blank screen"
    assert result.to_dict()["screenshot"] == result.screenshot
    assert result.to_dict()["steps"][1]["path"] == result.screenshot


@pytest.mark.asyncio
@pytest.mark.qemu
async def test_a_graceful_stop_captures_nothing(guests, tmp_path):
    guest = await guests.boot("cooperative", display=True)
    result = await stop(guest.qmp_path, PRESSED, evidence_dir=tmp_path)
    assert outcomes(result) == [("powerdown", "done")]
    assert result.screenshot is None and pngs(tmp_path) == []


@pytest.mark.asyncio
@pytest.mark.qemu
async def test_no_display_device_skips_the_screenshot(guests, tmp_path):
    guest = await guests.boot("ignores")  # -nodefaults, no VGA: no console to dump
    result = await stop(guest.qmp_path, evidence_dir=tmp_path)
    assert outcomes(result) == [
        ("powerdown", "timeout"),
        ("screenshot", "skipped"),
        ("quit", "done"),
    ]
    assert result.step("screenshot").detail.startswith("no display device")
    assert result.screenshot is None and pngs(tmp_path) == []
    assert result.cause is qmpshutdown.Cause.IGNORED_POWER_BUTTON


@pytest.mark.asyncio
@pytest.mark.qemu
async def test_a_hung_qemu_gets_no_screenshot(guests, tmp_path):
    guest = await guests.boot("ignores", display=True)
    os.kill(guest.pid, signal.SIGSTOP)
    result = await stop(guest.qmp_path, evidence_dir=tmp_path)
    assert outcomes(result) == [
        ("powerdown", "skipped"),
        ("quit", "skipped"),
        ("terminate", "done"),
    ]
    assert result.elapsed <= POLICY.bound
    assert result.screenshot is None and pngs(tmp_path) == []


def _read_only(directory: Path) -> bool:
    """Make *directory* unwritable even for root (chmod, else the immutable flag)."""
    directory.chmod(0o555)
    if not os.access(directory, os.W_OK):
        return True
    chattr = shutil.which("chattr")
    return chattr is not None and subprocess.run([chattr, "+i", str(directory)]).returncode == 0


def _writable_again(directory: Path) -> None:
    if not directory.exists():
        return
    if shutil.which("chattr"):
        subprocess.run(["chattr", "-i", str(directory)], check=False, capture_output=True)
    directory.chmod(0o755)


@pytest.mark.asyncio
@pytest.mark.qemu
@pytest.mark.parametrize("kind", ["missing", "read-only"])
async def test_an_unwritable_evidence_dir_fails_the_step_not_the_ladder(guests, tmp_path, kind):
    directory = tmp_path / "evidence"
    if kind == "read-only":
        directory.mkdir()
        if not _read_only(directory):
            pytest.skip("cannot make a directory read-only here")
    guest = await guests.boot("ignores", display=True)
    try:
        result = await stop(guest.qmp_path, evidence_dir=directory)
    finally:
        _writable_again(directory)
    assert outcomes(result) == [
        ("powerdown", "timeout"),
        ("screenshot", "failed"),
        ("quit", "done"),
    ]
    detail = result.step("screenshot").detail
    assert detail.startswith(f"cannot create a file in {directory}: ")
    reason = "No such file or directory" if kind == "missing" else "ermi"  # denied / not permitted
    assert reason in detail
    assert result.screenshot is None


@pytest.mark.asyncio
@pytest.mark.qemu
async def test_a_ladder_that_ends_with_qemu_running_takes_one_more(guests, tmp_path):
    guest = await guests.boot("ignores", display=True)
    no_force = attrs.evolve(POLICY, stages=("powerdown",))
    with pytest.raises(ShutdownFailed) as caught:
        await stop(guest.qmp_path, no_force, evidence_dir=tmp_path)
    result = caught.value.result
    assert outcomes(result) == [("powerdown", "timeout"), ("screenshot", "done")]
    assert result.screenshot is not None
    assert re.fullmatch(r"qmp-[0-9a-f]{8}-end-\d{6}-\d+\.png", Path(result.screenshot).name)
    assert read_png(result.screenshot)[:2] == (720, 400)
    assert guest.alive()


@pytest.mark.asyncio
@pytest.mark.qemu
async def test_shutdown_many_writes_one_file_per_target(guests, tmp_path):
    evidence = tmp_path / "evidence"
    evidence.mkdir()
    ignoring = await guests.boot_many(
        {"mode": "ignores", "display": True}, {"mode": "ignores", "display": True}
    )
    with anyio.fail_after(POLICY.bound + 20):
        results = await qmpshutdown.shutdown_many(
            [g.qmp_path for g in ignoring], POLICY, evidence_dir=evidence
        )
    shots = [r.screenshot for r in results if isinstance(r, qmpshutdown.ShutdownResult)]
    assert len(shots) == 2 and len(set(shots)) == 2
    assert sorted(map(str, pngs(evidence))) == sorted(shots)
    for result, guest in zip(results, ignoring, strict=True):
        assert result.step("screenshot").outcome is Outcome.DONE
        # Named after its own target: the socket's name and a hash of its whole path.
        digest = hashlib.sha256(str(guest.qmp_path).encode()).hexdigest()[:8]
        assert Path(result.screenshot).name.startswith(f"qmp-{digest}-before-force-")
