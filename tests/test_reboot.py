"""A reboot is not a refusal (qmpshutdown/_rungs/reboot.py): against fakes of the seams.

While the power button is pressed QEMU's reboot action is ``shutdown``, so a
guest that reboots ends QEMU unforced (stage powerdown, reason guest-reset, as
under ``-no-reboot``); the command line's action is put back whenever the ladder
ends with QEMU running. Real guests prove the same in tests/guests/test_shutdown.py.
"""

from __future__ import annotations

from collections.abc import Mapping

import anyio
import attrs
import pytest

import qmpshutdown
from qmpshutdown import Cause, ShutdownFailed, ShutdownPolicy, Stage, climb
from qmpshutdown._qemuargs import reboot_action, without_incoming
from support.fakes import QEMU_ARGV, FakeProcess, FakeQemu, climb_fake, outcomes
from support.policies import FAKE

SET = {"reboot": "shutdown"}
PUT_BACK = {"reboot": "reset"}
NO_FORCE = attrs.evolve(FAKE, stages=("powerdown",))
NO_REBOOT = (*QEMU_ARGV, "-no-reboot")


async def run(qemu: FakeQemu, policy: ShutdownPolicy = FAKE, *, with_process: bool = True):
    return await climb_fake(qemu, policy, with_process=with_process)


def record(result):
    """What a record says, times aside."""
    return (
        result.stage, result.graceful, result.reason, result.presses, result.cause,
        outcomes(result), [s.detail for s in result.steps], [e.event for e in result.events],
    )  # fmt: skip


# --- the command line --------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "kept"),
    [
        ((), ()),
        (("-incoming", "defer"), ()),
        (("-m", "256", "-incoming", "exec:cat /s", "-S"), ("-m", "256", "-S")),
        (("--incoming", "tcp:0:4444", "-incoming", "defer"), ()),
    ],
)
def test_a_restored_vm_restored_again_loads_only_its_new_state(
    args: tuple[str, ...], kept: tuple[str, ...]
) -> None:
    assert without_incoming([QEMU_ARGV[0], *args]) == [QEMU_ARGV[0], *kept]


@pytest.mark.parametrize(
    ("args", "action"),
    [
        ((), "reset"),
        (("-no-reboot",), "shutdown"),
        (("--no-reboot",), "shutdown"),
        (("-action", "reboot=shutdown"), "shutdown"),
        (("-action", "shutdown=pause,reboot=reset"), "reset"),
        (("-action", "panic=pause"), "reset"),
        (("-no-reboot", "-action", "reboot=reset"), "reset"),  # QEMU applies them in order
        (("-action", "reboot=reset", "-no-reboot"), "shutdown"),
        (("-append", "console=ttyS0 -no-reboot"), "reset"),  # the kernel's, not QEMU's
        (("-action",), "reset"),
    ],
)
def test_reboot_action_from_the_command_line(args: tuple[str, ...], action: str) -> None:
    assert reboot_action(("qemu-system-x86_64", *args)) == action


def test_a_real_process_reads_its_own_command_line() -> None:
    import os

    from qmpshutdown._process import PidfdProcess

    fd = os.pidfd_open(os.getpid())
    process = PidfdProcess(os.getpid(), fd)
    try:
        argv = process.command_line()
    finally:
        process.close()
    with open(f"/proc/{os.getpid()}/cmdline", "rb") as file:
        assert argv == tuple(a.decode() for a in file.read().rstrip(b"\0").split(b"\0"))


# --- a rebooting guest ----------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_rebooting_guest_is_stopped_unforced_on_the_first_press():
    qemu = FakeQemu(guest="reboots")
    result = await run(qemu)
    assert record(result) == (
        Stage.POWERDOWN, True, "guest-reset", 1, None, [("powerdown", "done")],
        ["pressed once; guest powered off (SHUTDOWN guest-reset)"], ["POWERDOWN", "SHUTDOWN"],
    )  # fmt: skip
    # set before the press; QEMU is gone at the end, so nothing is put back
    assert qemu.monitor.commands == ["query-status", "set-action", "system_powerdown"]
    assert qemu.actions == [SET]
    assert qemu.process.signals == []


@pytest.mark.asyncio
async def test_the_record_is_the_one_a_no_reboot_qemu_gives():
    qemu, no_reboot = (
        FakeQemu(guest="reboots"),
        FakeQemu(guest="reboots", process=FakeProcess(argv=NO_REBOOT)),
    )
    assert record(await run(qemu)) == record(await run(no_reboot))
    # -no-reboot on the command line: a reboot is a shutdown already, nothing is sent
    assert no_reboot.monitor.commands == ["query-status", "system_powerdown"]
    assert no_reboot.actions == []


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "args", [("-action", "reboot=shutdown"), ("-action", "x=y,reboot=shutdown")]
)
async def test_nothing_is_sent_when_the_command_line_makes_a_reboot_a_shutdown(args):
    qemu = FakeQemu(guest="ignores", process=FakeProcess(argv=(*QEMU_ARGV, *args)))
    with pytest.raises(ShutdownFailed):
        await run(qemu, NO_FORCE)
    assert "set-action" not in qemu.monitor.commands
    assert qemu.actions == []


# --- put back whenever the ladder ends with QEMU running --------------------------------


@pytest.mark.asyncio
async def test_put_back_after_shutdown_failed_under_a_no_force_policy():
    qemu = FakeQemu(guest="ignores")
    with pytest.raises(ShutdownFailed) as failed:
        await run(qemu, NO_FORCE)
    assert failed.value.result.cause is Cause.IGNORED_POWER_BUTTON
    assert qemu.actions == [SET, PUT_BACK]
    assert qemu.reboot == "reset"
    assert qemu.monitor.commands[-1] == "set-action"  # after the last press
    # the record is the one it was: the put-back is no step
    assert outcomes(failed.value.result) == [("powerdown", "timeout")]


@pytest.mark.asyncio
async def test_an_action_reboot_from_the_command_line_is_what_is_put_back():
    argv = (*QEMU_ARGV, "-action", "reboot=reset,shutdown=pause")
    qemu = FakeQemu(guest="ignores", process=FakeProcess(argv=argv))
    with pytest.raises(ShutdownFailed):
        await run(qemu, NO_FORCE)
    assert qemu.actions == [SET, PUT_BACK]


@pytest.mark.asyncio
async def test_put_back_after_the_caller_cancelled():
    qemu = FakeQemu(guest="ignores")
    with anyio.move_on_after(0.15) as scope:
        await run(qemu)
    assert scope.cancelled_caught
    assert qemu.actions == [SET, PUT_BACK]
    assert qemu.reboot == "reset"
    assert not qemu.process.has_exited()


@pytest.mark.asyncio
async def test_put_back_when_the_guest_went_off_but_qemu_stays():
    # -no-shutdown and no force allowed: the ladder ends with QEMU in runstate shutdown
    qemu = FakeQemu(guest="reboots", no_shutdown=True)
    result = await run(qemu, NO_FORCE)
    assert (result.stage, result.graceful, result.reason) == (Stage.POWERDOWN, True, "guest-reset")
    assert qemu.actions == [SET, PUT_BACK]


@pytest.mark.asyncio
@pytest.mark.parametrize("guest", ["cooperative", "reboots", "ignores"])
async def test_not_put_back_when_qemu_is_gone(guest):
    qemu = FakeQemu(guest=guest)  # the default ladder: ends with QEMU gone, one way or another
    await run(qemu)
    assert qemu.process.has_exited()
    assert qemu.actions == [SET]


@pytest.mark.asyncio
async def test_the_put_back_is_bounded_by_command_timeout():
    qemu = FakeQemu(guest="ignores")

    async def hangs_the_second_time(fake: FakeQemu, arguments: Mapping[str, object] | None):
        if fake.actions:
            await anyio.sleep_forever()
        return await FakeQemu.set_action(fake, arguments)

    qemu.handlers["set-action"] = hangs_the_second_time
    started = anyio.current_time()
    with anyio.move_on_after(0.15):  # the caller cancels: the put-back still runs, shielded
        await run(qemu)
    took = anyio.current_time() - started
    assert qemu.monitor.commands.count("set-action") == 2
    assert took < 0.15 + FAKE.command_timeout + 0.2


@pytest.mark.asyncio
async def test_an_unanswered_set_action_is_put_back_too():
    qemu = FakeQemu(guest="ignores")
    calls: list[Mapping[str, object] | None] = []

    async def hangs_the_first_time(fake: FakeQemu, arguments: Mapping[str, object] | None):
        calls.append(arguments)
        if len(calls) == 1:
            await anyio.sleep_forever()  # it may still apply later: put it back anyway
        return await FakeQemu.set_action(fake, arguments)

    qemu.handlers["set-action"] = hangs_the_first_time
    with pytest.raises(ShutdownFailed) as failed:
        await run(qemu, NO_FORCE)
    assert calls == [SET, PUT_BACK]
    detail = failed.value.result.steps[0].detail
    assert detail.startswith("no reply to set-action: a reboot may stay a reboot; pressed ")


# --- left as it is --------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_qemu_older_than_6_is_told_apart_and_left_as_it_is():
    qemu = FakeQemu(guest="reboots", set_action=False)  # set-action: CommandNotFound
    result = await run(qemu)
    # a reboot stays a reboot: forced, as before, and the step says why
    assert (result.stage, result.graceful, result.cause) == (Stage.QUIT, False, Cause.REBOOTED)
    assert result.steps[0].detail.startswith(
        "reboot action left as it is (QEMU older than 6.0: no set-action); pressed 3 times; "
    )
    assert qemu.monitor.commands.count("set-action") == 1  # tried once, never put back


@pytest.mark.asyncio
async def test_an_old_qemu_still_stops_a_cooperative_guest_gracefully():
    qemu = FakeQemu(set_action=False)
    result = await run(qemu)
    assert (result.stage, result.graceful, result.cause) == (Stage.POWERDOWN, True, None)
    assert result.steps[0].detail == (
        "reboot action left as it is (QEMU older than 6.0: no set-action); pressed once; "
        "guest powered off (SHUTDOWN guest-shutdown)"
    )


class _CallersProcess:
    """A caller's own Process seam: everything of the fake's but ``command_line``."""

    def __init__(self, inner: FakeProcess) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> object:
        if name == "command_line":
            raise AttributeError(name)
        return getattr(self._inner, name)


@pytest.mark.asyncio
@pytest.mark.parametrize("how", ["unreadable", "no-process", "a-caller's-process"])
async def test_an_unknown_command_line_leaves_the_action_as_it_is(how):
    qemu = FakeQemu(guest="reboots", process=FakeProcess(argv=None if how == "unreadable" else ()))
    process = None if how == "no-process" else qemu.process
    if how == "a-caller's-process":
        process = _CallersProcess(qemu.process)
    with anyio.fail_after(10):
        result = await climb(qemu.monitor, process, FAKE, started=anyio.current_time())
    assert "set-action" not in qemu.monitor.commands
    assert result.cause is Cause.REBOOTED
    assert result.steps[0].detail.startswith(
        "reboot action left as it is (QEMU's command line is unknown); pressed "
    )


# --- the stand-in QEMU processes (tests/support/fakeqemu.py) ------------------------------


def test_a_real_stop_costs_one_set_action_and_an_old_qemu_none_of_its_words(fakes):
    new, old = fakes(1)[0], fakes(1, version="5.2")[0]
    policy = attrs.evolve(FAKE, powerdown_timeout=5.0, command_timeout=2.0)
    for path, said in ((new, ""), (old, "reboot action left as it is (QEMU older than 6.0: ")):
        result = qmpshutdown.shutdown_sync(str(path), policy=policy)
        assert (result.stage, result.graceful, result.reason) == (
            Stage.POWERDOWN, True, "guest-shutdown",
        )  # fmt: skip
        assert result.steps[0].detail.startswith(said + ("pressed" if not said else ""))


@pytest.mark.asyncio
async def test_a_caller_who_cancels_while_set_action_is_in_flight_gets_it_put_back():
    qemu = FakeQemu(guest="ignores")
    sent = anyio.Event()

    async def slow_the_first_time(fake: FakeQemu, arguments: Mapping[str, object] | None):
        if not sent.is_set():
            sent.set()
            await FakeQemu.set_action(fake, arguments)  # applied, but the reply is late
            await anyio.sleep_forever()
        return await FakeQemu.set_action(fake, arguments)

    qemu.handlers["set-action"] = slow_the_first_time
    with anyio.move_on_after(0.05) as scope:
        await run(qemu)
    assert scope.cancelled_caught
    assert "system_powerdown" not in qemu.monitor.commands
    assert qemu.actions == [SET, PUT_BACK]
    assert qemu.reboot == "reset"
