"""launch()'s evidence: a screenshot and the console's last lines when the teardown forces."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

import qmpshutdown
from qmpshutdown import Stage
from support.guests import READY_PREFIX, guest_argv
from support.policies import FAULTS, PRESSED

POLICY = FAULTS


def without_serial(argv: list[str]) -> list[str]:
    index = argv.index("-serial")
    return argv[:index] + argv[index + 2 :]


async def wait_for(path: Path, text: str, limit: float = 60.0) -> None:
    with anyio.fail_after(limit):
        while text not in (path.read_text(errors="replace") if path.exists() else ""):
            await anyio.sleep(0.05)


@pytest.mark.asyncio
@pytest.mark.qemu
async def test_a_forced_teardown_keeps_the_console_tail_and_the_screenshot(guests, tmp_path):
    workdir = tmp_path / "guest"
    workdir.mkdir()
    evidence = tmp_path / "evidence"
    evidence.mkdir()
    argv = without_serial(guest_argv("ignores", workdir=workdir, qmp=False, display=True))
    vm = qmpshutdown.launch(argv, POLICY, "ignoring", evidence_dir=evidence, console_log=True)
    with anyio.fail_after(POLICY.bound + 90):
        async with vm:
            assert vm.console_log is not None and vm.console_log.name == "console.log"
            assert vm.console_log.parent != workdir  # in launch()'s private dir
            await wait_for(vm.console_log, f"{READY_PREFIX} mode=ignores")
    result = vm.result
    assert result is not None and (result.stage, result.graceful) == (Stage.QUIT, False)
    assert result.console_tail is not None and 0 < len(result.console_tail) <= 50
    assert any(line.startswith(f"{READY_PREFIX} mode=ignores") for line in result.console_tail)
    assert result.screenshot is not None and Path(result.screenshot).parent == evidence
    assert Path(result.screenshot).stat().st_size > 0  # not removed with the private dir
    assert vm.console_log is not None and not vm.console_log.exists()  # removed with the dir


@pytest.mark.asyncio
@pytest.mark.qemu
async def test_a_graceful_teardown_keeps_no_tail(guests, tmp_path):
    argv = guest_argv("cooperative", workdir=tmp_path, qmp=False)  # its own -serial file:
    vm = qmpshutdown.launch(argv, PRESSED, "cooperative", console_log=True)
    with anyio.fail_after(PRESSED.bound + 90):
        async with vm:
            assert vm.console_log == tmp_path / "serial.log"
            await wait_for(vm.console_log, f"{READY_PREFIX} mode=cooperative")
    assert vm.result is not None and vm.result.graceful
    assert vm.result.console_tail is None and vm.result.screenshot is None
