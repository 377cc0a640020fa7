"""The rungs and the steps before force: one file each, listed once here.

The ladder's one loop runs what :func:`plan` gives it. Adding a rung is a
file in this folder (a class with the :class:`~.base.Rung` interface), its
stage and budget in the policy module (``Stage``, ``RUNGS``, ``BUDGETS``) and
one line in :data:`RUNG_FOR`; a step before force is a file and one entry in
:data:`BEFORE_FORCE`.
"""

from __future__ import annotations

from collections.abc import Sequence

from .._policy import ShutdownPolicy, Stage
from .agent import AgentShutdown
from .base import Action, Rung
from .diagnose import Diagnose
from .freeze import FreezeBeforeForce
from .powerdown import PowerButton
from .quit import Quit
from .reboot import REBOOT_AS_SHUTDOWN
from .save import Save
from .screenshot import Screenshot
from .signals import KILL, LAST_RESORT_KILL, TERMINATE

__all__ = (
    "AFTER_GRACEFUL", "BEFORE_FORCE", "LAST_RESORT_KILL", "REBOOT_AS_SHUTDOWN", "RUNG_FOR",
    "Action", "Rung", "plan",
    "plan_budget",
)  # fmt: skip

#: The rung for each stage a policy may list.
RUNG_FOR: dict[Stage, Rung] = {
    Stage.POWERDOWN: PowerButton(),
    Stage.AGENT: AgentShutdown(),
    Stage.SAVE: Save(),
    Stage.QUIT: Quit(),
    Stage.TERMINATE: TERMINATE,
    Stage.KILL: KILL,
}

#: Actions run before the first forced rung, in order: the screenshot first, so that it
#: shows the guest as it was (before anything is frozen); the freeze last.
BEFORE_FORCE: tuple[Action, ...] = (Screenshot(), FreezeBeforeForce())
#: Actions run once, right after the first graceful rung that ended with the guest still
#: running, before the next rung (which may change the guest): asking it why.
AFTER_GRACEFUL: tuple[Action, ...] = (Diagnose(),)


def plan(policy: ShutdownPolicy) -> list[Rung]:
    """The rungs *policy* allows, in the order it lists them."""
    return [RUNG_FOR[stage] for stage in policy.stages]


def plan_budget(policy: ShutdownPolicy, rungs: Sequence[Rung] | None = None) -> float:
    """The sum of the budgets of *rungs* (default: the policy's plan) and the actions."""
    rungs = plan(policy) if rungs is None else rungs
    total = sum(rung.budget(policy) for rung in rungs)
    if policy.diagnose and any(not rung.forced for rung in rungs):
        total += sum(action.budget(policy) for action in AFTER_GRACEFUL)
    if any(rung.forced for rung in rungs):
        total += sum(action.budget(policy) for action in BEFORE_FORCE)
    return total
