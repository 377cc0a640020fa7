"""The signal rungs: SIGTERM (``terminate``) and SIGKILL (``kill``), through the pidfd."""

from __future__ import annotations

import math
import signal

import anyio

from .._policy import BUDGETS, ShutdownPolicy, Stage
from .._qemu import Qemu
from .._result import Outcome
from .._steps import Ended, OpenStep


class Signal:
    """Send a signal through the pidfd, then wait for QEMU's exit.

    :param stage: the rung (terminate or kill); its budget is how long to wait for the exit
        (for a stopped QEMU with commands unanswered, the wait for their answers first).
    :param signum: the signal.
    :param label: put before the step's detail (who sent it, when not the ladder itself).
    """

    forced = True

    def __init__(self, stage: Stage, signum: signal.Signals, label: str = "") -> None:
        self.stage = stage
        self.signum = signum
        self.label = label

    def budget(self, policy: ShutdownPolicy) -> float:
        return BUDGETS[self.stage].of(policy)

    def why_not(self, qemu: Qemu) -> Ended | None:
        if qemu.process is None:
            return Ended(Outcome.SKIPPED, qemu.no_signal_why)
        return None

    async def run(self, qemu: Qemu, step: OpenStep) -> Ended:
        assert qemu.process is not None
        grace = self.budget(qemu.policy)
        detail = f"{self.label}sent {self.signum.name}"
        answered_first = False
        if self.signum == signal.SIGTERM and qemu.process.is_stopped():
            waiting = _unanswered(qemu)
            if waiting:
                answered_first = True
                answer_for = min(qemu.policy.command_timeout, grace / 2)
                if await _answer_first(qemu, step, waiting, answer_for):
                    return qemu.gone_ended(step)
                detail = f"{step.so_far}; then {detail}"
                qemu.process.send_signal(self.signum)
                if qemu.process.is_stopped():  # stopped again meanwhile
                    qemu.process.send_signal(signal.SIGCONT)
                    detail += " and SIGCONT (QEMU was stopped again)"
            else:
                # A stopped process queues SIGTERM until it runs again; let it take its
                # clean exit.
                qemu.process.send_signal(self.signum)
                qemu.process.send_signal(signal.SIGCONT)
                detail += " and SIGCONT (QEMU was stopped)"
        else:
            qemu.process.send_signal(self.signum)
        step.note(detail)
        spent = qemu.recorder.now() - step.started
        if spent > 0.01:  # what is left of the budget, a moment before the step's own end
            grace = max(0.0, math.floor((grace - spent) * 100) / 100 - 0.01)
        still_running = f"QEMU still running {grace:g} s after {self.signum.name}"
        if answered_first:  # what came before SIGTERM belongs in the record
            still_running = f"{detail}; {still_running}"
        return await qemu.wait_gone_or(grace, step, still_running)


def _unanswered(qemu: Qemu) -> int | None:
    count = getattr(qemu.monitor, "unanswered", None)  # a caller's Monitor may lack it
    return None if count is None or qemu.monitor is None or qemu.monitor.is_closed() else count()


async def _answer_first(qemu: Qemu, step: OpenStep, waiting: int, seconds: float) -> bool:
    """Continue a stopped QEMU and let it answer the commands it was sent while stopped.

    QEMU 10.0 can crash in its exit (SIGSEGV in ``monitor_cleanup``) when its monitor
    reads a command after the exit began (docs/why.md): SIGTERM and SIGCONT together
    race the commands it still has to read. So SIGCONT alone first; a ``quit`` among
    them ends it cleanly by itself. Waits up to *seconds* (taken from the rung's budget).

    :return: True when QEMU is gone.
    """
    assert qemu.process is not None
    qemu.process.send_signal(signal.SIGCONT)
    plural = "s" if waiting > 1 else ""
    step.note(f"sent SIGCONT (QEMU was stopped, {waiting} command{plural} unanswered)")

    # Polled: the count is kept by the client's reader, and this path is rare. QEMU's exit
    # is watched by the ladder already (Qemu.until_gone: one reader on the pidfd), which
    # marks it gone here and then cancels the step.
    with anyio.move_on_after(seconds):
        while _unanswered(qemu) and not qemu.gone:  # noqa: ASYNC110
            await anyio.sleep(_ANSWER_POLL)
    left = _unanswered(qemu)
    if qemu.exited_now():
        return True
    if left is None:
        said = "its monitor closed"
    else:
        said = f"{left} still unanswered" if left else "its commands answered"
    step.note(f"{step.so_far}; {said}", say=False)
    return False


#: How often a continued QEMU's answers are counted (a rare path: QEMU was stopped).
_ANSWER_POLL = 0.01

TERMINATE = Signal(Stage.TERMINATE, signal.SIGTERM)
KILL = Signal(Stage.KILL, signal.SIGKILL)
#: ``launch()``'s last resort when its policy allows no SIGKILL: a recorded step like any other.
LAST_RESORT_KILL = Signal(Stage.KILL, signal.SIGKILL, "launch() teardown: ")
