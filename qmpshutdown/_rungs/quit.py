"""The ``quit`` rung: QEMU's clean exit (caches flushed, images closed), without the guest."""

from __future__ import annotations

from functools import partial

from .._errors import CommandError, MonitorClosedError
from .._exitwake import wait_or_wake, waker
from .._policy import Stage
from .._qemu import Qemu
from .._result import Cause, Outcome
from .._steps import Ended, OpenStep
from .base import Budgeted, no_monitor

#: Why quit is skipped after a stalled exit (``Qemu.exit_stalled``).
STALLED_EXIT = (
    "QEMU began its exit after the guest's SHUTDOWN and has not finished it in quit_timeout:"
    " quit cannot end an exit already begun"
)


class Quit(Budgeted):
    """Send ``quit``, then wait ``quit_timeout`` for QEMU's exit."""

    stage = Stage.QUIT
    forced = True

    def why_not(self, qemu: Qemu) -> Ended | None:
        if qemu.exit_stalled:
            return Ended(Outcome.SKIPPED, STALLED_EXIT)
        if exiting(qemu) and qemu.may_answer_late():
            return None  # run() waits for the exit that QEMU began
        return no_monitor(qemu, or_closed=True)

    async def run(self, qemu: Qemu, step: OpenStep) -> Ended:
        if exiting(qemu):
            # A guest that powered off while the ladder asked it why (its SHUTDOWN came during
            # the diagnosis; seen on 3 test workers): QEMU closed the monitor and is on its way
            # out. Wait for that exit as quit would have, rather than give up on a QEMU about
            # to be gone.
            timeout = qemu.policy.quit_timeout
            step.note(f"QEMU closed its monitor; waiting up to {timeout:g} s for its exit")
            return await qemu.wait_gone_or(
                timeout, step, f"QEMU closed its monitor and still runs {timeout:g} s later"
            )
        return await quit_and_wait(qemu, step)


def exiting(qemu: Qemu) -> bool:
    """True when the guest powered off and QEMU (not our side) then closed the monitor."""
    monitor = qemu.monitor
    return (
        qemu.watch.guest_shut_down and monitor is not None
        and monitor.is_closed() and monitor.peer_hung_up()
    )  # fmt: skip


async def quit_and_wait(qemu: Qemu, step: OpenStep, *, kept: str = "") -> Ended:
    """Send ``quit`` and wait for the exit; what came before stays in the step's detail.

    :param kept: said after a failed ``quit`` (the save rung: the state is kept).
    """
    so_far = f"{step.so_far}; " if step.so_far else ""
    timeout = qemu.policy.quit_timeout
    if not so_far:
        # Said before the reply: QEMU exits right after it, and its exit cancels the step
        # (the pidfd's reader) as soon as the loop sees it, maybe before the reply is read.
        step.note("sent quit")
    late, answered = "", False
    try:
        await qemu.command("quit")
        answered = True
    except MonitorClosedError:
        pass  # QEMU may close the socket before it answers quit
    except TimeoutError:
        late = f"no reply to quit in {qemu.policy.command_timeout:g} s"
        if qemu.process is not None and qemu.process.is_stopped():
            return Ended(Outcome.FAILED, f"{so_far}{late}{kept}", Cause.MONITOR_UNRESPONSIVE)
        # A QEMU that runs may have read quit and answer late (seen: 8 TCG guests on 2
        # cores, a fleet deadline's 60 ms command_timeout, SHUTDOWN host-qmp-quit, then the
        # exit). The budget holds quit_timeout too: wait for the exit before calling the
        # monitor unresponsive. A stopped QEMU (SIGSTOP, a debugger) cannot: on at once.
        step.note(f"{so_far}{late}")
        step.failing = Cause.MONITOR_UNRESPONSIVE  # unless QEMU exits within the budget
        so_far = f"{so_far}{late}; "
    except CommandError as err:
        return Ended(Outcome.FAILED, f"{so_far}quit refused: {err}{kept}")
    still = f"{so_far}QEMU still running {timeout:g} s after quit"
    # QEMU acted on quit when it answered, or sent its SHUTDOWN (host-qmp-quit) though
    # the reply did not come (seen: an exit held in its drain sends the event, not the
    # reply): its exit has begun.
    if answered or qemu.watch.exit_begun:
        ended = await _exit_after_quit(qemu, step, still)
    else:
        ended = await qemu.wait_gone_or(timeout, step, still)
    if late and ended.outcome is not Outcome.DONE:
        return Ended(Outcome.FAILED, f"{ended.detail}{kept}", Cause.MONITOR_UNRESPONSIVE)
    return ended


async def _exit_after_quit(qemu: Qemu, step: OpenStep, still: str) -> Ended:
    """Wait ``quit_timeout`` for the exit ``quit`` began, woken by SIGTERM after
    ``command_timeout`` of it if it stalled (:mod:`.._exitwake`: only an exit can follow).
    """
    policy = qemu.policy
    wake = waker(policy, qemu.process, qemu.may_answer_late(), quit_answered=True)
    if wake is None:
        return await qemu.wait_gone_or(policy.quit_timeout, step, still)
    watch = qemu.watch
    ended = await wait_or_wake(
        partial(watch.wait_until, lambda: qemu.gone), policy.quit_timeout, wake,
        qemu.recorder.say, wake_after=policy.command_timeout, began="quit",
    )  # fmt: skip
    qemu.exit_woken = ended == "woken" and qemu.gone
    return qemu.gone_ended(step) if qemu.gone else Ended(Outcome.TIMEOUT, still)
