"""The diagnose step and patience that listens, on the real ladder against fakes.

The monitor and process are tests/support/fakes.py's; the agent is the in-process fake
(tests/support/fakeagent.py) answering ``guest-exec`` with what systemd's tools or Windows'
print (tests/support/windows.py). The real systemd guest proves the Linux findings in
tests/guests/test_diagnose_guests.py.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import anyio
import attrs
import pytest

from qmpshutdown import Cause, Finding, Job, ShutdownFailed, Stage
from qmpshutdown._ladder import run_plan
from qmpshutdown._questions import linux
from support.fakeagent import FakeAgent
from support.fakes import FakeQemu
from support.policies import FAKE
from support.windows import windows_osinfo, windows_outputs

pytestmark = pytest.mark.asyncio

#: FAKE with the agent rung and short agent times.
POLICY = attrs.evolve(
    FAKE, stages=("powerdown", "agent", "quit", "terminate", "kill"),
    agent_timeout=0.5, freeze_timeout=0.3, command_timeout=0.3, diagnose_timeout=2.0,
)  # fmt: skip
#: Slack for the event loop on a loaded machine; the bounds themselves are what is promised.
MARGIN = 1.0
DEBIAN = {"id": "debian", "name": "Debian GNU/Linux", "pretty-name": "Debian GNU/Linux 12"}


def busctl(signature: str, data: object) -> tuple[int, str, str]:
    return 0, json.dumps({"type": signature, "data": data}, separators=(",", ":")) + "\n", ""


def inhibitors(*rows: Sequence[object]) -> tuple[int, str, str]:
    return busctl("a(ssssuu)", [list(rows)])


BACKUP = ("shutdown:handle-power-key", "nightly-backup", "writing the archive", "block", 0, 412)


def linux_outputs(
    *, held: Sequence[Sequence[object]] = (), key: str = "poweroff", jobs: Sequence[object] = ()
) -> dict[tuple[str, ...], tuple[int, str, str]]:
    conf = "# /etc/systemd/logind.conf\n[Login]\n"
    if key != "poweroff":
        conf += f"\n# /etc/systemd/logind.conf.d/qsd.conf\n[Login]\nHandlePowerKey={key}\n"
    return {
        linux.INHIBITORS_ARGV: inhibitors(*held),
        linux.POWER_KEY_ARGV: busctl("s", key),
        linux.LOGIND_CONF_ARGV: (0, conf, ""),
        linux.JOBS_ARGV: busctl("a(usssoo)", [list(jobs)]),
    }


def outcomes(result):
    return [(step.stage.value, step.outcome.value) for step in result.steps]


async def stop(tmp_path, fake, policy=POLICY, *, during=None, **agent_options):
    """Run the ladder with a fake agent serving; return the result (or the ShutdownFailed),
    the agent and the progress messages. *during(agent)* runs beside the ladder.
    """
    agent = FakeAgent(str(tmp_path / "qga.sock"), on_shutdown=fake.power_off, **agent_options)
    said: list[str] = []
    async with anyio.create_task_group() as tg:
        await tg.start(agent.serve)
        if during is not None:
            tg.start_soon(during, agent)
        try:
            with anyio.fail_after(policy.bound + 5):
                job = Job("fake", policy=policy, name="fake", agent=agent.path)
                result = await run_plan(job, fake.monitor, fake.process,
                                        started=anyio.current_time(),
                                        on_progress=lambda p: said.append(p.message))  # fmt: skip
        except ShutdownFailed as err:
            result = err
        finally:
            tg.cancel_scope.cancel()
    return result, agent, said


async def test_a_held_inhibitor_is_asked_before_the_agent_and_names_the_cause(tmp_path):
    fake = FakeQemu(guest="ignores")
    outputs = linux_outputs(held=[BACKUP])
    result, agent, _ = await stop(tmp_path, fake, osinfo=DEBIAN, exec_outputs=outputs)
    assert outcomes(result) == [("powerdown", "timeout"), ("diagnose", "done"), ("agent", "done")]
    assert result.diagnosis == (
        Finding("inhibitor",
                'nightly-backup (pid 412, uid 0) blocks shutdown:handle-power-key: '
                '"writing the archive"',
                " ".join(linux.INHIBITORS_ARGV)),
    )  # fmt: skip
    # The guest went when its agent asked, and what it said is why the button did not do it.
    assert (result.stage, result.graceful, result.cause) == (Stage.AGENT, True, Cause.INHIBITED)
    assert agent.execs == list(linux.QUESTIONS_ARGV)
    # Every question before the agent's shutdown, each asked once.
    shutdown_at = agent.commands.index("guest-shutdown")
    assert agent.commands.count("guest-exec") == len(linux.QUESTIONS_ARGV)
    assert max(i for i, c in enumerate(agent.commands) if c == "guest-exec") < shutdown_at
    assert result.to_dict()["diagnosis"] == [f.to_dict() for f in result.diagnosis]
    assert "inhibitor: nightly-backup" in result.step("diagnose").detail


async def test_every_question_comes_before_the_freeze_and_force(tmp_path):
    fake = FakeQemu(guest="ignores")
    policy = attrs.evolve(POLICY, stages=("powerdown", "quit"))
    outputs = linux_outputs(key="ignore")
    result, agent, _ = await stop(tmp_path, fake, policy, osinfo=DEBIAN, exec_outputs=outputs)
    assert outcomes(result) == [
        ("powerdown", "timeout"), ("diagnose", "done"), ("freeze", "done"), ("quit", "done"),
    ]  # fmt: skip
    freeze_at = agent.commands.index("guest-fsfreeze-freeze")
    assert max(i for i, c in enumerate(agent.commands) if c.startswith("guest-exec")) < freeze_at
    (finding,) = result.diagnosis
    assert finding.kind == "power-key"
    assert "HandlePowerKey=ignore" in finding.detail and "qsd.conf" in finding.detail
    assert (result.stage, result.cause) == (Stage.QUIT, Cause.IGNORED_POWER_BUTTON)


async def test_a_stop_job_is_busy(tmp_path):
    fake = FakeQemu(guest="ignores")
    policy = attrs.evolve(POLICY, stages=("powerdown", "quit"), freeze_before_force=False)
    jobs = [
        [301, "poweroff.target", "start", "waiting", "/org/freedesktop/systemd1/job/301",
         "/org/freedesktop/systemd1/unit/poweroff_2etarget"],
        [344, "slow-archive.service", "stop", "running", "/org/freedesktop/systemd1/job/344",
         "/org/freedesktop/systemd1/unit/slow_2darchive_2eservice"],
    ]  # fmt: skip
    outputs = linux_outputs(jobs=jobs)
    result, _, _ = await stop(tmp_path, fake, policy, osinfo=DEBIAN, exec_outputs=outputs)
    (finding,) = result.diagnosis
    assert finding.kind == "stop-job" and "slow-archive.service" in finding.detail
    assert result.cause is Cause.BUSY


async def test_nothing_found_is_an_empty_diagnosis_and_the_inferred_cause(tmp_path):
    fake = FakeQemu(guest="ignores")
    policy = attrs.evolve(POLICY, stages=("powerdown", "quit"), freeze_before_force=False)
    result, _, _ = await stop(tmp_path, fake, policy, osinfo=DEBIAN, exec_outputs=linux_outputs())
    assert result.diagnosis == ()
    assert result.step("diagnose").outcome.value == "done"
    assert result.cause is Cause.IGNORED_POWER_BUTTON  # inferred, as before


@pytest.mark.parametrize(
    ("state", "kind", "cause"),
    [
        ("updating", "updating", Cause.BUSY),
        ("logon-required", "logon-required", Cause.NO_LOGON),
        ("power-key-nothing", "power-key", Cause.IGNORED_POWER_BUTTON),
        ("shutdown-reason-prompt", "shutdown-reason-prompt", Cause.STALLED),
        # no cause of its own: inferred (Windows with nobody logged on)
        ("pending-reboot", "pending-reboot", Cause.NO_LOGON),
    ],
)
async def test_a_windows_finding_and_its_cause(tmp_path, state, kind, cause):
    fake = FakeQemu(guest="ignores")
    policy = attrs.evolve(POLICY, stages=("powerdown", "quit"), freeze_before_force=False)
    result, agent, _ = await stop(tmp_path, fake, policy, osinfo=windows_osinfo(),
                                  exec_outputs=windows_outputs(state))  # fmt: skip
    assert kind in {f.kind for f in result.diagnosis}
    assert result.cause is cause
    assert all(argv[0].endswith(".exe") for argv in agent.execs)  # no PowerShell, no shell


async def test_guest_exec_disabled_is_skipped_and_named(tmp_path):
    fake = FakeQemu(guest="ignores")
    policy = attrs.evolve(POLICY, stages=("powerdown", "quit"), freeze_before_force=False)
    result, agent, _ = await stop(tmp_path, fake, policy, osinfo=DEBIAN, exec_enabled=False)
    step = result.step("diagnose")
    assert step.outcome.value == "skipped" and "guest-exec is disabled" in step.detail
    assert step.ended - step.started < POLICY.command_timeout * 2 + MARGIN
    assert agent.execs == [] and result.diagnosis is None


async def test_an_agent_that_goes_silent_is_a_finding_and_costs_one_command_timeout(tmp_path):
    fake = FakeQemu(guest="ignores")
    # sync, guest-info, osinfo, users, then the first question's guest-exec and its status:
    # silent from the second question on.
    result, _, _ = await stop(tmp_path, fake, osinfo=DEBIAN, silent_after=6,
                                  exec_outputs=linux_outputs(held=[BACKUP]))  # fmt: skip
    step = result.step("diagnose")
    assert step.outcome.value == "failed"
    assert [f.kind for f in result.diagnosis] == ["inhibitor", "agent-silent"]
    assert "stopped answering" in result.diagnosis[-1].detail
    assert step.ended - step.started < POLICY.command_timeout + MARGIN
    # Nobody waits on it again: the agent rung and the freeze skip at once.
    assert result.step("agent").outcome.value == "skipped"
    assert result.step("agent").ended - result.step("agent").started < 0.1
    assert result.cause is Cause.INHIBITED


async def test_a_program_missing_in_the_guest_fails_its_question_only(tmp_path):
    fake = FakeQemu(guest="ignores")
    policy = attrs.evolve(POLICY, stages=("powerdown", "quit"), freeze_before_force=False)
    outputs = linux_outputs(held=[BACKUP])
    del outputs[linux.LOGIND_CONF_ARGV]  # no systemd-analyze in this guest
    result, _, _ = await stop(tmp_path, fake, policy, osinfo=DEBIAN, exec_outputs=outputs)
    step = result.step("diagnose")
    assert step.outcome.value == "done" and "could not read 1" in step.detail
    assert "systemd-analyze" in step.detail
    assert [f.kind for f in result.diagnosis] == ["inhibitor"]


async def test_garbage_output_is_never_a_finding(tmp_path):
    fake = FakeQemu(guest="ignores")
    policy = attrs.evolve(POLICY, stages=("powerdown", "quit"), freeze_before_force=False)
    garbage = (0, "\x1b[31m$(reboot)\x00 not json {", "")
    outputs = dict.fromkeys(linux.QUESTIONS_ARGV, garbage)
    result, _, _ = await stop(tmp_path, fake, policy, osinfo=DEBIAN, exec_outputs=outputs)
    step = result.step("diagnose")
    assert step.outcome.value == "failed" and result.diagnosis == ()
    assert "\x1b" not in step.detail and "\x00" not in step.detail


async def test_a_guest_that_goes_at_the_press_is_never_asked(tmp_path):
    fake = FakeQemu(guest="cooperative")
    result, agent, _ = await stop(tmp_path, fake, osinfo=DEBIAN, exec_outputs=linux_outputs())
    assert outcomes(result) == [("powerdown", "done")]
    assert result.diagnosis is None and agent.commands == []


async def test_a_guest_found_panicked_is_never_asked(tmp_path):
    # The power button is skipped (nobody is there to press for): the guest was never asked
    # to go, and a panicked guest's agent cannot answer. Asking would waste a command_timeout,
    # and a QEMU killed from outside meanwhile would leave a record ended by no rung.
    fake = FakeQemu(guest="ignores", runstate="guest-panicked")
    result, agent, _ = await stop(tmp_path, fake, osinfo=DEBIAN, exec_outputs=linux_outputs())
    assert "diagnose" not in [s.stage.value for s in result.steps]
    assert result.step("powerdown").outcome.value == "skipped"
    assert result.diagnosis is None and agent.execs == []


async def test_diagnose_off_asks_nothing(tmp_path):
    fake = FakeQemu(guest="ignores")
    policy = attrs.evolve(POLICY, diagnose=False)
    result, agent, _ = await stop(tmp_path, fake, policy, osinfo=DEBIAN,
                                  exec_outputs=linux_outputs(held=[BACKUP]))  # fmt: skip
    assert "diagnose" not in [s.stage.value for s in result.steps]
    assert result.diagnosis is None and agent.execs == []


async def test_the_diagnosis_is_in_a_failed_ladders_record(tmp_path):
    fake = FakeQemu(guest="ignores")
    policy = attrs.evolve(POLICY, stages=("powerdown",))
    failed, _, _ = await stop(tmp_path, fake, policy, osinfo=DEBIAN,
                              exec_outputs=linux_outputs(held=[BACKUP]))  # fmt: skip
    assert isinstance(failed, ShutdownFailed)
    assert [f.kind for f in failed.result.diagnosis] == ["inhibitor"]
    assert "likely cause: inhibited" in str(failed)


# ---- patience that listens -----------------------------------------------------------

#: Adaptive, one press (no re-press), a short wait and a cap well above it.
LISTENING = attrs.evolve(
    POLICY, stages=("powerdown", "quit"), patience="adaptive", powerdown_timeout=0.3,
    max_powerdown_timeout=3.0, idle_cutoff=0.3, repress_interval=None, sample_interval=0.05,
    freeze_before_force=False,
)  # fmt: skip


async def test_a_held_inhibitor_is_waited_for_and_its_release_pressed_at_once(tmp_path):
    fake = FakeQemu(guest="ignores")

    async def let_go(agent):
        await anyio.sleep(1.0)
        agent.exec_outputs[linux.INHIBITORS_ARGV] = inhibitors()
        fake.guest = "cooperative"  # logind takes the key again

    result, agent, said = await stop(tmp_path, fake, LISTENING, during=let_go, osinfo=DEBIAN,
                                     exec_outputs=linux_outputs(held=[BACKUP]))  # fmt: skip
    assert (result.stage, result.graceful, result.presses) == (Stage.POWERDOWN, True, 2)
    assert 1.0 <= result.elapsed < 1.0 + 2 * LISTENING.sample_interval + MARGIN
    assert any(m.startswith("the guest asks for time: nightly-backup") for m in said)
    assert "the guest let go of its inhibitor: pressing again at once" in said
    assert agent.execs and set(agent.execs) == {linux.INHIBITORS_ARGV}  # only that question
    assert result.diagnosis is None  # it went: never diagnosed


async def test_the_press_after_a_release_gets_idle_cutoff_to_be_answered(tmp_path):
    # Seen (QEMU 10.0, 3 test workers): a guest that went 0.8 s after the press that followed
    # its release was escalated 0.1 s after that press: the wait's deadline had passed while
    # the inhibitor was held.
    fake = FakeQemu(guest="ignores")
    policy = attrs.evolve(LISTENING, idle_cutoff=1.0, max_powerdown_timeout=6.0)
    answer_after = policy.idle_cutoff / 2

    async def let_go_then_go_slowly(agent):
        await anyio.sleep(1.0)
        agent.exec_outputs[linux.INHIBITORS_ARGV] = inhibitors()
        while fake.presses < 2:
            await anyio.sleep(0.01)
        await anyio.sleep(answer_after)  # longer than an agent round trip, within idle_cutoff
        fake.power_off()

    outputs = linux_outputs(held=[BACKUP])
    result, _, said = await stop(tmp_path, fake, policy, during=let_go_then_go_slowly,
                                 osinfo=DEBIAN, exec_outputs=outputs)  # fmt: skip
    assert not isinstance(result, ShutdownFailed), result
    assert (result.stage, result.graceful, result.presses) == (Stage.POWERDOWN, True, 2), said
    assert [step.stage.value for step in result.steps] == ["powerdown"]
    assert "the guest let go of its inhibitor: pressing again at once" in said


async def test_a_guest_that_powers_off_while_it_is_asked_why_ends_unforced(tmp_path):
    # Seen (3 test workers): the guest went during the diagnosis; QEMU closed its monitor and
    # exited a moment after the ladder reached quit, which was skipped ("the monitor is
    # closed"): the record said ShutdownFailed, and QEMU was gone a moment later.
    fake = FakeQemu(guest="ignores")
    policy = attrs.evolve(POLICY, stages=("powerdown", "quit"), freeze_before_force=False)

    asked = anyio.Event()

    class GoesWhileAsked(dict):
        def __getitem__(self, argv):  # the first question's answer is the guest's last
            if not asked.is_set():
                asked.set()
                fake.monitor.emit("SHUTDOWN", guest=True, reason="guest-shutdown")
                fake.monitor.closed.set()  # how QEMU's exit begins; the process goes later
            return super().__getitem__(argv)

    async def go_while_asked(agent):
        agent.exec_outputs = GoesWhileAsked(agent.exec_outputs)
        await asked.wait()
        await anyio.sleep(policy.quit_timeout / 2)
        fake.process.exit()

    outputs = linux_outputs(held=[BACKUP])
    result, _, _ = await stop(tmp_path, fake, policy, during=go_while_asked, osinfo=DEBIAN,
                              exec_outputs=outputs)  # fmt: skip
    assert not isinstance(result, ShutdownFailed), result
    assert (result.stage, result.graceful, result.reason) == (Stage.QUIT, True, "guest-shutdown")
    quit_ = result.step("quit")
    assert quit_.outcome.value == "done" and "QEMU closed its monitor" in quit_.detail
    assert fake.monitor.commands.count("quit") == 0  # never sent: the monitor was closed


async def test_an_inhibitor_held_to_the_cap_is_then_diagnosed(tmp_path):
    fake = FakeQemu(guest="ignores")
    policy = attrs.evolve(LISTENING, max_powerdown_timeout=1.0)
    result, _, _ = await stop(tmp_path, fake, policy, osinfo=DEBIAN,
                              exec_outputs=linux_outputs(held=[BACKUP]))  # fmt: skip
    button = result.step("powerdown")
    assert button.outcome.value == "timeout" and "(the cap)" in button.detail
    assert 1.0 <= button.ended - button.started < 1.0 + policy.command_timeout + MARGIN
    assert (result.stage, result.cause) == (Stage.QUIT, Cause.INHIBITED)


async def test_no_inhibitor_ends_the_wait_as_before(tmp_path):
    fake = FakeQemu(guest="ignores")
    result, agent, _ = await stop(tmp_path, fake, LISTENING, osinfo=DEBIAN,
                                  exec_outputs=linux_outputs())  # fmt: skip
    button = result.step("powerdown")
    assert button.ended - button.started < LISTENING.idle_cutoff + 0.3 + MARGIN
    # asked once at the end of the wait, then the diagnosis asked everything once
    assert agent.execs.count(linux.INHIBITORS_ARGV) == 2
