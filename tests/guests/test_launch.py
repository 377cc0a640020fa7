"""launch(): boot for a harness, guaranteed teardown; and the qemu_launcher plugin."""

from __future__ import annotations

import os
import random
import signal
import sys
from pathlib import Path

import anyio
import attrs
import pytest

import qmpshutdown
from qmpshutdown import Cause, Stage
from support.guests import guest_argv
from support.policies import GUEST, PRESSED
from support.records import as_pressed

pytestmark = [pytest.mark.asyncio, pytest.mark.qemu]

POLICY = GUEST


@pytest.fixture
def argv(guests, tmp_path):
    """The QEMU command line of a fixture guest, without a QMP monitor."""

    def make(mode="cooperative", *extra, arg=None):
        workdir = tmp_path / f"{mode}-{len(list(tmp_path.iterdir()))}"
        workdir.mkdir()
        return guest_argv(mode, workdir=workdir, qmp=False, arg=arg, extra_args=extra)

    return make


async def wait_ready(argv: list[str], limit: float = 60.0) -> None:
    """Wait for the guest's READY line in the serial log its argv names."""
    serial = Path(argv[argv.index("-serial") + 1].removeprefix("file:"))
    with anyio.fail_after(limit):
        while "QMPSHUTDOWN-GUEST-READY" not in (serial.read_text() if serial.exists() else ""):
            await anyio.sleep(0.05)


def our_qemus(marker: str, *, zombies: bool = True) -> list[int]:
    """Pids of processes whose command line holds *marker*, and our unreaped QEMU children.

    A zombie has no command line left, so it is found by its parent (us).
    """
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        zombie_child = (
            zombies and fields[0] == "Z" and int(fields[1]) == os.getpid() and "qemu" in stat
        )
        if marker.encode() in cmdline or zombie_child:
            found.append(int(entry))
    return found


async def test_block_end_stops_the_guest_with_the_power_button(argv):
    command_line = argv()
    async with qmpshutdown.launch(command_line, PRESSED, name="coop") as vm:
        assert (await vm.monitor.execute("query-status"))["status"] == "running"
        pid, socket_dir = vm.pid, vm.qmp_socket.parent
        assert vm.qmp_socket.exists()
        await wait_ready(command_line)  # the guest booted and its button handler listens
    result = as_pressed(vm.result)
    assert (result.stage, result.graceful, result.reason) == (
        Stage.POWERDOWN,
        True,
        "guest-shutdown",
    )
    assert result.pid == pid
    assert not socket_dir.exists()  # temp files removed
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # gone and reaped


async def test_teardown_works_while_the_caller_holds_its_monitor_busy(argv):
    async with qmpshutdown.launch(argv("ignores"), POLICY) as vm:
        # the caller's client is mid-way through its own use of the monitor
        events = vm.monitor.events
        assert events.empty()
    assert vm.result.stage is Stage.QUIT
    # Pressed at once, perhaps while the guest still boots: the sampler may see it working.
    assert vm.result.cause in (Cause.IGNORED_POWER_BUTTON, Cause.BUSY)


async def test_exception_in_the_block_propagates_and_qemu_is_still_stopped(argv):
    marker = "qsd-launch-exception"
    with pytest.raises(LookupError, match="from the block"):
        async with qmpshutdown.launch([*argv(), "-name", marker], POLICY) as vm:
            raise LookupError("from the block")
    assert vm.result is not None and vm.result.stage is not None
    assert our_qemus(marker) == []


async def test_shutdown_inside_the_block_stops_it_early(argv):
    async with qmpshutdown.launch(argv("ignores"), POLICY) as vm:
        result = await vm.shutdown(attrs.evolve(POLICY, powerdown_timeout=1.0))
        assert result.stage is Stage.QUIT
        assert vm.result is result
    assert vm.result is result  # the teardown had nothing left to do


async def test_ladder_that_cannot_end_qemu_is_followed_by_sigkill(argv):
    no_force = attrs.evolve(POLICY, powerdown_timeout=1.0, stages=("powerdown",))
    async with qmpshutdown.launch(argv("ignores"), no_force) as vm:
        pid = vm.pid
    assert vm.result.stage is Stage.KILL
    assert [(s.stage.value, s.outcome.value) for s in vm.result.steps] == [
        ("powerdown", "timeout"),
        ("kill", "done"),
    ]
    assert "launch() teardown" in vm.result.steps[-1].detail
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


async def test_hung_qemu_is_taken_down_by_signals(argv):
    async with qmpshutdown.launch(argv(), POLICY) as vm:
        os.kill(vm.pid, signal.SIGSTOP)
    assert (vm.result.stage, vm.result.cause) == (Stage.TERMINATE, Cause.MONITOR_UNRESPONSIVE)


async def test_qemu_exiting_early_is_a_clear_launch_error(argv):
    with pytest.raises(qmpshutdown.LaunchError) as caught:
        async with qmpshutdown.launch([*argv(), "-no-such-option"], POLICY):
            pytest.fail("the block must not run")
    assert caught.value.returncode == 1
    assert "-no-such-option" in caught.value.stderr
    assert "exited during start-up with status 1" in str(caught.value)


async def test_a_binary_that_does_not_exist_is_a_launch_error():
    with pytest.raises(qmpshutdown.LaunchError, match="cannot start"):
        async with qmpshutdown.launch(["/nonexistent/qemu-system-x86_64"], POLICY):
            pass


async def test_cancellation_at_many_points_leaves_no_qemu(argv):
    # A fixed seed: the same 24 points every run, spread over start-up, the
    # block and the teardown (which is shielded and must finish regardless).
    points = sorted(random.Random(20261128).uniform(0.0, 1.6) for _ in range(24))
    policy = attrs.evolve(POLICY, powerdown_timeout=0.5, repress_interval=None)
    limiter = anyio.CapacityLimiter(4)
    survivors: list[str] = []

    async def one(index: int, at: float) -> None:
        marker = f"qsd-cancel-{index}"
        async with limiter:
            with anyio.move_on_after(at):
                async with qmpshutdown.launch([*argv(), "-name", marker], policy):
                    await anyio.sleep(0.6)
            # other VMs run alongside: their QEMUs may be exiting, so no zombie check here
            if left := our_qemus(marker, zombies=False):
                states = [Path(f"/proc/{pid}/stat").read_text()[:60] for pid in left]
                survivors.append(f"{marker} (cancelled at {at:.3f} s): {states}")

    async with anyio.create_task_group() as tg:
        for index, at in enumerate(points):
            tg.start_soon(one, index, at)
    assert survivors == []
    assert our_qemus("qsd-cancel-") == []


LAUNCHER = """
import sys, anyio, qmpshutdown
async def main():
    async with qmpshutdown.launch(sys.argv[1:]) as vm:
        print(vm.pid, flush=True)
        await anyio.sleep(60)
anyio.run(main, backend="asyncio")
"""


def dead(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")  # exited; whoever inherited it may not have reaped it yet


async def test_qemu_dies_with_the_process_that_launched_it(argv):
    marker = "qsd-pdeathsig"
    command = [sys.executable, "-c", LAUNCHER, *argv("ignores"), "-name", marker]
    launcher = await anyio.open_process(command)
    try:
        with anyio.fail_after(30):
            line = await launcher.stdout.receive()
        qemu_pid = int(line.split()[0])
        assert not dead(qemu_pid)
        launcher.kill()  # SIGKILL: no teardown runs; only the kernel's PR_SET_PDEATHSIG
        await launcher.wait()
        with anyio.fail_after(10):
            while not dead(qemu_pid):
                await anyio.sleep(0.05)
    finally:
        if launcher.returncode is None:
            launcher.kill()
            await launcher.wait()
        await launcher.aclose()
        for orphan in our_qemus(marker, zombies=False):  # only if the test failed
            os.kill(orphan, signal.SIGKILL)


async def test_a_program_that_never_greets_is_a_launch_error_and_is_reaped():
    # not QEMU at all: no monitor socket ever appears; the marker is in its argv
    marker = "qsd-never-greets"
    started = anyio.current_time()
    with pytest.raises(qmpshutdown.LaunchError, match="not ready in 1 s"):
        async with qmpshutdown.launch(
            [sys.executable, "-c", "import time; time.sleep(60)", marker],
            POLICY,
            startup_timeout=1.0,
        ):
            pytest.fail("the block must not run")
    assert anyio.current_time() - started < 1.0 + POLICY.terminate_timeout + 2.0
    assert our_qemus(marker, zombies=False) == []


async def test_launch_with_agent_gives_the_port_and_the_teardown_uses_it(guests, tmp_path):
    # The fixture's agent-mode argv, minus its own agent port: launch(agent=True) adds one.
    line = guest_argv("ignores", workdir=tmp_path, qmp=False, agent=True)
    port = ("id=qga", "virtio-serial", "virtserialport")
    drop = {i for i, arg in enumerate(line[:-1])
            if arg in ("-chardev", "-device") and any(p in line[i + 1] for p in port)}  # fmt: skip
    line = [arg for i, arg in enumerate(line) if i not in drop and i - 1 not in drop]
    assert not any("qga" in arg or "virtserial" in arg for arg in line)
    policy = attrs.evolve(POLICY, stages=("powerdown", "agent", "quit"), agent_timeout=20.0)
    async with qmpshutdown.launch(line, policy, agent=True) as vm:
        assert vm.agent_socket is not None and vm.agent_socket.name == "qga.sock"
        await wait_ready(line)
    assert vm.result is not None
    assert (vm.result.stage, vm.result.graceful) == (Stage.AGENT, True)
    assert [(s.stage.value, s.outcome.value) for s in vm.result.steps] == [
        ("powerdown", "timeout"), ("diagnose", "failed"), ("agent", "done"),
    ]  # fmt: skip  (the diagnosis: this busybox guest has no busctl to ask)


async def test_launch_without_agent_has_no_agent_socket(argv):
    async with qmpshutdown.launch(argv("cooperative"), POLICY) as vm:
        assert vm.agent_socket is None
