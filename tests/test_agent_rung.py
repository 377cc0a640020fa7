"""The agent rung and the freeze before force, on the real ladder against fakes.

The monitor and process are tests/support/fakes.py's; the agent is an in-process fake
(tests/support/fakeagent.py), honest or lying. Real guests prove the same promises in
test_agent_guests.py.
"""

from __future__ import annotations

import anyio
import attrs
import pytest

from qmpshutdown import Cause, Job, ShutdownFailed, Stage
from qmpshutdown._ladder import run_plan
from qmpshutdown._verdict import decide
from support.fakeagent import FakeAgent
from support.fakes import FakeQemu
from support.policies import FAKE

#: FAKE with the default ladder (the agent rung in it) and short agent times.
POLICY = attrs.evolve(
    FAKE, stages=("powerdown", "agent", "quit", "terminate", "kill"),
    agent_timeout=0.5, freeze_timeout=0.3,
)  # fmt: skip
#: Slack for the event loop on a loaded machine; the bounds themselves are what is promised.
MARGIN = 1.0


def outcomes(result):
    return [(step.stage.value, step.outcome.value) for step in result.steps]


async def ladder(fake, agent_path, policy=POLICY, **kwargs):
    with anyio.fail_after(policy.bound + 5):
        job = Job("fake", policy=policy, name="fake", agent=agent_path)
        return await run_plan(
            job, fake.monitor, fake.process, started=anyio.current_time(), **kwargs
        )


async def with_agent(tmp_path, fake, behaviour="honest", *, policy=POLICY, **kwargs):
    """Run the ladder with a fake agent serving; return the result and the agent."""
    agent = FakeAgent(str(tmp_path / "qga.sock"), behaviour, on_shutdown=fake.power_off, **kwargs)
    async with anyio.create_task_group() as tg:
        await tg.start(agent.serve)
        try:
            result = await ladder(fake, agent.path, policy)
        finally:
            tg.cancel_scope.cancel()
    return result, agent


@pytest.mark.asyncio
async def test_ignored_button_then_the_agent_powers_the_guest_off(tmp_path):
    fake = FakeQemu(guest="ignores")
    quiet = attrs.evolve(POLICY, diagnose=False)  # the agent rung alone (test_diagnose.py)
    result, agent = await with_agent(tmp_path, fake, osinfo={"name": "Debian GNU/Linux"},
                                     policy=quiet)  # fmt: skip
    assert (result.stage, result.graceful, result.reason) == (Stage.AGENT, True, "guest-shutdown")
    assert outcomes(result) == [("powerdown", "timeout"), ("agent", "done")]
    assert (result.guest_os, result.guest_users) == ("Debian GNU/Linux", ())
    assert result.cause is Cause.IGNORED_POWER_BUTTON  # why the button did not do it
    detail = result.step("agent").detail
    assert detail.startswith("the agent answered: os Debian GNU/Linux; users: nobody logged in")
    assert "sent guest-shutdown" in detail and detail.endswith("(SHUTDOWN guest-shutdown)")
    assert agent.commands == [
        "guest-sync-delimited", "guest-get-osinfo", "guest-get-users",
        "guest-fsfreeze-status", "guest-shutdown",
    ]  # fmt: skip


@pytest.mark.asyncio
async def test_windows_with_nobody_logged_in_is_no_logon(tmp_path):
    fake = FakeQemu(guest="ignores")
    osinfo = {"id": "mswindows", "name": "Microsoft Windows", "pretty-name": "Windows 10 Pro"}
    result, _ = await with_agent(tmp_path, fake, osinfo=osinfo)
    assert (result.stage, result.graceful, result.cause) == (Stage.AGENT, True, Cause.NO_LOGON)
    assert (result.guest_os, result.guest_users) == ("Windows 10 Pro", ())


@pytest.mark.asyncio
async def test_windows_with_someone_logged_in_stays_ignored_power_button(tmp_path):
    fake = FakeQemu(guest="ignores")
    result, _ = await with_agent(
        tmp_path, fake, osinfo={"name": "Microsoft Windows"}, users=[{"user": "bob"}]
    )
    assert (result.cause, result.guest_users) == (Cause.IGNORED_POWER_BUTTON, ("bob",))


def test_no_logon_is_a_pure_function_of_the_record():
    steps, events = (), ()
    kw = {"runstate": "running", "presses": 2, "gone": True}
    windows = decide(steps, events, guest_os="Windows Server 2022", guest_users=(), **kw)
    assert windows.cause is Cause.NO_LOGON
    linux = decide(steps, events, guest_os="Debian GNU/Linux 12", guest_users=(), **kw)
    assert linux.cause is Cause.IGNORED_POWER_BUTTON
    unknown = decide(steps, events, guest_os="Windows 11", guest_users=None, **kw)
    assert unknown.cause is Cause.IGNORED_POWER_BUTTON


@pytest.mark.asyncio
async def test_agent_first_sends_no_press(tmp_path):
    fake = FakeQemu(guest="cooperative")
    policy = attrs.evolve(POLICY, stages=("agent", "powerdown", "quit"))
    result, _ = await with_agent(tmp_path, fake, policy=policy)
    assert (result.stage, result.graceful, result.presses) == (Stage.AGENT, True, 0)
    assert outcomes(result) == [("agent", "done")]
    assert result.cause is None
    assert "system_powerdown" not in fake.monitor.commands


@pytest.mark.parametrize("behaviour", ["silent", "garbage", "wrong-id", "closes"])
@pytest.mark.asyncio
async def test_a_lying_agent_is_skipped_within_command_timeout(tmp_path, behaviour):
    fake = FakeQemu(guest="ignores")
    result, _ = await with_agent(tmp_path, fake, behaviour)
    assert outcomes(result) == [
        ("powerdown", "timeout"), ("diagnose", "skipped"), ("agent", "skipped"),
        ("freeze", "skipped"), ("quit", "done"),
    ]  # fmt: skip
    diagnose, agent, freeze = result.step("diagnose"), result.step("agent"), result.step("freeze")
    # The diagnosis is the first to ask: one command_timeout; nobody asks again.
    assert diagnose.ended - diagnose.started < POLICY.command_timeout + MARGIN
    assert diagnose.detail.startswith("no agent answered")
    assert agent.detail.startswith("no agent answered")
    assert agent.ended - agent.started < 0.1
    assert freeze.ended - freeze.started < 0.1
    assert result.diagnosis is None  # not asked
    assert (result.stage, result.guest_os, result.guest_users) == (Stage.QUIT, None, None)
    assert result.cause is Cause.IGNORED_POWER_BUTTON


@pytest.mark.asyncio
async def test_no_agent_socket_at_all_is_skipped_at_once(tmp_path):
    fake = FakeQemu(guest="ignores")
    result = await ladder(fake, str(tmp_path / "nobody.sock"))
    assert outcomes(result) == [
        ("powerdown", "timeout"), ("diagnose", "skipped"), ("agent", "skipped"),
        ("freeze", "skipped"), ("quit", "done"),
    ]  # fmt: skip
    assert "cannot connect" in result.step("agent").detail
    assert "cannot connect" in result.step("diagnose").detail


@pytest.mark.asyncio
async def test_a_guest_left_frozen_is_thawed_then_shut_down(tmp_path):
    fake = FakeQemu(guest="ignores")
    policy = attrs.evolve(POLICY, stages=("agent",))
    result, agent = await with_agent(tmp_path, fake, policy=policy, frozen=True)
    assert outcomes(result) == [("thaw", "done"), ("agent", "done")]
    assert result.step("thaw").detail == "the guest was found frozen; thawed 1 filesystem"
    assert (result.stage, result.graceful) == (Stage.AGENT, True)
    assert not agent.frozen


@pytest.mark.asyncio
async def test_the_freeze_comes_right_before_force_and_quit_follows(tmp_path):
    fake = FakeQemu(guest="ignores")
    policy = attrs.evolve(POLICY, stages=("quit",))
    result, agent = await with_agent(tmp_path, fake, policy=policy)
    assert outcomes(result) == [("freeze", "done"), ("quit", "done")]
    assert result.step("freeze").detail == "froze 1 filesystem"
    assert agent.commands == ["guest-sync-delimited", "guest-fsfreeze-freeze"]
    assert (result.stage, result.graceful) == (Stage.QUIT, False)


@pytest.mark.asyncio
async def test_no_freeze_when_it_is_turned_off(tmp_path):
    fake = FakeQemu(guest="ignores")
    policy = attrs.evolve(POLICY, stages=("quit",), freeze_before_force=False)
    result, agent = await with_agent(tmp_path, fake, policy=policy)
    assert outcomes(result) == [("quit", "done")]
    assert agent.commands == []


@pytest.mark.asyncio
async def test_a_freeze_that_hangs_is_bounded_and_the_ladder_goes_on(tmp_path):
    fake = FakeQemu(guest="ignores")
    policy = attrs.evolve(POLICY, stages=("quit",))
    result, _ = await with_agent(tmp_path, fake, "hangs-freeze", policy=policy)
    assert outcomes(result) == [("freeze", "timeout"), ("quit", "done")]
    freeze = result.step("freeze")
    assert freeze.ended - freeze.started < policy.freeze_timeout + MARGIN
    assert freeze.detail == "no reply to guest-fsfreeze-freeze in 0.3 s"


@pytest.mark.asyncio
async def test_a_ladder_that_fails_after_the_freeze_thaws_the_guest(tmp_path):
    fake = FakeQemu(guest="ignores", quit="ignore")
    policy = attrs.evolve(POLICY, stages=("quit",))
    agent = FakeAgent(str(tmp_path / "qga.sock"))
    async with anyio.create_task_group() as tg:
        await tg.start(agent.serve)
        with pytest.raises(ShutdownFailed) as failed:
            await ladder(fake, agent.path, policy)
        tg.cancel_scope.cancel()
    result = failed.value.result
    assert outcomes(result) == [("freeze", "done"), ("quit", "timeout"), ("thaw", "done")]
    assert result.step("thaw").detail == "the ladder ended with QEMU running; thawed 1 filesystem"
    assert not agent.frozen


@pytest.mark.asyncio
async def test_a_cancelled_caller_after_the_freeze_gets_a_thawed_running_guest(tmp_path):
    fake = FakeQemu(guest="ignores")
    policy = attrs.evolve(POLICY, stages=("quit",))
    agent = FakeAgent(str(tmp_path / "qga.sock"))
    seen = []
    async with anyio.create_task_group() as tg:
        await tg.start(agent.serve)
        with anyio.CancelScope() as caller:

            def on_progress(update):
                seen.append((update.stage, update.kind.value))
                if update.step is not None and update.step.stage is Stage.FREEZE:
                    caller.cancel()

            await run_plan(
                Job("qemu", policy=policy, name="qemu", agent=agent.path), fake.monitor,
                fake.process, started=anyio.current_time(), on_progress=on_progress,
            )  # fmt: skip
        tg.cancel_scope.cancel()
    assert caller.cancelled_caught
    assert "quit" not in fake.monitor.commands
    assert not agent.frozen
    assert agent.commands[-1] == "guest-fsfreeze-thaw"
    assert (Stage.THAW, "end") in seen
