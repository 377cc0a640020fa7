"""Freeze before force: the guest's filesystems frozen through its agent right before ``quit``.

A forced stop of a guest writing to its disk leaves its journal needing
recovery and its last writes unreadable without a replay; a guest frozen
first (``guest-fsfreeze-freeze``: every filesystem synced and its journal
clean) comes back clean (docs/data-safety.md has the figures). The freeze is
an action, not a rung: it runs right before the first forced rung that will
run, when an agent answers, and ``finish()`` thaws a guest that is still
running when the ladder ends (ShutdownFailed, or a cancelled caller): a
running guest is never left frozen.
"""

from __future__ import annotations

import logging

import anyio

from .._agent import AgentError, AgentLink, AgentRefused
from .._policy import Stage
from .._qemu import Qemu
from .._result import Outcome
from .._steps import Ended, OpenStep
from .base import Budgeted, reach_agent

logger = logging.getLogger("qmpshutdown")


def _count(value: object, what: str) -> str:
    n = value if isinstance(value, int) and not isinstance(value, bool) else None
    if n is None:
        return what
    return f"{what} {n} filesystem{'' if n == 1 else 's'}"


class FreezeBeforeForce(Budgeted):
    """``guest-fsfreeze-freeze`` right before the first forced rung (``freeze_timeout``)."""

    stage = Stage.FREEZE

    def applies(self, qemu: Qemu) -> bool:
        return qemu.policy.freeze_before_force and qemu.agent is not None and not qemu.gone

    async def run(self, qemu: Qemu, step: OpenStep) -> Ended:
        reached = await reach_agent(qemu)
        if isinstance(reached, Ended):
            return reached
        link, client = reached
        timeout = qemu.policy.freeze_timeout
        link.freeze_sent = True  # even unanswered, it may freeze the guest late: thaw then
        try:
            frozen = await client.execute("guest-fsfreeze-freeze", bound=timeout)
        except TimeoutError:
            return Ended(Outcome.TIMEOUT, f"no reply to guest-fsfreeze-freeze in {timeout:g} s")
        except AgentError as err:
            await drop_if_closed(link, err)
            return Ended(Outcome.FAILED, f"guest-fsfreeze-freeze failed: {err}")
        return Ended(Outcome.DONE, _count(frozen, "froze"))

    async def finish(self, qemu: Qemu) -> None:
        link = qemu.agent
        if link is None:
            return
        try:
            gone = qemu.gone or (qemu.process is not None and qemu.process.has_exited())
            if link.freeze_sent and not gone:
                # Still running (ShutdownFailed, or the caller cancelled): never leave it frozen.
                await thaw(qemu, "the ladder ended with QEMU running")
        finally:
            await link.close()


async def thaw(qemu: Qemu, why: str) -> bool:
    """Thaw the guest as a recorded ``thaw`` step (shielded, bounded); tell whether it is thawed.

    :param why: said in the step's detail (who left it frozen).
    """
    link = qemu.agent
    assert link is not None
    bound = 3 * qemu.policy.command_timeout  # reconnect, resync, thaw
    recorder = qemu.recorder
    with anyio.CancelScope(shield=True), recorder.step(Stage.THAW, qemu.ended_by_cancel) as step:
        ended = Ended(Outcome.TIMEOUT, f"{why}; no thaw within {bound:g} s")
        with anyio.move_on_after(bound):
            ended = await _thaw(link, why)
        step.end(ended)
    return ended.outcome is Outcome.DONE


async def _thaw(link: AgentLink, why: str) -> Ended:
    client = await link.connect()
    if client is None:
        return Ended(Outcome.FAILED, f"{why}; no agent answered to thaw ({link.unreachable})")
    try:
        thawed = await client.execute("guest-fsfreeze-thaw")
    except TimeoutError:
        return Ended(Outcome.TIMEOUT, f"{why}; no reply to guest-fsfreeze-thaw")
    except AgentError as err:
        await drop_if_closed(link, err)
        return Ended(Outcome.FAILED, f"{why}; guest-fsfreeze-thaw failed: {err}")
    link.freeze_sent = False
    return Ended(Outcome.DONE, f"{why}; {_count(thawed, 'thawed')}")


async def drop_if_closed(link: AgentLink, err: AgentError) -> None:
    """After an error that is not a refusal (EOF, a failed resync), reconnect next time."""
    if not isinstance(err, AgentRefused):
        await link.drop()
