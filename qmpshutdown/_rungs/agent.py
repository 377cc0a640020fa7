"""The agent rung: ask the guest agent to power the guest off (``guest-shutdown``).

A guest that discards the power button (Windows refusing shutdown without a
logon, a button set to "do nothing") still obeys its agent. The rung probes
the agent with a short bound first (an agent socket whose agent is not running
accepts and never answers: that costs one ``command_timeout``, never the whole
``agent_timeout``), reads what the agent says about the guest (its OS, who is
logged in), thaws a guest left frozen (a frozen agent refuses
``guest-shutdown``), sends ``guest-shutdown`` (no reply on success) and then
waits exactly as after a press: the same waiter, the same end conditions.

Windows' agent implements ``guest-shutdown`` with ``ExitWindowsEx(EWX_FORCE)``:
open applications are closed without asking. The step records who is logged
in so that a caller can tell, and order the rungs to taste.
"""

from __future__ import annotations

import logging

import anyio

from .._agent import AgentError, AgentRefused, read_guest_info
from .._policy import Stage
from .._qemu import Guest, Qemu
from .._result import Outcome
from .._steps import Ended, OpenStep
from .base import Budgeted, reach_agent
from .freeze import drop_if_closed, thaw

logger = logging.getLogger("qmpshutdown")


class AgentShutdown(Budgeted):
    """``guest-shutdown`` (mode powerdown) through the guest agent, then wait for the power-off."""

    stage = Stage.AGENT
    forced = False

    def why_not(self, qemu: Qemu) -> Ended | None:
        if qemu.agent is None:
            return Ended(Outcome.SKIPPED, "no agent socket given")
        return None

    async def run(self, qemu: Qemu, step: OpenStep) -> Ended:
        reached = await reach_agent(qemu)
        if isinstance(reached, Ended):
            return reached
        link, client = reached
        link.info, said = await read_guest_info(client)
        step.note(f"the agent answered: {said}")
        try:
            status = await client.execute("guest-fsfreeze-status")
        except (AgentError, TimeoutError) as err:
            status = None  # guest-shutdown will say if it is frozen
            qemu.recorder.say(f"guest-fsfreeze-status failed: {str(err) or 'no reply'}")
        if status == "frozen":
            # Left frozen (a crashed backup tool?): a frozen agent refuses guest-shutdown.
            if not await thaw(qemu, "the guest was found frozen"):
                return Ended(Outcome.FAILED, f"{step.so_far}; found frozen and not thawed")
            again = await link.connect()
            if again is None:
                return Ended(Outcome.FAILED, f"{step.so_far}; the agent went away after the thaw")
            client = again
        try:
            await client.send_only("guest-shutdown", {"mode": "powerdown"})
        except (AgentError, TimeoutError) as err:
            if isinstance(err, AgentError):
                await drop_if_closed(link, err)
            what = f"sending guest-shutdown failed: {str(err) or 'timeout'}"
            return Ended(Outcome.FAILED, f"{step.so_far}; {what}")
        step.note(f"{step.so_far}; sent guest-shutdown")
        timeout = qemu.policy.agent_timeout
        refused: AgentError | None = None
        seen = Guest.WAITING
        async with qemu.sampling(), anyio.create_task_group() as tg:

            async def watch_for_refusal() -> None:
                nonlocal refused
                error = await client.next_error("guest-shutdown")
                if isinstance(error, AgentRefused):
                    refused = error
                    tg.cancel_scope.cancel()
                else:
                    # EOF: the agent went with its guest (or QEMU); keep waiting for the end.
                    await drop_if_closed(link, error)

            tg.start_soon(watch_for_refusal)
            seen = await qemu.wait_for_guest(anyio.current_time() + timeout)
            tg.cancel_scope.cancel()
        if refused is not None:
            return Ended(Outcome.FAILED, f"{step.so_far}; {refused}")
        if seen is Guest.WAITING:
            return Ended(Outcome.TIMEOUT, f"{step.so_far}; no power-off in {timeout:g} s")
        return qemu.guest_ended(seen, step, None)
