"""The ladder against fakes of the monitor and process seams.

Each test asserts the exact record: the rung, the step sequence, the reason,
the presses and the cause. Real guests prove the same promises in test_shutdown.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal

import anyio
import anyio.lowlevel
import attrs
import pytest

from qmpshutdown import Cause, ShutdownFailed, ShutdownPolicy, Stage, climb
from qmpshutdown._cli_output import print_progress
from qmpshutdown._job import Job
from qmpshutdown._ladder import run_plan
from support.fakes import QEMU_ARGV, FakeProcess, FakeQemu, climb_fake, outcomes
from support.policies import FAKE
from support.records import (
    as_pressed,
    as_pressed_line,
    as_pressed_record,
    as_pressed_report,
    stalled_exit,
)

pytestmark = pytest.mark.asyncio

FAST = FAKE


async def run(qemu: FakeQemu, policy: ShutdownPolicy = FAST, *, with_process: bool = True):
    return await climb_fake(qemu, policy, with_process=with_process)


async def test_cooperative_guest_powers_off_on_the_first_press():
    qemu = FakeQemu()
    result = await run(qemu)
    assert result.stage is Stage.POWERDOWN
    assert result.graceful is True
    assert result.reason == "guest-shutdown"
    assert result.presses == 1
    assert result.cause is None
    assert result.runstate == "running"
    assert result.pid == 4242
    assert outcomes(result) == [("powerdown", "done")]
    assert [e.event for e in result.events] == ["POWERDOWN", "SHUTDOWN"]
    # the reboot action set to shutdown before the press (tests/test_reboot.py)
    assert qemu.monitor.commands == ["query-status", "set-action", "system_powerdown"]
    assert qemu.process.signals == []


async def test_guest_that_wants_a_third_press_gets_it_by_repressing():
    qemu = FakeQemu(guest="needs-3")
    result = await run(qemu, ShutdownPolicy(powerdown_timeout=5, repress_interval=0.05))
    assert (result.stage, result.graceful, result.presses) == (Stage.POWERDOWN, True, 3)
    assert outcomes(result) == [("powerdown", "done")]


async def test_repress_none_presses_once():
    qemu = FakeQemu(guest="ignores")
    policy = ShutdownPolicy(powerdown_timeout=0.2, repress_interval=None, command_timeout=0.2)
    result = await run(qemu, policy)
    assert result.presses == 1
    assert result.stage is Stage.QUIT


async def test_eof_during_quit_is_expected_and_confirmed_by_the_exit():
    qemu = FakeQemu(guest="ignores", quit="eof")
    result = await run(qemu)
    assert result.stage is Stage.QUIT
    assert outcomes(result) == [("powerdown", "timeout"), ("quit", "done")]


async def test_quit_reply_that_never_comes_moves_on_to_sigterm():
    qemu = FakeQemu(guest="ignores", quit="hang")
    result = await run(qemu)
    assert result.stage is Stage.TERMINATE
    assert outcomes(result) == [("powerdown", "timeout"), ("quit", "failed"), ("terminate", "done")]
    assert "no reply to quit" in result.steps[1].detail
    assert qemu.process.signals == [signal.SIGTERM]


async def test_quit_acted_on_but_answered_late_is_still_quit_once_qemu_exits():
    # Seen in CI: 8 TCG guests on 2 cores, a deadline's 60 ms command_timeout, SHUTDOWN
    # host-qmp-quit, then the exit; the ladder used to call the monitor unresponsive and
    # send SIGTERM to a QEMU already on its way out.
    qemu = FakeQemu(guest="ignores", quit="late")
    qemu.late_by = FAST.command_timeout + FAST.quit_timeout / 2  # the reply: never
    result = await run(qemu)
    assert result.stage is Stage.QUIT
    assert outcomes(result) == [("powerdown", "timeout"), ("quit", "done")]
    assert "no reply to quit" in result.steps[1].detail
    assert result.cause is not Cause.MONITOR_UNRESPONSIVE
    assert qemu.process.signals == []



async def test_quit_acted_on_but_unanswered_whose_exit_stalls_is_woken():
    # Seen on a real QEMU whose exit was held (tests/guests/test_faults.py): its SHUTDOWN
    # host-qmp-quit came, the reply to quit did not. The exit has begun all the same: woken
    # command_timeout after the reply was given up on, and the record stays quit's.
    qemu = FakeQemu(guest="ignores", quit="late")
    qemu.late_by = 3600.0  # its exit: only when a signal comes
    policy = attrs.evolve(FAST, quit_timeout=1.0)
    result = await run(qemu, policy)
    assert outcomes(result) == [("powerdown", "timeout"), ("quit", "done")]
    assert qemu.process.signals == [signal.SIGTERM]
    step = result.step(Stage.QUIT)
    assert step.detail.startswith("no reply to quit"), step.detail
    assert step.detail.endswith("its exit had stalled until a SIGTERM woke it"), step.detail
    took = step.ended - step.started
    assert 2 * policy.command_timeout <= took < 2 * policy.command_timeout + 0.2, took

async def test_quit_unanswered_by_a_stopped_qemu_moves_on_at_once():
    # A stopped QEMU (SIGSTOP, a debugger) cannot be on its way out: no quit_timeout wait.
    qemu = FakeQemu(guest="ignores", quit="hang")
    policy = attrs.evolve(FAST, quit_timeout=5.0)
    process = qemu.process

    async def stop_then_quit(fake, arguments):
        process.stopped = True
        await anyio.sleep_forever()

    qemu.handlers["quit"] = stop_then_quit
    result = await run(qemu, policy)
    quit = result.step(Stage.QUIT)
    assert (quit.outcome.value, quit.cause) == ("failed", Cause.MONITOR_UNRESPONSIVE)
    assert quit.ended - quit.started < policy.command_timeout + 1.0  # not quit_timeout
    assert result.stage is Stage.TERMINATE


def _stopped_at_quit(qemu: FakeQemu, *, on_continue: str) -> list[tuple[int, int]]:
    """QEMU is stopped as quit is written, so quit stays unanswered; on SIGCONT it answers
    0.05 s later (*on_continue* "answers"), exits on that quit ("exits"), closes its monitor
    on it and exits 0.12 s later ("hangs up", seen in CI), or stays silent ("silent": traced
    by a debugger). Returns each signal with the count unanswered then."""
    process = qemu.process
    unanswered = [0]
    qemu.monitor.unanswered = lambda: unanswered[0]
    sent: list[tuple[int, int]] = []

    async def stop_then_quit(fake, arguments):
        process.stopped = True
        unanswered[0] = 1
        await anyio.sleep_forever()

    qemu.handlers["quit"] = stop_then_quit
    send_signal = process.send_signal

    def signalled(signum: int) -> None:
        sent.append((signum, unanswered[0]))
        send_signal(signum)
        loop = asyncio.get_running_loop()
        if signum == signal.SIGCONT and on_continue == "answers":
            loop.call_later(0.05, unanswered.__setitem__, 0, 0)
        elif signum == signal.SIGCONT and on_continue == "exits":
            loop.call_later(0.05, process.exit)
        elif signum == signal.SIGCONT and on_continue == "stopped again":
            loop.call_later(0.03, setattr, process, "stopped", True)
        elif signum == signal.SIGCONT and on_continue == "hangs up":  # then exits, slowly
            loop.call_later(0.03, qemu.monitor.closed.set)
            loop.call_later(0.12, process.exit)

    process.send_signal = signalled
    return sent


async def test_a_stopped_qemu_answers_what_it_was_sent_before_its_sigterm():
    # QEMU 10.0 crashed (SIGSEGV in monitor_cleanup) when SIGTERM and SIGCONT together
    # raced the commands it had been sent while stopped (CI of stop 34).
    qemu = FakeQemu(guest="ignores")
    sent = _stopped_at_quit(qemu, on_continue="answers")
    result = await run(qemu)
    assert sent == [(signal.SIGCONT, 1), (signal.SIGTERM, 0)]
    assert outcomes(result)[-1] == ("terminate", "done")
    detail = result.step(Stage.TERMINATE).detail
    assert detail.startswith(
        "sent SIGCONT (QEMU was stopped, 1 command unanswered); its commands answered; "
        "then sent SIGTERM; QEMU exited"
    ), detail


async def test_a_stopped_qemu_that_exits_on_its_pending_quit_gets_no_sigterm():
    qemu = FakeQemu(guest="ignores")
    sent = _stopped_at_quit(qemu, on_continue="exits")
    result = await run(qemu)
    assert sent == [(signal.SIGCONT, 1)]
    assert outcomes(result)[-1] == ("terminate", "done")
    assert result.step(Stage.TERMINATE).detail.startswith(
        "sent SIGCONT (QEMU was stopped, 1 command unanswered); QEMU exited"
    )


async def test_a_continued_qemu_that_hangs_up_and_exits_later_is_seen_gone_at_its_exit():
    # CI: QEMU 10.0 answered its pending quit with an EOF and exited ~3 s later; a second
    # reader on the pidfd (this rung's own) had replaced the ladder's, and the exit was
    # seen only at the end of the rung's budget.
    qemu = FakeQemu(guest="ignores")
    sent = _stopped_at_quit(qemu, on_continue="hangs up")
    qemu.process.ignores = frozenset({signal.SIGTERM})  # the exit is QEMU's own, later
    result = await run(qemu)
    assert sent == [(signal.SIGCONT, 1), (signal.SIGTERM, 1)]
    terminate = result.step(Stage.TERMINATE)
    assert terminate.outcome.value == "done"
    assert terminate.detail.startswith(
        "sent SIGCONT (QEMU was stopped, 1 command unanswered); its monitor closed; "
        "then sent SIGTERM; QEMU exited"
    ), terminate.detail


async def test_a_continued_qemu_stopped_again_gets_sigterm_and_sigcont():
    # SIGSTOP again while it answers (the chaos soak's random moments): SIGTERM alone
    # would wait for a SIGCONT that never comes.
    qemu = FakeQemu(guest="ignores")
    sent = _stopped_at_quit(qemu, on_continue="stopped again")
    result = await run(qemu)
    assert sent == [(signal.SIGCONT, 1), (signal.SIGTERM, 1), (signal.SIGCONT, 1)]
    terminate = result.step(Stage.TERMINATE)
    assert terminate.outcome.value == "done"
    assert "then sent SIGTERM and SIGCONT (QEMU was stopped again); QEMU exited" in (
        terminate.detail
    ), terminate.detail


async def test_a_continued_qemu_that_answers_nothing_gets_sigterm_within_the_budget():
    qemu = FakeQemu(guest="ignores")
    sent = _stopped_at_quit(qemu, on_continue="silent")
    process = qemu.process
    process.ignores = frozenset({signal.SIGTERM})
    result = await run(qemu)
    assert sent[:2] == [(signal.SIGCONT, 1), (signal.SIGTERM, 1)]
    terminate = result.step(Stage.TERMINATE)
    assert terminate.outcome.value == "timeout"
    assert "1 still unanswered; then sent SIGTERM; QEMU still running" in terminate.detail
    assert "over its budget" not in terminate.detail  # the wait came out of the rung's budget
    assert terminate.ended - terminate.started < FAST.terminate_timeout + 0.1
    assert result.stage is Stage.KILL


def _slow_exit(qemu: FakeQemu, after: float, *, stop: bool = False) -> None:
    """The guest powers off on the press; QEMU answers nothing more, and exits *after* s later
    (a loaded host, seen in CI), or is SIGSTOPped right after its SHUTDOWN (*stop*)."""
    answer = qemu.handlers["query-status"]
    off = False

    async def powerdown(fake, arguments):
        nonlocal off
        off = True
        fake.monitor.emit("POWERDOWN")
        fake.monitor.emit("SHUTDOWN", guest=True, reason="guest-shutdown")
        if stop:
            fake.process.stopped = True
            return {}
        loop = asyncio.get_running_loop()
        loop.call_later(after - 0.05, fake.monitor.closed.set)  # its exit closes the monitor
        loop.call_later(after, fake.process.exit)
        return {}

    async def query_status(fake, arguments):
        if off:
            await anyio.sleep_forever()
        return await answer(fake, arguments)

    qemu.handlers["system_powerdown"] = powerdown
    qemu.handlers["query-status"] = query_status


@pytest.mark.parametrize("argv", [("qemu-system-x86_64",), None], ids=["argv", "no-argv"])
async def test_a_guest_off_whose_qemu_exits_slowly_is_not_forced(argv):
    # Seen in CI on a loaded host: SHUTDOWN guest-shutdown, then QEMU neither exited nor
    # answered query-status for seconds; the ladder called the guest's power-off unconfirmed,
    # skipped quit (the monitor had closed) and sent SIGTERM to a QEMU on its way out. Now
    # the exit is waited for; a QEMU whose command line says only an exit can follow is
    # woken first (a SIGTERM that ends nothing more), one whose command line is unknown is not.
    qemu = FakeQemu(process=FakeProcess(argv=argv, ignores=frozenset({signal.SIGTERM})))
    policy = attrs.evolve(FAST, quit_timeout=1.0)
    _slow_exit(qemu, FAST.command_timeout * 2 + 0.3)  # past the wait and a query-status
    result = await run(qemu, policy)
    assert (result.stage, result.graceful, result.presses) == (Stage.POWERDOWN, True, 1)
    assert outcomes(result) == [("powerdown", "done")]
    assert qemu.process.signals == ([] if argv is None else [signal.SIGTERM])
    # No command reaches a QEMU in its exit (QEMU 10.0 can crash reading one late).
    after_press = qemu.monitor.commands[qemu.monitor.commands.index("system_powerdown") + 1:]
    assert after_press == ([] if argv is not None else ["query-status"])


async def test_a_guest_off_whose_qemu_is_stopped_is_not_waited_for():
    qemu = FakeQemu()
    policy = attrs.evolve(FAST, quit_timeout=5.0)
    _slow_exit(qemu, 0.0, stop=True)
    result = await run(qemu, policy)
    powerdown = result.step(Stage.POWERDOWN)
    assert powerdown.outcome.value == "failed"
    assert "neither exited nor stopped" in powerdown.detail
    assert powerdown.ended - powerdown.started < 2 * policy.command_timeout + 1.0  # no 5 s
    assert result.graceful and result.stage is not Stage.POWERDOWN


async def test_a_qemu_whose_exit_stalls_after_the_guests_shutdown_is_woken_by_sigterm():
    # Seen in CI and reproduced (QEMU 10.0 beside 3 CPU burners, 1 stop in 16): the guest's
    # SHUTDOWN, then QEMU neither exits nor answers until a signal (SIGTERM: 0.01 s): its
    # main thread waits in monitor_cleanup() for a wake-up it missed (docs/why.md). Not gone
    # command_timeout after the SHUTDOWN, a SIGTERM wakes it: a stop on the press.
    qemu = FakeQemu(quit="hang")
    policy = attrs.evolve(FAST, quit_timeout=0.5)
    _slow_exit(qemu, 3600.0)
    result = await run(qemu, policy)
    assert (result.stage, result.graceful, result.reason, result.cause) == (
        Stage.POWERDOWN, True, "guest-shutdown", None,
    )  # fmt: skip
    assert outcomes(result) == [("powerdown", "done")]
    assert qemu.process.signals == [signal.SIGTERM]
    powerdown = result.step(Stage.POWERDOWN)
    assert powerdown.detail.endswith(
        "guest powered off (SHUTDOWN guest-shutdown); its exit had stalled until a SIGTERM woke it"
    ), powerdown.detail
    # the press, command_timeout for the exit, then the SIGTERM at once (no query-status)
    took = powerdown.ended - powerdown.started
    assert policy.command_timeout <= took < policy.command_timeout + 0.2, took
    assert qemu.monitor.commands[-1] == "system_powerdown", qemu.monitor.commands
    assert not stalled_exit(result)



async def test_nothing_is_sent_into_an_exit_left_running_when_no_force_is_allowed(tmp_path):
    # No forced rung in the plan: the ladder ends with QEMU still in its (stalled) exit.
    # Putting the reboot action back and a last screenshot would be commands into that
    # exit, where QEMU 10.0 can crash reading one (docs/why.md): neither is sent.
    qemu = FakeQemu()
    _slow_exit(qemu, 3600.0)
    policy = attrs.evolve(FAST, stages=("powerdown",), quit_timeout=0.3)
    job = Job("fake", policy=policy, name="fake", evidence_dir=str(tmp_path))
    with anyio.fail_after(10):
        try:
            result = await run_plan(job, qemu.monitor, qemu.process, started=anyio.current_time())
        except ShutdownFailed as failed:
            result = failed.result
    commands = qemu.monitor.commands
    assert commands[:3] == ["query-status", "set-action", "system_powerdown"], commands
    # After the press nothing: its command line ends QEMU once the guest is off, so only
    # the exit can follow (no query-status either); no set-action to put the reboot action
    # back, no screendump.
    assert commands[3:] == [], commands
    assert qemu.process.signals == []  # no terminate in the plan: no wake-up either
    assert [step.stage.value for step in result.steps] == ["powerdown"]
    assert list(tmp_path.iterdir()) == []


async def test_under_no_shutdown_the_runstate_is_still_asked_when_no_stop_came():
    # -no-shutdown: QEMU stays once its guest is off, so a missed STOP is asked about.
    qemu = FakeQemu(process=FakeProcess(argv=(*QEMU_ARGV, "-no-shutdown")))
    _slow_exit(qemu, 3600.0)
    policy = attrs.evolve(FAST, stages=("powerdown",), quit_timeout=0.3)
    job = Job("fake", policy=policy, name="fake")
    with anyio.fail_after(10), contextlib.suppress(ShutdownFailed):
        await run_plan(job, qemu.monitor, qemu.process, started=anyio.current_time())
    commands = qemu.monitor.commands
    assert commands[commands.index("system_powerdown") + 1 :][:1] == ["query-status"], commands


def _deaf_to_the_first_sigterm(process: FakeProcess) -> None:
    send_signal, heard = process.send_signal, []

    def signalled(signum: int) -> None:
        if signum == signal.SIGTERM and not heard:
            heard.append(signum)
            process.signals.append(signum)
            return
        send_signal(signum)

    process.send_signal = signalled


async def test_a_stalled_exit_that_sigterm_does_not_wake_skips_quit_and_is_terminated():
    # The record of stop 33's fix, kept when the wake-up does not help: quit cannot end an
    # exit already begun, and the terminate rung's SIGTERM follows at once.
    qemu = FakeQemu(quit="hang")
    policy = attrs.evolve(FAST, quit_timeout=0.5)
    _slow_exit(qemu, 3600.0)
    _deaf_to_the_first_sigterm(qemu.process)
    result = await run(qemu, policy)
    assert (result.stage, result.graceful, result.reason) == (
        Stage.TERMINATE, True, "guest-shutdown",
    )  # fmt: skip
    # The guest went on the press: QEMU is what did not answer (no ignored-power-button).
    assert result.cause is Cause.MONITOR_UNRESPONSIVE
    assert outcomes(result) == [("powerdown", "failed"), ("quit", "skipped"), ("terminate", "done")]
    assert "cannot end an exit already begun" in result.step(Stage.QUIT).detail
    assert "woke" not in result.step(Stage.TERMINATE).detail
    assert qemu.process.signals == [signal.SIGTERM, signal.SIGTERM]
    # The real-guest tests know this record (tests/support/records.py) and no other.
    assert stalled_exit(result) and not stalled_exit(attrs.evolve(result, reason="host-signal"))
    pressed = as_pressed(result)
    assert (pressed.stage, pressed.graceful, pressed.cause) == (Stage.POWERDOWN, True, None)
    assert outcomes(pressed) == [("powerdown", "done")]
    record = as_pressed_record(result.to_dict())
    assert (record["stage"], record["cause"]) == ("powerdown", None)
    assert [(s["stage"], s["outcome"]) for s in record["steps"]] == [("powerdown", "done")]
    assert as_pressed_record(attrs.evolve(result, graceful=False).to_dict())["stage"] == "terminate"


@pytest.mark.parametrize(
    ("argv", "stages"),
    [
        (("qemu-system-x86_64", "-no-shutdown"), None),
        (("qemu-system-x86_64", "-action", "reboot=shutdown,shutdown=pause"), None),
        (None, None),  # its command line unknown
        (("qemu-system-x86_64",), ("powerdown", "quit", "kill")),  # the plan sends no SIGTERM
    ],
    ids=["no-shutdown", "action-shutdown-pause", "argv-unknown", "no-terminate"],
)
async def test_a_stalled_exit_is_not_woken_where_sigterm_could_end_more(argv, stages):
    qemu = FakeQemu(quit="hang", process=FakeProcess(argv=argv))
    policy = attrs.evolve(FAST, quit_timeout=0.5)
    if stages is not None:
        policy = attrs.evolve(policy, stages=stages)
    _slow_exit(qemu, 3600.0)
    result = await run(qemu, policy)
    assert result.step(Stage.POWERDOWN).outcome.value == "failed"
    assert "woke" not in str(result.steps)
    assert qemu.process.signals == ([signal.SIGTERM] if stages is None else [signal.SIGKILL])


async def test_the_text_forms_of_a_stalled_exit_are_read_as_a_press(capsys):
    # The CLI's text output and the pytest plugin's report have no record to read: the
    # real-guest tests read them with these helpers, which must know this record's text.
    qemu = FakeQemu(quit="hang")
    _slow_exit(qemu, 3600.0)
    _deaf_to_the_first_sigterm(qemu.process)
    with anyio.fail_after(10):
        result = await climb(
            qemu.monitor, qemu.process, attrs.evolve(FAST, quit_timeout=0.5),
            started=anyio.current_time(), name="fake", on_progress=print_progress,
        )  # fmt: skip
    err = capsys.readouterr().err
    line = f"fake  {result.summary()}"
    assert line.startswith("fake  terminate graceful reason=guest-shutdown "), line
    assert as_pressed_line(line, err, "fake").startswith(
        "fake  powerdown graceful reason=guest-shutdown presses=1 "
    )
    assert as_pressed_line(line, err, "other") == line  # another target's progress
    assert as_pressed_line(line, err.replace("quit skipped", "quit failed"), "fake") == line
    report = f"vm1: {result.summary()}\nvm2: quit forced reason=host-qmp-quit"
    assert as_pressed_report(report, "vm1").startswith("vm1: powerdown graceful reason=guest-")
    assert as_pressed_report(report, "vm2") == report


async def test_sigterm_ignored_then_sigkill():
    qemu = FakeQemu(guest="ignores", quit="ignore", process=FakeProcess(ignores=frozenset({15})))
    result = await run(qemu)
    assert result.stage is Stage.KILL
    assert outcomes(result) == [
        ("powerdown", "timeout"),
        ("quit", "timeout"),
        ("terminate", "timeout"),
        ("kill", "done"),
    ]
    assert qemu.process.signals == [signal.SIGTERM, signal.SIGKILL]



async def test_a_qemu_whose_exit_stalls_after_quit_is_woken_by_sigterm():
    # quit answered, QEMU's exit can stall as after the guest's SHUTDOWN (the same
    # monitor_cleanup() wait): command_timeout into quit_timeout, a SIGTERM wakes it, and
    # the record is still quit's (the signal began nothing that quit had not).
    qemu = FakeQemu(guest="ignores", quit="stall")
    policy = attrs.evolve(FAST, quit_timeout=1.0)
    result = await run(qemu, policy)
    assert (result.stage, result.graceful, result.reason) == (Stage.QUIT, False, "host-qmp-quit")
    assert outcomes(result) == [("powerdown", "timeout"), ("quit", "done")]
    assert qemu.process.signals == [signal.SIGTERM]
    step = result.step(Stage.QUIT)
    assert step.detail.endswith("its exit had stalled until a SIGTERM woke it"), step.detail
    took = step.ended - step.started
    assert policy.command_timeout <= took < policy.command_timeout + 0.2, took


@pytest.mark.parametrize("case", ["sigterm-ignored", "no-terminate", "no-time-left"])
async def test_a_stalled_exit_after_quit_is_woken_only_where_it_can_be(case):
    process = FakeProcess(ignores=frozenset({signal.SIGTERM} if case == "sigterm-ignored" else ()))
    qemu = FakeQemu(guest="ignores", quit="stall", process=process)
    quit_timeout = FAST.command_timeout if case == "no-time-left" else 1.0
    policy = attrs.evolve(FAST, quit_timeout=quit_timeout)
    if case == "no-terminate":
        policy = attrs.evolve(policy, stages=("powerdown", "quit", "kill"))
    result = await run(qemu, policy)
    assert result.step(Stage.QUIT).outcome.value == "timeout"
    assert "woke" not in str(result.steps)
    expected = {
        # the wake-up, terminate's, then kill
        "sigterm-ignored": [signal.SIGTERM, signal.SIGTERM, signal.SIGKILL],
        "no-terminate": [signal.SIGKILL],
        "no-time-left": [signal.SIGTERM],  # terminate's own
    }[case]
    assert qemu.process.signals == expected
    assert result.stage is (Stage.TERMINATE if case == "no-time-left" else Stage.KILL)

async def test_stopped_qemu_gets_sigcont_after_sigterm_so_it_can_exit_cleanly():
    process = FakeProcess(stopped=True)
    qemu = FakeQemu(process=process)
    result = await climb(
        None, process, FAST, started=anyio.current_time(), no_monitor_why="no greeting"
    )
    assert result.stage is Stage.TERMINATE
    assert result.cause is Cause.MONITOR_UNRESPONSIVE
    assert outcomes(result) == [
        ("powerdown", "skipped"),
        ("quit", "skipped"),
        ("terminate", "done"),
    ]
    assert process.signals == [signal.SIGTERM, signal.SIGCONT]
    assert "SIGCONT" in result.steps[2].detail
    assert qemu.monitor.commands == []


async def test_without_a_pid_the_signal_rungs_are_skipped_and_the_failure_is_raised():
    qemu = FakeQemu(guest="ignores", quit="ignore")
    with pytest.raises(ShutdownFailed) as caught:
        await run(qemu, with_process=False)
    result = caught.value.result
    assert result.stage is None
    assert result.pid is None
    assert outcomes(result) == [
        ("powerdown", "timeout"),
        ("quit", "timeout"),
        ("terminate", "skipped"),
        ("kill", "skipped"),
    ]
    assert result.cause is Cause.IGNORED_POWER_BUTTON
    assert "still running" in str(caught.value)


async def test_without_a_pid_the_monitor_eof_confirms_the_exit():
    qemu = FakeQemu()
    result = await run(qemu, with_process=False)
    assert (result.stage, result.graceful, result.reason) == (
        Stage.POWERDOWN,
        True,
        "guest-shutdown",
    )


async def test_no_force_policy_never_goes_past_the_button():
    qemu = FakeQemu(guest="ignores")
    with pytest.raises(ShutdownFailed) as caught:
        await run(
            qemu,
            FAST.__class__(powerdown_timeout=0.1, repress_interval=None, stages=("powerdown",)),
        )
    assert outcomes(caught.value.result) == [("powerdown", "timeout")]
    assert "quit" not in qemu.monitor.commands
    assert qemu.process.signals == []


@pytest.mark.parametrize("wake", [True, False])
async def test_suspended_guest_is_woken_before_the_press_or_skipped(wake):
    qemu = FakeQemu(runstate="suspended")
    result = await run(
        qemu, ShutdownPolicy(wake_suspended=wake, quit_timeout=0.2, command_timeout=0.2)
    )
    assert result.runstate == "suspended"
    if wake:
        assert (result.stage, result.graceful, result.cause) == (Stage.POWERDOWN, True, None)
        assert qemu.monitor.commands == [
            "query-status", "system_wakeup", "set-action", "system_powerdown",
        ]  # fmt: skip
        assert [e.event for e in result.events] == ["WAKEUP", "POWERDOWN", "SHUTDOWN"]
    else:
        assert (result.stage, result.graceful, result.cause) == (Stage.QUIT, False, Cause.ASLEEP)
        # The default ladder: no agent socket given, so the agent rung is skipped (recorded).
        assert outcomes(result) == [
            ("powerdown", "skipped"), ("agent", "skipped"), ("quit", "done"),
        ]  # fmt: skip
        assert result.presses == 0
        assert "system_powerdown" not in qemu.monitor.commands


async def test_guest_that_falls_asleep_on_the_press_is_woken_and_pressed_again():
    qemu = FakeQemu(guest="sleeps")
    result = await run(qemu)
    # sleeps on every press: woken before each re-press, never powers off
    assert result.stage is Stage.QUIT
    assert result.cause is Cause.ASLEEP
    assert qemu.monitor.commands.count("system_wakeup") == result.presses - 1 >= 1


@pytest.mark.parametrize("runstate", ["paused", "prelaunch", "io-error", "watchdog", "debug"])
async def test_paused_guest_is_not_pressed_unless_resume_paused(runstate):
    qemu = FakeQemu(runstate=runstate)
    result = await run(qemu)
    assert (result.stage, result.cause, result.presses) == (Stage.QUIT, Cause.PAUSED, 0)
    assert outcomes(result) == [("powerdown", "skipped"), ("quit", "done")]
    assert "system_powerdown" not in qemu.monitor.commands
    assert "resume_paused is off" in result.steps[0].detail


async def test_paused_guest_is_resumed_then_pressed_with_resume_paused():
    qemu = FakeQemu(runstate="paused")
    result = await run(qemu, ShutdownPolicy(resume_paused=True))
    assert (result.stage, result.graceful, result.presses) == (Stage.POWERDOWN, True, 1)
    assert qemu.monitor.commands == ["query-status", "cont", "set-action", "system_powerdown"]


@pytest.mark.parametrize(
    ("runstate", "cause"),
    [
        ("guest-panicked", Cause.PANICKED),
        ("internal-error", Cause.PANICKED),
        ("inmigrate", Cause.MIGRATING),
        ("postmigrate", Cause.MIGRATING),
        ("finish-migrate", Cause.MIGRATING),
    ],
)
async def test_runstates_where_a_press_is_pointless_skip_it(runstate, cause):
    qemu = FakeQemu(runstate=runstate)
    result = await run(qemu)
    assert (result.stage, result.cause, result.presses) == (Stage.QUIT, cause, 0)
    assert outcomes(result) == [("powerdown", "skipped"), ("quit", "done")]


async def test_guest_panicking_while_we_wait_stops_the_pressing_at_once():
    qemu = FakeQemu(guest="panics")
    result = await run(qemu, ShutdownPolicy(powerdown_timeout=30, quit_timeout=1))
    assert (result.stage, result.cause, result.presses) == (Stage.QUIT, Cause.PANICKED, 1)
    assert outcomes(result) == [("powerdown", "failed"), ("agent", "skipped"), ("quit", "done")]
    assert result.steps[1].detail == "no agent socket given"
    assert result.steps[0].ended < 1.0  # did not wait out the 30 s


async def test_guest_panicking_with_the_poweroff_action_ends_qemu_itself():
    qemu = FakeQemu(guest="panics-poweroff")
    result = await run(qemu)
    assert (result.stage, result.graceful, result.reason, result.cause) == (
        Stage.POWERDOWN,
        False,
        "guest-panic",
        Cause.PANICKED,
    )
    assert outcomes(result) == [("powerdown", "done")]
    assert "quit" not in qemu.monitor.commands


async def test_press_met_by_a_closing_monitor_waits_for_the_exit_that_follows():
    # QEMU 10.0, a panic while repressing: EPIPE on the press, the pidfd a moment later
    qemu = FakeQemu(guest="exits-on-the-second-press")
    policy = ShutdownPolicy(powerdown_timeout=5, repress_interval=0.05, command_timeout=1)
    result = await run(qemu, policy)
    assert (result.stage, result.graceful, result.reason, result.cause) == (
        Stage.POWERDOWN,
        False,
        "guest-panic",
        Cause.PANICKED,
    )
    assert outcomes(result) == [("powerdown", "done")]
    assert qemu.process.signals == []


async def test_press_met_by_a_closed_monitor_of_a_qemu_that_stays_fails_and_forces():
    qemu = FakeQemu(guest="ignores")
    qemu.monitor.closed.set()  # our side of the socket is gone; QEMU is not
    policy = ShutdownPolicy(powerdown_timeout=5, command_timeout=0.2)
    result = await run(qemu, policy)
    assert outcomes(result)[0] == ("powerdown", "failed")
    assert result.stage is Stage.TERMINATE


async def test_guest_that_reboots_on_the_press_is_stopped_unforced():
    # reboot=shutdown while the button is pressed: the reset ends QEMU, as under -no-reboot
    qemu = FakeQemu(guest="reboots")
    result = await run(qemu)
    assert (result.stage, result.graceful, result.reason, result.cause) == (
        Stage.POWERDOWN, True, "guest-reset", None,
    )  # fmt: skip
    assert result.presses == 1


async def test_guest_that_reboots_on_every_press_of_an_old_qemu_is_forced_with_cause_rebooted():
    qemu = FakeQemu(guest="reboots", set_action=False)  # QEMU < 6.0: no set-action
    result = await run(qemu)
    assert (result.stage, result.cause) == (Stage.QUIT, Cause.REBOOTED)
    # One press at 0, re-presses every 0.1 s within 0.25 s: 3 on an idle host, fewer on a
    # loaded one (seen: the quick suite on 2 workers). Each press is a reboot.
    assert result.presses >= 2
    assert [e.event for e in result.events].count("RESET") == result.presses


async def test_no_shutdown_guest_off_then_quit_ends_qemu():
    qemu = FakeQemu(no_shutdown=True)
    result = await run(qemu)
    assert (result.stage, result.graceful, result.reason) == (
        Stage.POWERDOWN,
        True,
        "guest-shutdown",
    )
    assert outcomes(result) == [("powerdown", "done"), ("quit", "done")]
    # the SHUTDOWN our quit caused does not replace the guest's
    assert [e.data.get("reason") for e in result.events if e.event == "SHUTDOWN"] == [
        "guest-shutdown",
        "host-qmp-quit",
    ]


async def test_no_shutdown_guest_off_without_force_leaves_qemu_for_its_owner():
    qemu = FakeQemu(no_shutdown=True)
    result = await run(qemu, ShutdownPolicy(stages=("powerdown",)))
    assert (result.stage, result.graceful) == (Stage.POWERDOWN, True)
    assert outcomes(result) == [("powerdown", "done")]
    assert not qemu.process.has_exited()
    assert qemu.runstate == "shutdown"


async def test_already_off_on_connect_is_ended_with_quit():
    qemu = FakeQemu(runstate="shutdown")
    result = await run(qemu)
    assert (result.stage, result.graceful, result.presses) == (Stage.ALREADY_OFF, True, 0)
    assert outcomes(result) == [("quit", "done")]
    assert result.reason == "host-qmp-quit"


async def test_already_off_without_force_allowed_is_a_success():
    qemu = FakeQemu(runstate="shutdown")
    result = await run(qemu, ShutdownPolicy(stages=("powerdown",)))
    assert (result.stage, result.graceful, result.steps) == (Stage.ALREADY_OFF, True, ())


async def test_query_status_that_never_answers_counts_as_an_unresponsive_monitor():
    qemu = FakeQemu()

    async def hang(qemu, arguments):
        await anyio.sleep_forever()

    qemu.handlers["query-status"] = hang
    qemu.quit_behaviour = "hang"
    result = await run(qemu)
    assert (result.stage, result.cause) == (Stage.TERMINATE, Cause.MONITOR_UNRESPONSIVE)
    assert outcomes(result) == [("powerdown", "failed"), ("quit", "failed"), ("terminate", "done")]


async def test_query_status_answered_late_once_is_asked_again_and_the_guest_goes_gracefully():
    # Seen in CI: 8 TCG guests on 2 cores, a fleet deadline's 60 ms command_timeout; the
    # first query-status came late, and a cooperative guest was forced without a press.
    qemu = FakeQemu()
    answer = FakeQemu.query_status
    asked = []

    async def late_once(fake, arguments):
        asked.append(1)
        if len(asked) == 1:
            await anyio.sleep_forever()
        return await answer(fake, arguments)

    qemu.handlers["query-status"] = late_once
    result = await run(qemu)
    assert (result.stage, result.graceful, result.presses) == (Stage.POWERDOWN, True, 1)
    assert len(asked) == 2


async def test_a_stopped_qemu_is_not_asked_its_runstate_again():
    process = FakeProcess(stopped=True)
    qemu = FakeQemu(process=process)

    async def hang(fake, arguments):
        await anyio.sleep_forever()

    qemu.handlers["query-status"] = hang
    qemu.quit_behaviour = "hang"
    result = await run(qemu)
    assert result.step(Stage.POWERDOWN).outcome.value == "failed"
    assert qemu.monitor.commands.count("query-status") == 1


async def test_qemu_gone_before_the_first_rung_is_already_off():
    qemu = FakeQemu()
    qemu.exit()
    result = await run(qemu)
    assert result.stage is Stage.ALREADY_OFF
    assert result.steps == ()


async def test_times_count_from_the_call_and_steps_are_ordered():
    qemu = FakeQemu(guest="ignores")
    result = await run(qemu)
    starts = [s.started for s in result.steps]
    assert starts == sorted(starts)
    for step in result.steps:
        assert 0 <= step.started <= step.ended <= result.elapsed + 1e-9


@pytest.mark.parametrize("at", [0.05, 0.3, 0.5, 0.75])
async def test_cancelling_the_caller_at_each_rung_propagates(at):
    # ignores quit and SIGTERM: rungs at 0-0.25 (powerdown), 0.25-0.45 (quit),
    # 0.45-0.65 (terminate), 0.65- (kill, which would end it)
    qemu = FakeQemu(guest="ignores", quit="ignore", process=FakeProcess(ignores=frozenset({15})))
    with anyio.move_on_after(at) as scope:
        await run(qemu)
    assert scope.cancelled_caught
    # nothing of the ladder runs on after the caller left
    commands, signals = list(qemu.monitor.commands), list(qemu.process.signals)
    await anyio.sleep(0.3)
    assert (qemu.monitor.commands, qemu.process.signals) == (commands, signals)


class _Without:
    """A caller's seam from before 0.3: everything but the one method named."""

    def __init__(self, inner: object, missing: str) -> None:
        self._inner, self._missing = inner, missing

    def __getattr__(self, name: str) -> object:
        if name == self._missing:
            raise AttributeError(name)
        return getattr(self._inner, name)


@pytest.mark.parametrize("guest", ["cooperative", "ignores"])
async def test_a_monitor_without_on_event_and_a_process_without_on_exit_still_climb(guest):
    # climb() is the extension point: seams written before on_event/on_exit get tasks instead.
    qemu = FakeQemu(guest=guest)
    monitor, process = _Without(qemu.monitor, "on_event"), _Without(qemu.process, "on_exit")
    assert not hasattr(monitor, "on_event") and not hasattr(process, "on_exit")
    with anyio.fail_after(10):
        result = await climb(monitor, process, FAST, started=anyio.current_time(), name="old")
    if guest == "cooperative":
        assert (result.stage, result.graceful, result.presses) == (Stage.POWERDOWN, True, 1)
        assert [e.event for e in result.events] == ["POWERDOWN", "SHUTDOWN"]
    else:
        assert (result.stage, result.cause) == (Stage.QUIT, Cause.IGNORED_POWER_BUTTON)
        assert "SHUTDOWN" in [e.event for e in result.events]
    assert result.pid == 4242 and qemu.process.has_exited()


async def test_a_press_answered_in_the_same_turn_as_the_exit_is_counted():
    # A loaded host: the reply to the press and QEMU's exit are seen in one turn of the loop
    # (here the exit even comes first). The press made the guest go: it counts, and is said.
    qemu = FakeQemu()
    notes = []

    async def powerdown_then_exit_before_the_reply(qemu_, arguments):
        qemu_.monitor.emit("POWERDOWN")
        qemu_.power_off()  # SHUTDOWN, and the process exits...
        await anyio.lowlevel.checkpoint()  # ...seen by the loop before the reply is read
        return {}

    qemu.handlers["system_powerdown"] = powerdown_then_exit_before_the_reply
    with anyio.fail_after(10):
        result = await climb(qemu.monitor, qemu.process, FAST, started=anyio.current_time(),
                             name="fake", on_progress=notes.append)  # fmt: skip
    assert (result.stage, result.graceful, result.presses) == (Stage.POWERDOWN, True, 1)
    assert any(n.message == "pressed the power button" for n in notes)
