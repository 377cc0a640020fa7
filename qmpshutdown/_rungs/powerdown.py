"""The power button rung: press (again every ``repress_interval``) until the guest goes."""

from __future__ import annotations

import math

import anyio

from .._errors import MonitorClosedError
from .._policy import Patience, Stage
from .._qemu import Guest, Qemu
from .._result import Cause, Outcome
from .._steps import Ended, OpenStep
from .._waits import GuestWait
from .base import PANICKED_STATES, Budgeted, no_monitor
from .listen import InhibitorListener
from .reboot import REBOOT_AS_SHUTDOWN

# Runstates in which a press is pointless or harmful (see QEMU-FACTS).
PAUSED_STATES = frozenset({"paused", "prelaunch", "debug", "io-error", "watchdog"})
MIGRATING_STATES = frozenset(
    {"inmigrate", "postmigrate", "finish-migrate", "colo", "save-vm", "restore-vm"}
)


class PowerButton(Budgeted):
    """Press the ACPI power button (again every ``repress_interval``) until the guest goes."""

    stage = Stage.POWERDOWN
    forced = False

    def why_not(self, qemu: Qemu) -> Ended | None:
        return no_monitor(qemu)

    async def run(self, qemu: Qemu, step: OpenStep) -> Ended:
        policy = qemu.policy
        if qemu.runstate is None and qemu.may_answer_late():
            # QEMU runs but did not answer in command_timeout: a loaded host under a fleet
            # deadline's short commands (seen: 60 ms, 8 TCG guests on 2 cores). Ask once more
            # before forcing a guest that may be cooperative; a stopped QEMU cannot answer.
            await qemu.arrive()
        runstate = qemu.runstate
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
        # A reboot is not a refusal: while the button is pressed, the guest's reset ends QEMU.
        said = await REBOOT_AS_SHUTDOWN.prepare(qemu)
        if said:
            step.note(said)
        async with qemu.sampling():
            return await self.press_until_off(qemu, step, cause, said)

    async def press_until_off(
        self, qemu: Qemu, step: OpenStep, cause: Cause | None, said: str = ""
    ) -> Ended:
        policy = qemu.policy

        def pressed(what: str = "") -> str:
            done = _pressed(qemu, what)
            return f"{said}; {done}" if said and done else said or done

        wait = GuestWait.begin(qemu, policy.powerdown_timeout)
        if policy.patience is Patience.ADAPTIVE and policy.diagnose and qemu.agent is not None:
            wait.listen = InhibitorListener(qemu)  # a held inhibitor asks for time
        while True:
            if qemu.watch.suspended and policy.wake_suspended:
                cause = Cause.ASLEEP  # it went to sleep while we waited
                await wake(qemu)
            failure = await qemu.try_command("system_powerdown")
            if isinstance(failure, MonitorClosedError):
                # QEMU closing its monitor is how an exit begins (a panic's poweroff, a guest
                # that just powered off): its process ends a moment later.
                ended = await qemu.wait_gone_or(
                    policy.command_timeout, step, pressed("system_powerdown failed")
                )
                if ended.outcome is Outcome.DONE:
                    return ended
                return Ended(Outcome.FAILED, ended.detail, cause)
            if failure is not None:
                if isinstance(failure, TimeoutError):
                    cause = Cause.MONITOR_UNRESPONSIVE
                return Ended(Outcome.FAILED, pressed("system_powerdown failed"), cause)
            qemu.presses += 1
            again = f" again (press {qemu.presses})" if qemu.presses > 1 else ""
            qemu.recorder.say(f"pressed the power button{again}", stage=self.stage)
            step.note(pressed(), say=False)
            wait.pressed()
            interval = policy.repress_interval
            next_press = anyio.current_time() + (math.inf if interval is None else interval)
            seen = await wait.for_guest(next_press)
            if seen is not Guest.WAITING:
                return qemu.guest_ended(seen, step, cause)
            if wait.over is not None:
                return Ended(Outcome.TIMEOUT, pressed(wait.why_over()), cause)


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
