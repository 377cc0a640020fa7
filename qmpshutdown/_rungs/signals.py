"""The signal rungs: SIGTERM (``terminate``) and SIGKILL (``kill``), through the pidfd."""

from __future__ import annotations

import signal

from .._policy import BUDGETS, ShutdownPolicy, Stage
from .._qemu import Qemu
from .._result import Outcome
from .._steps import Ended, OpenStep


class Signal:
    """Send a signal through the pidfd, then wait for QEMU's exit.

    :param stage: the rung (terminate or kill); its budget is how long to wait for the exit.
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


TERMINATE = Signal(Stage.TERMINATE, signal.SIGTERM)
KILL = Signal(Stage.KILL, signal.SIGKILL)
#: ``launch()``'s last resort when its policy allows no SIGKILL: a recorded step like any other.
LAST_RESORT_KILL = Signal(Stage.KILL, signal.SIGKILL, "launch() teardown: ")
