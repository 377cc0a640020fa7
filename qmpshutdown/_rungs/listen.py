"""Patience that listens: ask the guest, while the button's wait goes on, whether it holds
a block inhibitor.

A Linux guest whose application holds a block inhibitor on shutdown (a backup
writing its archive) has logind refuse the power key: it is asking for time.
Under adaptive patience with an agent, the power button's wait
(:class:`~.._waits.GuestWait`) asks this listener before it would end; a held
inhibitor counts as work, up to ``max_powerdown_timeout``, and once it is let
go the rung presses again at once (a refused press is dropped, nothing queues
it). Each question is one ``guest-exec`` of the inhibitor question of
:mod:`.._questions`, held to ``command_timeout``; nothing is asked of a guest
that goes, works, or has no agent.
"""

from __future__ import annotations

import anyio

from .. import _finding as kinds
from .._agent import AgentError, enabled_commands, read_guest_info
from .._qemu import Qemu
from .._questions import Question, Unreadable, inhibitor_question
from .base import reach_agent
from .diagnose import EXEC_COMMANDS, ask
from .freeze import drop_if_closed


class InhibitorListener:
    """``await listener()``: True while the guest holds a block inhibitor, False when it holds
    none, None when it cannot tell (no agent, ``guest-exec`` disabled, not Linux, no reply).
    """

    def __init__(self, qemu: Qemu) -> None:
        self.qemu = qemu
        self.question: Question | None = None
        self.asked = 0  #: questions asked (each a guest-exec and its status polls)
        self._held: str | None = None  #: the inhibitor last said, to say it once

    async def __call__(self) -> bool | None:
        qemu = self.qemu
        if qemu.agent is None:
            return None
        reached = await reach_agent(qemu)
        if not isinstance(reached, tuple):
            return None
        link, client = reached
        try:
            with anyio.fail_after(qemu.policy.command_timeout):
                if self.question is None:
                    enabled = enabled_commands(await client.execute("guest-info"))
                    if enabled is not None and EXEC_COMMANDS - enabled:
                        return None
                    if link.info is None:
                        link.info, _ = await read_guest_info(client)
                    self.question = inhibitor_question(link.info.os_id)
                    if self.question is None:
                        return None
                answer = await ask(client, self.question)
        except TimeoutError:
            return None
        except AgentError as err:
            await drop_if_closed(link, err)
            return None
        self.asked += 1
        try:
            held = [f for f in self.question.parse(answer) if f.kind == kinds.INHIBITOR]
        except Unreadable:
            return None
        said = "; ".join(finding.detail for finding in held) or None
        if said is not None and said != self._held:
            qemu.recorder.say(f"the guest asks for time: {said}")
        self._held = said
        return bool(held)
