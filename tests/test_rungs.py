"""Rungs are values: the plan follows the policy, budgets make the bound, and a new rung plugs in.

A rung is one class with a stage, ``forced``, a budget, ``why_not`` and ``run``;
the ladder's one loop runs any such value. These tests plug a fake rung and a
fake action into the real ladder, against the fake seams.
"""

from __future__ import annotations

import signal

import anyio
import attrs
import pytest

from qmpshutdown import Job, Outcome, ShutdownPolicy, Stage
from qmpshutdown._ladder import run_plan
from qmpshutdown._policy import RUNGS
from qmpshutdown._rungs import AFTER_GRACEFUL, BEFORE_FORCE, RUNG_FOR, plan, plan_budget
from qmpshutdown._rungs.powerdown import PowerButton
from qmpshutdown._steps import Ended
from support.fakes import FakeQemu
from support.policies import FAKE


class Knock:
    """A forced rung of a test's own: it ends the fake QEMU itself, then waits for the exit."""

    stage = Stage.QUIT  # stands in for a new stage of the policy's list
    forced = True

    def __init__(self, fake: FakeQemu) -> None:
        self.fake = fake

    def budget(self, policy: ShutdownPolicy) -> float:
        return 1.0

    def why_not(self, qemu):
        return None

    async def run(self, qemu, step):
        step.note("knocked")
        self.fake.monitor.emit("SHUTDOWN", guest=False, reason="host-qmp-quit")
        self.fake.exit()
        return await qemu.wait_gone_or(1.0, step, "nobody came")


class Vanishing:
    """A graceful rung whose probe meets QEMU's exit: it ends skipped before the watcher fires."""

    stage = Stage.AGENT
    forced = False

    def __init__(self, fake: FakeQemu) -> None:
        self.fake = fake

    def budget(self, policy: ShutdownPolicy) -> float:
        return 1.0

    def why_not(self, qemu):
        return None

    async def run(self, qemu, step):
        self.fake.process.exit()  # the pidfd watcher has not run yet when this returns
        return Ended(Outcome.SKIPPED, "no agent answered (connection refused)")


class Slowpoke:
    """A rung that would run for ever: the ladder holds it to its budget."""

    stage = Stage.TERMINATE
    forced = True

    def budget(self, policy: ShutdownPolicy) -> float:
        return 0.2

    def why_not(self, qemu):
        return None

    async def run(self, qemu, step):
        step.note("waiting")
        await anyio.sleep_forever()


class Marker:
    """An action: runs right before the first forced rung, and finishes at the end."""

    stage = Stage.ALREADY_OFF  # not a rung: stands in for the freeze or the screenshot step

    def __init__(self) -> None:
        self.ran_at: list[str] = []
        self.finished = False

    def budget(self, policy: ShutdownPolicy) -> float:
        return 0.5

    def applies(self, qemu) -> bool:
        return True

    async def run(self, qemu, step):
        self.ran_at.append(qemu.recorder.steps[-1].stage.value)
        return Ended(Outcome.DONE, "marked")

    async def finish(self, qemu) -> None:
        self.finished = True


async def climb_with(fake: FakeQemu, policy=FAKE, **kwargs):
    with anyio.fail_after(10):
        job = Job("fake", policy=policy, name="fake")
        return await run_plan(
            job, fake.monitor, fake.process, started=anyio.current_time(), **kwargs
        )


def test_the_plan_is_the_policys_stages_in_order():
    policy = ShutdownPolicy(stages=("powerdown", "terminate"))
    assert [rung.stage for rung in plan(policy)] == [Stage.POWERDOWN, Stage.TERMINATE]
    assert [rung.stage for rung in plan(ShutdownPolicy())] == list(ShutdownPolicy().stages)
    assert set(RUNG_FOR) == set(RUNGS)
    assert [rung.forced for rung in plan(ShutdownPolicy())] == [False, False, True, True, True]


def test_the_bound_is_connecting_three_commands_and_the_budgets():
    policy = FAKE
    expected = policy.connect_timeout + 3 * policy.command_timeout
    expected += sum(rung.budget(policy) for rung in plan(policy))
    # With a forced rung allowed, the actions before force: the screenshot, the freeze.
    expected += sum(action.budget(policy) for action in BEFORE_FORCE)
    # With a graceful rung, the diagnosis right after it.
    expected += sum(action.budget(policy) for action in AFTER_GRACEFUL)
    assert policy.bound == pytest.approx(expected)
    # the press at the deadline, confirming the power-off; the reboot action set and put back
    button = policy.powerdown_timeout + 4 * 0.2
    assert plan_budget(policy, [PowerButton()]) == button + policy.diagnose_timeout
    quiet = attrs.evolve(policy, diagnose=False)
    assert plan_budget(quiet, [PowerButton()]) == button


@pytest.mark.asyncio
async def test_a_new_rung_plugs_into_the_ladder_as_one_value():
    fake = FakeQemu(guest="ignores")
    marker = Marker()
    result = await climb_with(fake, rungs=[PowerButton(), Knock(fake)], actions=[marker])
    assert [(s.stage.value, s.outcome.value) for s in result.steps] == [
        ("powerdown", "timeout"),
        ("already-off", "done"),  # the action, right before the first forced rung
        ("quit", "done"),
    ]
    assert result.steps[2].detail == "knocked; QEMU exited (SHUTDOWN host-qmp-quit)"
    assert marker.ran_at == ["powerdown"] and marker.finished
    assert (result.stage, result.graceful, result.reason) == (Stage.QUIT, False, "host-qmp-quit")
    assert "quit" not in fake.monitor.commands  # the fake rung, not the library's Quit


@pytest.mark.asyncio
async def test_a_rung_that_ends_otherwise_as_qemu_exits_is_the_one_that_ended_it():
    # chaos seed 4: QEMU killed while the agent probe ran; the record named a skipped step
    fake = FakeQemu(guest="ignores")
    result = await climb_with(fake, rungs=[Vanishing(fake), RUNG_FOR[Stage.KILL]])
    assert [(s.stage.value, s.outcome.value) for s in result.steps] == [("agent", "done")]
    assert result.steps[0].detail == (
        "no agent answered (connection refused); QEMU exited without a SHUTDOWN event"
        " (ended from outside?)"
    )
    assert result.stage is Stage.AGENT
    assert fake.process.signals == []


@pytest.mark.asyncio
async def test_a_rung_that_overruns_its_budget_times_out_and_the_ladder_goes_on():
    fake = FakeQemu(guest="ignores")
    rungs = [Slowpoke(), RUNG_FOR[Stage.KILL]]
    result = await climb_with(fake, rungs=rungs)
    slow = result.steps[0]
    assert (slow.stage, slow.outcome) == (Stage.TERMINATE, Outcome.TIMEOUT)
    assert slow.detail == "waiting; over its budget of 0.2 s"
    assert 0.2 <= slow.ended - slow.started < 0.5
    assert result.stage is Stage.KILL
    assert fake.process.signals == [signal.SIGKILL]


@pytest.mark.asyncio
async def test_actions_do_not_run_when_no_forced_rung_runs():
    marker = Marker()
    result = await climb_with(FakeQemu(), actions=[marker])
    assert [s.stage for s in result.steps] == [Stage.POWERDOWN]
    assert marker.ran_at == [] and marker.finished


def test_a_policy_variant_changes_the_budgets():
    longer = attrs.evolve(FAKE, powerdown_timeout=10.0)
    assert longer.bound - FAKE.bound == pytest.approx(10.0 - 0.25)


@pytest.mark.asyncio
async def test_actions_do_not_run_when_quit_only_ends_a_guest_that_is_off():
    marker = Marker()
    result = await climb_with(FakeQemu(no_shutdown=True), actions=[marker])
    assert [(s.stage.value, s.outcome.value) for s in result.steps] == [
        ("powerdown", "done"),
        ("quit", "done"),
    ]
    assert result.graceful and marker.ran_at == []
