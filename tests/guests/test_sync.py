"""launch_sync(): the blocking VM handle, for harnesses that are not async."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import threading
import time
from pathlib import Path

import attrs
import pytest
from anyio.from_thread import start_blocking_portal
from qemu.qmp import ExecuteError
from test_launch import our_qemus

import qmpshutdown
from qmpshutdown import Cause, Stage
from support.guests import guest_argv
from support.policies import GUEST, PRESSED
from support.records import as_pressed

pytestmark = pytest.mark.qemu

POLICY = GUEST


@pytest.fixture
def argv(guests, tmp_path):
    """The QEMU command line of a fixture guest, without a QMP monitor."""

    def make(mode="cooperative", *extra):
        workdir = tmp_path / f"{mode}-{len(list(tmp_path.iterdir()))}"
        workdir.mkdir()
        return guest_argv(mode, workdir=workdir, qmp=False, extra_args=extra)

    return make


def wait_ready(argv: list[str], limit: float = 60.0) -> None:
    """Wait for the guest's READY line in the serial log its argv names."""
    serial = Path(argv[argv.index("-serial") + 1].removeprefix("file:"))
    deadline = time.monotonic() + limit
    while "QMPSHUTDOWN-GUEST-READY" not in (serial.read_text() if serial.exists() else ""):
        assert time.monotonic() < deadline, f"the guest was not ready in {limit} s"
        time.sleep(0.05)


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_block_end_stops_the_guest_with_the_power_button(argv):
    command_line = argv()
    with qmpshutdown.launch_sync(command_line, PRESSED, name="coop") as vm:
        assert vm.qmp("query-status")["status"] == "running"
        assert vm.qmp("qom-get", path="/machine", property="type").startswith("pc-q35-")
        pid, socket_dir = vm.pid, vm.qmp_socket.parent
        assert vm.qmp_socket.exists()
        assert vm.name == "coop"
        wait_ready(command_line)  # the guest booted and its button handler listens
    result = as_pressed(vm.result)
    assert (result.stage, result.graceful, result.reason) == (
        Stage.POWERDOWN,
        True,
        "guest-shutdown",
    )
    assert result.pid == pid
    assert not socket_dir.exists()
    assert gone(pid)
    # The caller's monitor saw the teardown's events too (QEMU sends them to every monitor).
    seen = [(e.event, dict(e.data)) for e in vm.events() if e.event in ("POWERDOWN", "SHUTDOWN")]
    assert seen == [("POWERDOWN", {}), ("SHUTDOWN", {"guest": True, "reason": "guest-shutdown"})]
    assert all(isinstance(e, qmpshutdown.EventRecord) for e in vm.events())


def test_qmp_raises_what_the_monitor_raises(argv):
    with qmpshutdown.launch_sync(argv("ignores"), POLICY) as vm:
        with pytest.raises(ExecuteError, match="no-such-command"):
            vm.qmp("no-such-command")
        assert vm.qmp("query-status")["status"] == "running"  # still usable


def test_exception_in_the_block_propagates_unchanged_and_qemu_is_stopped(argv):
    marker = "qsd-sync-exception"
    error = LookupError("from the block")
    with (
        pytest.raises(LookupError) as caught,
        qmpshutdown.launch_sync([*argv(), "-name", marker], POLICY) as vm,
    ):
        raise error
    assert caught.value is error
    assert vm.result is not None and vm.result.stage is not None
    assert our_qemus(marker) == []


def test_keyboard_interrupt_in_the_block_stops_qemu_then_is_raised_again(argv):
    marker = "qsd-sync-interrupt"
    with (
        pytest.raises(KeyboardInterrupt),
        qmpshutdown.launch_sync([*argv("ignores"), "-name", marker], POLICY) as vm,
    ):
        raise KeyboardInterrupt
    assert vm.result.stage is Stage.QUIT
    # Pressed at once, perhaps while the guest still boots: the sampler may see it working.
    assert vm.result.cause in (Cause.IGNORED_POWER_BUTTON, Cause.BUSY)
    assert our_qemus(marker) == []


@pytest.mark.parametrize("shared_portal", [False, True], ids=["own-portal", "shared-portal"])
def test_ctrl_c_during_the_teardown_does_not_cut_it_short(argv, shared_portal):
    # A real SIGINT to this (main) thread 0.5 s into a teardown that takes the
    # policy's 3 s press before quit: the teardown finishes, then Ctrl-C is raised.
    marker = f"qsd-sync-ctrl-c-{shared_portal}"
    assert threading.current_thread() is threading.main_thread()
    main = threading.main_thread().ident
    assert main is not None
    timer = threading.Timer(0.5, signal.pthread_kill, (main, signal.SIGINT))
    with contextlib.ExitStack() as stack:
        portal = stack.enter_context(start_blocking_portal()) if shared_portal else None
        with (
            pytest.raises(KeyboardInterrupt),
            qmpshutdown.launch_sync(
                [*argv("ignores"), "-name", marker], POLICY, portal=portal
            ) as vm,
        ):
            timer.start()
        timer.join()
        # checked while a shared portal still runs: nothing goes on behind our back
        assert vm.result is not None
    assert vm.result.stage is Stage.QUIT
    assert [s.stage.value for s in vm.result.steps] == ["powerdown", "quit"]
    assert our_qemus(marker) == []


def test_ctrl_c_during_start_up_cancels_it_and_leaves_nothing_running():
    # not QEMU: a program that never greets, so start-up would wait out its 30 s
    marker = "qsd-sync-ctrl-c-boot"
    timer = threading.Timer(
        0.5, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT)
    )
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        timer.start()
        with qmpshutdown.launch_sync(
            [sys.executable, "-c", "import time; time.sleep(60)", marker],
            POLICY,
            startup_timeout=30.0,
        ):
            pytest.fail("the block must not run")
    timer.join()
    assert time.monotonic() - started < 0.5 + POLICY.terminate_timeout + POLICY.kill_timeout
    assert our_qemus(marker, zombies=False) == []


def test_inside_a_running_event_loop_is_a_clear_error(argv):
    command_line = argv()

    async def main() -> None:
        with qmpshutdown.launch_sync(command_line, POLICY):
            pytest.fail("the block must not run")

    with pytest.raises(RuntimeError, match=r"qmpshutdown\.launch\("):
        asyncio.run(main())


def test_one_portal_serves_two_vms_and_shutdown_stops_one_early(argv):
    quick = attrs.evolve(POLICY, powerdown_timeout=1.0)
    with (
        start_blocking_portal(backend="asyncio") as portal,
        qmpshutdown.launch_sync(argv(), POLICY, name="a", portal=portal) as first,
        qmpshutdown.launch_sync(argv("ignores"), POLICY, name="b", portal=portal) as second,
    ):
        result = second.shutdown(quick)
        assert (result.stage, second.result) == (Stage.QUIT, result)
        assert first.qmp("query-status")["status"] == "running"
    assert second.result is result  # the teardown had nothing left to do
    assert first.result.stage is not None
    assert gone(first.pid) and gone(second.pid)
