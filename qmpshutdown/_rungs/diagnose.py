"""The diagnosis: ask a guest that did not go, through its agent, why (``Stage.DIAGNOSE``).

An :class:`~.base.Action` the ladder runs once, right after the first graceful
rung that ended with the guest still running — before anything that changes
the guest: the agent's shutdown, the freeze (a frozen agent refuses
``guest-exec``), any force. It runs the read-only questions of
:mod:`.._questions` for the guest's OS (``guest-get-osinfo``'s ``id``) through
``guest-exec``, each held to ``command_timeout`` and the whole step to
``diagnose_timeout``, and keeps what they found on the agent link (the result's
``diagnosis``).

It never stops the ladder: no agent, ``guest-exec`` disabled (``guest-info``
says so), a program missing in the guest or output that is not what the
program prints are recorded (skipped, or a question that could not be read),
and an agent that stops answering costs one ``command_timeout`` and is itself
a finding (a guest that is shutting down stops its agent with its other
services). Nothing the guest prints is run or put into a command: the
questions are fixed argument vectors, their output is only parsed, and capped.
"""

from __future__ import annotations

import re

import anyio

from .. import _finding as kinds
from .._agent import (
    AgentClient,
    AgentError,
    AgentRefused,
    enabled_commands,
    guest_exec,
    read_guest_info,
)
from .._finding import Finding
from .._policy import Stage
from .._qemu import Qemu
from .._questions import OUTPUT_CAP, Answer, Question, Unreadable, merge, questions_for
from .._result import Outcome
from .._steps import Ended, OpenStep
from .._verdict import said_cause
from .base import PANICKED_STATES, Budgeted, reach_agent
from .freeze import drop_if_closed

#: The agent commands the questions need (``guest-info`` lists which are enabled).
EXEC_COMMANDS = frozenset({"guest-exec", "guest-exec-status"})
_DISABLED = re.compile(r"disabled|not (?:found|supported|allowed)", re.IGNORECASE)


async def ask(client: AgentClient, question: Question) -> Answer:
    """Run *question*'s command in the guest (``guest-exec``); its output, decoded and capped.

    The caller bounds it. :raises: what :func:`~.._agent.guest_exec` raises.
    """
    output = await guest_exec(client, question.argv, cap=OUTPUT_CAP)
    return Answer(
        exitcode=output.exitcode,
        stdout=output.stdout.decode(errors="replace"),
        stderr=output.stderr.decode(errors="replace"),
        truncated=output.truncated,
    )


class Diagnose(Budgeted):
    """Ask the guest why it stays: read-only commands through the agent's ``guest-exec``."""

    stage = Stage.DIAGNOSE

    def applies(self, qemu: Qemu) -> bool:
        link = qemu.agent
        return (
            qemu.policy.diagnose
            and link is not None
            and not link.diagnosed
            and not qemu.gone
            and not qemu.guest_off
            and not qemu.watch.panicked  # a panicked guest's agent cannot answer
            and qemu.runstate not in PANICKED_STATES
        )

    async def run(self, qemu: Qemu, step: OpenStep) -> Ended:
        link = qemu.agent
        assert link is not None, "applies() holds"
        link.diagnosed = True  # at most once per ladder, whatever happens below
        reached = await reach_agent(qemu)
        if isinstance(reached, Ended):
            return reached
        link, client = reached
        try:
            enabled = enabled_commands(await client.execute("guest-info"))
        except TimeoutError:
            return await self._silent(qemu, [], "guest-info")
        except AgentError as err:
            await drop_if_closed(link, err)
            return Ended(Outcome.FAILED, f"guest-info failed: {err}")
        if enabled is not None and EXEC_COMMANDS - enabled:
            off = ", ".join(sorted(EXEC_COMMANDS - enabled))
            return Ended(Outcome.SKIPPED, f"guest-exec is disabled in the guest's agent ({off} "
                         "not enabled, says guest-info): nothing can be asked")  # fmt: skip
        if link.info is None:
            link.info, said = await read_guest_info(client)
            step.note(f"the agent answered: {said}", say=False)
        questions = questions_for(link.info.os_id)
        findings: list[Finding] = []
        unread: list[str] = []
        for asked, question in enumerate(questions):
            try:
                with anyio.fail_after(qemu.policy.command_timeout):
                    answer = await ask(client, question)
            except TimeoutError:
                return await self._silent(qemu, findings, question.source, asked)
            except AgentRefused as err:
                if _DISABLED.search(err.desc) and "guest-exec" in err.desc:
                    return Ended(Outcome.SKIPPED, f"guest-exec is disabled: {err.desc}")
                unread.append(f"{question.source}: {err.desc or err.error_class}")
                continue
            except AgentError as err:
                await drop_if_closed(link, err)
                return await self._silent(qemu, findings, question.source, asked, str(err))
            try:
                findings.extend(question.parse(answer))
            except Unreadable as err:
                unread.append(f"{question.source}: {err}")
        return self._found(qemu, merge(findings), len(questions), unread)

    def _found(
        self, qemu: Qemu, diagnosis: tuple[Finding, ...], asked: int, unread: list[str]
    ) -> Ended:
        link = qemu.agent
        assert link is not None
        link.diagnosis = diagnosis
        info = link.info
        users = None if info is None else info.users
        said = "; ".join(str(finding) for finding in diagnosis) or "nothing that keeps it up"
        detail = f"asked {asked} questions: {said}"
        if unread:
            detail += f"; could not read {len(unread)}: " + "; ".join(unread)
        outcome = Outcome.FAILED if unread and len(unread) == asked else Outcome.DONE
        return Ended(outcome, detail, said_cause(diagnosis, users))

    async def _silent(
        self, qemu: Qemu, findings: list[Finding], source: str, asked: int = 0, why: str = ""
    ) -> Ended:
        """The agent stopped answering: what it said before, and that it went silent."""
        silent = Finding(
            kinds.AGENT_SILENT,
            f"the agent stopped answering after {asked} questions"
            + (f" ({why})" if why else f" (no reply in {qemu.policy.command_timeout:g} s)")
            + ": a guest that is shutting down stops its agent with its other services",
            source,
        )
        ended = self._found(qemu, merge([*findings, silent]), asked, [])
        link = qemu.agent
        assert link is not None
        link.unreachable = f"it stopped answering during the diagnosis ({source})"
        await link.drop()  # nobody waits on it again: the agent rung and the freeze skip
        return Ended(Outcome.FAILED, ended.detail, ended.cause)

    async def finish(self, qemu: Qemu) -> None:
        """Nothing to undo: the questions only read."""
