"""The verdict as plain functions: the rung that ended the VM, graceful, cause — from the record."""

from __future__ import annotations

import pytest

from qmpshutdown import Cause, EventRecord, Outcome, Stage, Step
from qmpshutdown._verdict import decide, ended_by, is_graceful, likely_cause, shutdown_reason


def step(stage: str, outcome: str, cause: Cause | None = None) -> Step:
    return Step(Stage(stage), Outcome(outcome), 0.0, 1.0, "", cause)


def shutdown(reason: str, guest: bool) -> EventRecord:
    return EventRecord("SHUTDOWN", 1.0, {"guest": guest, "reason": reason})


def event(name: str, **data: object) -> EventRecord:
    return EventRecord(name, 1.0, data)


GUEST_OFF = [event("POWERDOWN"), shutdown("guest-shutdown", True)]
QUIT = [event("POWERDOWN"), shutdown("host-qmp-quit", False)]


@pytest.mark.parametrize(
    ("steps", "runstate", "gone", "expected"),
    [
        pytest.param([step("powerdown", "done")], "running", True, Stage.POWERDOWN, id="pressed"),
        pytest.param(
            [step("powerdown", "timeout"), step("quit", "done")], "running", True, Stage.QUIT,
            id="quit",
        ),
        # -no-shutdown: the guest's rung stays the answer when quit then ends QEMU.
        pytest.param(
            [step("powerdown", "done"), step("quit", "done")], "running", True, Stage.POWERDOWN,
            id="no-shutdown-then-quit",
        ),
        pytest.param([step("quit", "done")], "shutdown", True, Stage.ALREADY_OFF, id="found-off"),
        pytest.param([], None, True, Stage.ALREADY_OFF, id="gone-while-connecting"),
        pytest.param(
            [step("powerdown", "timeout"), step("quit", "failed")], "running", True, Stage.QUIT,
            id="gone-after-the-last-step",
        ),
        # QEMU killed from outside while the guest was asked why (an action, not a rung):
        # the last rung that ran (seen in a chaos trial of CI).
        pytest.param(
            [step("powerdown", "timeout"), step("diagnose", "skipped")], "running", True,
            Stage.POWERDOWN, id="gone-during-an-action",
        ),
        pytest.param(
            [step("powerdown", "timeout"), step("quit", "timeout")], "running", False, None,
            id="still-running",
        ),
        pytest.param(
            [step("powerdown", "done")], "running", False, Stage.POWERDOWN,
            id="off-left-for-its-owner",
        ),
    ],
)  # fmt: skip
def test_ended_by(steps, runstate, gone, expected) -> None:
    assert ended_by(steps, runstate=runstate, gone=gone) is expected


@pytest.mark.parametrize(
    ("stage", "events", "runstate", "expected"),
    [
        (Stage.POWERDOWN, GUEST_OFF, "running", True),
        (Stage.POWERDOWN, [shutdown("guest-reset", True)], "running", True),  # -no-reboot
        (Stage.QUIT, QUIT, "running", False),
        (Stage.POWERDOWN, [shutdown("guest-panic", True)], "running", False),
        (Stage.POWERDOWN, [], "running", False),  # ended from outside, no SHUTDOWN
        (Stage.ALREADY_OFF, [], "shutdown", True),
        (None, GUEST_OFF, "running", False),
    ],
)
def test_is_graceful(stage, events, runstate, expected) -> None:
    assert is_graceful(stage, events, runstate=runstate) is expected


@pytest.mark.parametrize(
    ("steps", "events", "runstate", "presses", "expected"),
    [
        pytest.param(
            [step("powerdown", "timeout")], [event("POWERDOWN")], "running", 3,
            Cause.IGNORED_POWER_BUTTON, id="ignored",
        ),
        pytest.param(
            [
                step("powerdown", "skipped", Cause.PAUSED),
                step("quit", "failed", Cause.MONITOR_UNRESPONSIVE),
            ],
            [], "paused", 0, Cause.PAUSED, id="the-first-named-cause-wins",
        ),
        pytest.param(
            [step("powerdown", "skipped"), step("terminate", "done")], [], None, 0,
            Cause.MONITOR_UNRESPONSIVE, id="never-answered",
        ),
        pytest.param([], [], None, 0, None, id="gone-before-any-step"),
        pytest.param(
            [step("powerdown", "timeout")], [event("GUEST_PANICKED", action="pause")],
            "running", 1, Cause.PANICKED, id="panicked",
        ),
        pytest.param(
            [
                step("powerdown", "failed", Cause.MONITOR_UNRESPONSIVE),
                step("quit", "failed"), step("terminate", "done"),
            ],
            [event("GUEST_PANICKED", action="poweroff"), shutdown("guest-panic", True)],
            "running", 1, Cause.PANICKED, id="a-panic-beats-the-monitor-hung-after-it",
        ),
        pytest.param(
            [step("powerdown", "timeout")], [event("SUSPEND")], "running", 2, Cause.ASLEEP,
            id="fell-asleep",
        ),
        pytest.param(
            [step("powerdown", "timeout")], [event("RESET", guest=True)], "running", 3,
            Cause.REBOOTED, id="rebooted",
        ),
        pytest.param(
            [step("powerdown", "timeout")], [event("RESET", guest=False)], "running", 3,
            Cause.IGNORED_POWER_BUTTON, id="a-host-reset-is-no-reboot",
        ),
        pytest.param([step("quit", "done")], QUIT, "running", 0, None, id="quit-only"),
    ],
)  # fmt: skip
def test_likely_cause(steps, events, runstate, presses, expected) -> None:
    assert likely_cause(steps, events, runstate=runstate, presses=presses) is expected


def test_a_graceful_stop_has_no_cause() -> None:
    verdict = decide(
        [step("powerdown", "done", Cause.ASLEEP)], GUEST_OFF, runstate="suspended", presses=1,
        gone=True,
    )  # fmt: skip
    assert (verdict.stage, verdict.graceful, verdict.cause) == (Stage.POWERDOWN, True, None)


def test_a_forced_stop_says_why() -> None:
    verdict = decide(
        [step("powerdown", "timeout"), step("quit", "done")], QUIT, runstate="running", presses=3,
        gone=True,
    )  # fmt: skip
    assert (verdict.stage, verdict.graceful, verdict.cause) == (
        Stage.QUIT,
        False,
        Cause.IGNORED_POWER_BUTTON,
    )


def test_the_reason_is_the_first_shutdowns() -> None:
    events = [shutdown("guest-shutdown", True), shutdown("host-qmp-quit", False)]
    assert shutdown_reason(events) == "guest-shutdown"
    assert shutdown_reason([event("POWERDOWN")]) is None
