"""What every rung and every before-force action is: a value with one small interface.

A rung has a stage, whether it is force (``forced``), a time budget under a
policy (the policy module's :data:`~.._policy.BUDGETS`), a reason it cannot run
at all (``why_not``: recorded as a skipped step) and an async ``run`` that
returns how it ended — ``done`` when QEMU (or the guest) ended during it,
``timeout``, ``skipped`` or ``failed``. An action is a step that is not a rung:
it runs right before the first forced rung, and ``finish`` once more when the
ladder ends.
"""

from __future__ import annotations

from typing import Protocol

from .._agent import AgentClient, AgentLink
from .._policy import BUDGETS, ShutdownPolicy, Stage
from .._qemu import Qemu
from .._result import Cause, Outcome
from .._steps import Ended, OpenStep

#: Runstates of a guest that panicked: nobody is there to press for, or to answer its agent.
PANICKED_STATES = frozenset({"guest-panicked", "internal-error"})


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


class Budgeted:
    """A rung or action whose budget is its stage's entry in the policy's table."""

    stage: Stage

    def budget(self, policy: ShutdownPolicy) -> float:
        return BUDGETS[self.stage].of(policy)


def no_monitor(qemu: Qemu, *, or_closed: bool = False) -> Ended | None:
    """Why a step that needs the monitor cannot run, or None."""
    if qemu.monitor is None:
        return Ended(Outcome.SKIPPED, qemu.no_monitor_why, Cause.MONITOR_UNRESPONSIVE)
    if or_closed and qemu.monitor.is_closed():
        return Ended(Outcome.SKIPPED, "the monitor is closed")
    return None


async def reach_agent(qemu: Qemu) -> tuple[AgentLink, AgentClient] | Ended:
    """The way to the guest agent and its client, connected; else the skipped step saying why."""
    link = qemu.agent
    assert link is not None, "a step that needs the agent runs only with an agent socket"
    client = await link.connect()
    if client is None:
        return Ended(Outcome.SKIPPED, f"no agent answered ({link.unreachable})")
    return link, client
