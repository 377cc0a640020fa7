"""The rungs: each a value with one interface, run in order by the ladder's one loop.

A rung has a stage, whether it is force (``forced``), a time budget under a
policy, a reason it cannot run at all (``why_not``: recorded as a skipped
step) and an async ``run`` that returns how it ended — ``done`` when QEMU
(or the guest) ended during it, ``timeout``, ``skipped`` or ``failed``.
Actions (``Action``) are steps that are not rungs: they run right before the
first forced rung, and once more when the ladder ends.

Adding a rung is one class here, one entry in :data:`RUNG_FOR`, and its stage
in the policy's list (:data:`qmpshutdown._policy.RUNGS`).
"""

from __future__ import annotations

import math
import signal
from collections.abc import Sequence
from typing import Protocol

import anyio

from ._agent_rung import AGENT_SHUTDOWN
from ._errors import CommandError, MonitorClosedError
from ._evidence import Screenshot
from ._freeze import FREEZE_BEFORE_FORCE
from ._patience import wait_budget
from ._policy import ShutdownPolicy, Stage
from ._qemu import Guest, Qemu
from ._result import Cause, Outcome
from ._save import Save
from ._steps import Ended, OpenStep

# Runstates in which a press is pointless or harmful (see QEMU-FACTS).
PAUSED_STATES = frozenset({"paused", "prelaunch", "debug", "io-error", "watchdog"})
PANICKED_STATES = frozenset({"guest-panicked", "internal-error"})
MIGRATING_STATES = frozenset(
    {"inmigrate", "postmigrate", "finish-migrate", "colo", "save-vm", "restore-vm"}
)


class Rung(Protocol):
    """One rung of the ladder."""

    stage: Stage
    forced: bool  #: True for a rung that ends QEMU rather than asking the guest

    def budget(self, policy: ShutdownPolicy) -> float:
        """The longest :meth:`run` may take under *policy*, in seconds."""
        ...

    def why_not(self, qemu: Qemu) -> Ended | None:
        """Why the rung cannot run at all (a skipped step), or None."""
        ...

    async def run(self, qemu: Qemu, step: OpenStep) -> Ended:
        """Carry the rung out; return how it ended."""
        ...


class Action(Protocol):
    """A step that is not a rung: before the first forced rung, and at the ladder's end."""

    stage: Stage

    def budget(self, policy: ShutdownPolicy) -> float:
        """The longest :meth:`run` may take under *policy*, in seconds."""
        ...

    def applies(self, qemu: Qemu) -> bool:
        """Whether to run (and record) it before the first forced rung."""
        ...

    async def run(self, qemu: Qemu, step: OpenStep) -> Ended:
        """Carry the action out; return how it ended."""
        ...

    async def finish(self, qemu: Qemu) -> None:
        """Undo or complete what it did, once the ladder ended (shielded, bounded)."""
        ...


def _no_monitor(qemu: Qemu, *, or_closed: bool = False) -> Ended | None:
    if qemu.monitor is None:
        return Ended(Outcome.SKIPPED, qemu.no_monitor_why, Cause.MONITOR_UNRESPONSIVE)
    if or_closed and qemu.monitor.is_closed():
        return Ended(Outcome.SKIPPED, "the monitor is closed")
    return None


class PowerButton:
    """Press the ACPI power button (again every ``repress_interval``) until the guest goes."""

    stage = Stage.POWERDOWN
    forced = False

    def budget(self, policy: ShutdownPolicy) -> float:
        # A press sent at the deadline, then confirming the guest's power-off.
        return wait_budget(policy, policy.powerdown_timeout) + 2 * policy.command_timeout

    def why_not(self, qemu: Qemu) -> Ended | None:
        return _no_monitor(qemu)

    async def run(self, qemu: Qemu, step: OpenStep) -> Ended:
        policy, runstate = qemu.policy, qemu.runstate
        cause: Cause | None = None
        if runstate is None:
            return Ended(Outcome.FAILED, "no answer to query-status", Cause.MONITOR_UNRESPONSIVE)
        if runstate == "suspended":
            cause = Cause.ASLEEP
            if not policy.wake_suspended:
                why = "guest is suspended (S3) and wake_suspended is off"
                return Ended(Outcome.SKIPPED, why, cause)
            if not await wake(qemu):
                return Ended(Outcome.FAILED, "guest is suspended (S3) and did not wake", cause)
        elif runstate in PAUSED_STATES:
            cause = Cause.PAUSED
            if not policy.resume_paused:
                # A press latched in a paused guest would power it off by surprise later.
                why = f"guest is {runstate} and resume_paused is off"
                return Ended(Outcome.SKIPPED, why, cause)
            if await qemu.try_command("cont") is not None:
                return Ended(Outcome.FAILED, f"guest is {runstate} and 'cont' failed", cause)
            qemu.recorder.say("resumed the guest (cont)")
        elif runstate in PANICKED_STATES:
            why = f"guest is {runstate}: nobody is there to press for"
            return Ended(Outcome.SKIPPED, why, Cause.PANICKED)
        elif runstate in MIGRATING_STATES:
            return Ended(Outcome.SKIPPED, f"guest is in runstate {runstate}", Cause.MIGRATING)
        elif runstate != "running":
            return Ended(Outcome.SKIPPED, f"unexpected runstate {runstate!r}")
        async with qemu.sampling():
            return await self.press_until_off(qemu, step, cause)

    async def press_until_off(self, qemu: Qemu, step: OpenStep, cause: Cause | None) -> Ended:
        policy = qemu.policy
        wait = qemu.patience.wait(qemu, policy.powerdown_timeout)
        while True:
            if qemu.watch.suspended and policy.wake_suspended:
                cause = Cause.ASLEEP  # it went to sleep while we waited
                await wake(qemu)
            failure = await qemu.try_command("system_powerdown")
            if isinstance(failure, MonitorClosedError):
                # QEMU closing its monitor is how an exit begins (a panic's poweroff, a guest
                # that just powered off): its process ends a moment later.
                ended = await qemu.wait_gone_or(
                    policy.command_timeout, step, _pressed(qemu, "system_powerdown failed")
                )
                if ended.outcome is Outcome.DONE:
                    return ended
                return Ended(Outcome.FAILED, ended.detail, cause)
            if failure is not None:
                if isinstance(failure, TimeoutError):
                    cause = Cause.MONITOR_UNRESPONSIVE
                return Ended(Outcome.FAILED, _pressed(qemu, "system_powerdown failed"), cause)
            qemu.presses += 1
            again = f" again (press {qemu.presses})" if qemu.presses > 1 else ""
            qemu.recorder.say(f"pressed the power button{again}", stage=self.stage)
            step.note(_pressed(qemu), say=False)
            wait.pressed()
            interval = policy.repress_interval
            next_press = anyio.current_time() + (math.inf if interval is None else interval)
            seen = await wait.for_guest(next_press)
            if seen is not Guest.WAITING:
                return qemu.guest_ended(seen, step, cause)
            if wait.over is not None:
                return Ended(Outcome.TIMEOUT, _pressed(qemu, wait.why_over()), cause)


async def wake(qemu: Qemu) -> bool:
    """Wake an S3-suspended guest (``system_wakeup``); tell whether it runs again."""
    if await qemu.try_command("system_wakeup") is not None:
        return False
    qemu.recorder.say("woke the guest (system_wakeup)")
    deadline = anyio.current_time() + qemu.policy.command_timeout
    if await qemu.watch.wait_until(lambda: not qemu.watch.suspended, deadline):
        return True
    return await qemu.read_runstate() == "running"


def _pressed(qemu: Qemu, what: str = "") -> str:
    if not qemu.presses:
        return what
    times = "once" if qemu.presses == 1 else f"{qemu.presses} times"
    return f"pressed {times}; {what}" if what else f"pressed {times}"


class Quit:
    """Send ``quit``: QEMU's clean exit (caches flushed, images closed), without the guest."""

    stage = Stage.QUIT
    forced = True

    def budget(self, policy: ShutdownPolicy) -> float:
        return policy.command_timeout + policy.quit_timeout

    def why_not(self, qemu: Qemu) -> Ended | None:
        return _no_monitor(qemu, or_closed=True)

    async def run(self, qemu: Qemu, step: OpenStep) -> Ended:
        timeout = qemu.policy.quit_timeout
        try:
            await qemu.command("quit")
        except MonitorClosedError:
            pass  # QEMU may close the socket before it answers quit
        except TimeoutError:
            no_reply = f"no reply to quit in {qemu.policy.command_timeout:g} s"
            return Ended(Outcome.FAILED, no_reply, Cause.MONITOR_UNRESPONSIVE)
        except CommandError as err:
            return Ended(Outcome.FAILED, f"quit refused: {err}")
        step.note("sent quit")
        return await qemu.wait_gone_or(
            timeout, step, f"QEMU still running {timeout:g} s after quit"
        )


class Signal:
    """Send a signal through the pidfd, then wait for QEMU's exit.

    :param stage: the rung (terminate or kill).
    :param signum: the signal.
    :param grace: the policy field that says how long to wait for the exit.
    :param label: put before the step's detail (who sent it, when not the ladder itself).
    """

    forced = True

    def __init__(self, stage: Stage, signum: signal.Signals, grace: str, label: str = "") -> None:
        self.stage = stage
        self.signum = signum
        self.grace = grace
        self.label = label

    def budget(self, policy: ShutdownPolicy) -> float:
        seconds: float = getattr(policy, self.grace)
        return seconds

    def why_not(self, qemu: Qemu) -> Ended | None:
        if qemu.process is None:
            return Ended(Outcome.SKIPPED, qemu.no_signal_why)
        return None

    async def run(self, qemu: Qemu, step: OpenStep) -> Ended:
        assert qemu.process is not None
        qemu.process.send_signal(self.signum)
        detail = f"{self.label}sent {self.signum.name}"
        if self.signum == signal.SIGTERM and qemu.process.is_stopped():
            # A stopped process queues SIGTERM until it runs again; let it take its clean exit.
            qemu.process.send_signal(signal.SIGCONT)
            detail += " and SIGCONT (QEMU was stopped)"
        step.note(detail)
        grace = self.budget(qemu.policy)
        return await qemu.wait_gone_or(
            grace, step, f"QEMU still running {grace:g} s after {self.signum.name}"
        )


#: The rung for each stage a policy may list.
RUNG_FOR: dict[Stage, Rung] = {
    Stage.POWERDOWN: PowerButton(),
    Stage.SAVE: Save(),
    Stage.AGENT: AGENT_SHUTDOWN,
    Stage.QUIT: Quit(),
    Stage.TERMINATE: Signal(Stage.TERMINATE, signal.SIGTERM, "terminate_timeout"),
    Stage.KILL: Signal(Stage.KILL, signal.SIGKILL, "kill_timeout"),
}

#: Actions run before the first forced rung, in order: the screenshot first, so that it
#: shows the guest as it was (before anything is frozen); the freeze last.
BEFORE_FORCE: tuple[Action, ...] = (Screenshot(), FREEZE_BEFORE_FORCE)

#: ``launch()``'s last resort when its policy allows no SIGKILL: a recorded step like any other.
LAST_RESORT_KILL = Signal(Stage.KILL, signal.SIGKILL, "kill_timeout", "launch() teardown: ")


def plan(policy: ShutdownPolicy) -> list[Rung]:
    """The rungs *policy* allows, in the order it lists them."""
    return [RUNG_FOR[stage] for stage in policy.stages]


def plan_budget(policy: ShutdownPolicy, rungs: Sequence[Rung] | None = None) -> float:
    """The sum of the budgets of *rungs* (default: the policy's plan) and the actions."""
    rungs = plan(policy) if rungs is None else rungs
    total = sum(rung.budget(policy) for rung in rungs)
    if any(rung.forced for rung in rungs):
        total += sum(action.budget(policy) for action in BEFORE_FORCE)
    return total
