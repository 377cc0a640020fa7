"""The ladder: read the runstate, then each rung of the plan in turn until QEMU is gone.

:func:`climb` races the ladder against a watcher for "QEMU is gone" (its
pidfd, or without a pid its monitor's EOF): whichever finishes first cancels
the other, so a rung never waits a moment longer than QEMU lives. The rungs
are values (:mod:`._rungs`); the record's verdict is a pure function of what
happened (:mod:`._verdict`).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence

import anyio
import anyio.lowlevel
import attrs

from ._errors import ShutdownFailed
from ._evidence import console_tail, screenshot_of
from ._monitor import Monitor
from ._policy import RUNGS, ShutdownPolicy, Stage
from ._process import Process
from ._progress import ProgressCallback
from ._qemu import Qemu
from ._result import Outcome, ShutdownResult
from ._rungs import BEFORE_FORCE, Action, Rung, plan
from ._save import saved_state
from ._steps import Ended, OpenStep, Recorder
from ._verdict import decide, shutdown_reason
from ._watch import race

logger = logging.getLogger("qmpshutdown")


async def ladder(qemu: Qemu, rungs: Sequence[Rung], actions: Sequence[Action]) -> None:
    """Climb: each rung in order, until QEMU is gone (the race then ends this at once)."""
    if qemu.process is not None and qemu.process.has_exited():
        qemu.mark_gone()  # QEMU went away while we connected
        return
    await qemu.arrive()
    forcing = False
    for rung in rungs:
        if qemu.gone:
            return
        if qemu.guest_off and not rung.forced:
            continue  # the guest is off: no graceful rung has anything left to do
        skip = rung.why_not(qemu)
        if skip is None and rung.forced and not forcing and not qemu.guest_off:
            forcing = True  # right before the first forced rung that will run on a live guest
            for action in actions:
                if action.applies(qemu):
                    await take_step(qemu, action.stage, action.budget(qemu.policy), action.run)
            # A caller who cancelled during the actions (after a freeze) gets no force.
            await anyio.lowlevel.checkpoint()
        if skip is not None:
            qemu.recorder.skip(rung.stage, skip)
        else:
            await take_step(qemu, rung.stage, rung.budget(qemu.policy), rung.run)
    if qemu.guest_off and not qemu.gone and not any(rung.forced for rung in rungs):
        qemu.recorder.say("guest is off; QEMU is left in runstate 'shutdown' (no force allowed)")


async def take_step(
    qemu: Qemu, stage: Stage, budget: float, run: Callable[[Qemu, OpenStep], Awaitable[Ended]]
) -> None:
    """Run one rung or action as one recorded step, held to its *budget*."""
    with qemu.recorder.step(stage, qemu.ended_by_cancel) as step:
        with anyio.move_on_after(budget) as scope:
            ended: Ended = await run(qemu, step)
        if scope.cancelled_caught:
            over = f"over its budget of {budget:g} s"
            ended = Ended(Outcome.TIMEOUT, f"{step.so_far}; {over}" if step.so_far else over)
        if stage in RUNGS and ended.outcome is not Outcome.DONE and qemu.exited_now():
            # QEMU went while the rung ended some other way (an agent probe met its closing
            # socket): the rung in progress when it went is the one that ended it.
            gone = qemu.gone_ended(step, ended.detail)
            ended = attrs.evolve(gone, cause=ended.cause)
        step.end(ended)


async def climb(
    monitor: Monitor | None,
    process: Process | None,
    policy: ShutdownPolicy,
    *,
    started: float,
    name: str = "qemu",
    no_monitor_why: str = "",
    no_signal_why: str = "QEMU's pid is unknown",
    on_progress: ProgressCallback | None = None,
) -> ShutdownResult:
    """Run the ladder against *monitor* and *process* and return its record.

    The extension point for callers that reach QEMU their own way: any
    :class:`Monitor` and :class:`Process` will do (the library's own are a
    QMP socket through qemu.qmp and a pidfd).

    :param monitor: the QMP monitor, or None when it could not be reached.
    :param process: QEMU's pinned process, or None when signals are not possible.
    :param policy: which rungs, how long each.
    :param started: the anyio clock at the caller's start (times count from it).
    :param name: how log lines and progress updates name this VM.
    :param no_monitor_why: why there is no monitor, for the skipped steps.
    :param no_signal_why: why there is no process, for the skipped steps.
    :param on_progress: called with a :class:`Progress` as each thing happens.
    :raises ShutdownFailed: the allowed rungs are used up and QEMU still runs.
    :return: the record of what happened.
    """
    return await run_plan(
        monitor, process, policy, started=started, name=name, no_monitor_why=no_monitor_why,
        no_signal_why=no_signal_why, on_progress=on_progress,
    )  # fmt: skip


async def run_plan(
    monitor: Monitor | None,
    process: Process | None,
    policy: ShutdownPolicy,
    *,
    started: float,
    name: str = "qemu",
    no_monitor_why: str = "",
    no_signal_why: str = "QEMU's pid is unknown",
    on_progress: ProgressCallback | None = None,
    rungs: Sequence[Rung] | None = None,
    actions: Sequence[Action] | None = None,
    save_dir: str | None = None,
    evidence_dir: str | None = None,
    console_log: str | None = None,
    agent: str | None = None,
) -> ShutdownResult:
    """:func:`climb`, with the rungs and actions given instead of the policy's own plan.

    :param save_dir: where the ``save`` rung keeps the guest's state (None skips it).
    :param evidence_dir: where the screenshot action saves the guest's screen.
    :param console_log: the serial console's log, whose tail a forced record keeps.
    :param agent: the unix socket of the guest agent's chardev (for the agent
        rung and the freeze), or None.
    """
    recorder = Recorder(started, name, on_progress)
    qemu = Qemu(monitor, process, policy, recorder, agent=agent,
                no_monitor_why=no_monitor_why, no_signal_why=no_signal_why)  # fmt: skip
    qemu.save_dir = save_dir
    qemu.evidence_dir, qemu.console_log = evidence_dir, console_log
    rungs = plan(policy) if rungs is None else list(rungs)
    actions = BEFORE_FORCE if actions is None else tuple(actions)
    try:
        async with anyio.create_task_group() as events:
            if monitor is not None:
                events.start_soon(qemu.pump_events)
            await race(qemu.wait_gone, lambda: ladder(qemu, rungs, actions))
            events.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            for action in actions:
                await action.finish(qemu)
            if qemu.agent is not None:
                await qemu.agent.close()
    await qemu.settle()
    return record(qemu)


def record(qemu: Qemu) -> ShutdownResult:
    """The ladder's record, with its verdict; raise ShutdownFailed when QEMU still runs."""
    steps, events = tuple(qemu.recorder.steps), tuple(qemu.watch.events)
    activity = qemu.patience.activity(powered_off=qemu.watch.guest_shut_down)
    info = None if qemu.agent is None else qemu.agent.info
    guest_os, guest_users = (None, None) if info is None else (info.os, info.users)
    verdict = decide(steps, events, runstate=qemu.runstate, presses=qemu.presses, gone=qemu.gone,
                     guest_os=guest_os, guest_users=guest_users, activity=activity)  # fmt: skip
    gone_at = qemu.watch.gone_at
    forced = not verdict.graceful and verdict.stage is not Stage.ALREADY_OFF
    result = ShutdownResult(
        stage=verdict.stage,
        graceful=verdict.graceful,
        reason=shutdown_reason(events),
        presses=qemu.presses,
        runstate=qemu.runstate,
        cause=verdict.cause,
        pid=None if qemu.process is None else qemu.process.pid,
        elapsed=gone_at if gone_at is not None else qemu.recorder.now(),
        events=events,
        steps=steps,
        saved_state=saved_state(verdict.stage, qemu.saved_to),
        screenshot=screenshot_of(steps),
        console_tail=console_tail(qemu.console_log) if forced else None,
        guest_os=guest_os,
        guest_users=guest_users,
        activity=activity,
    )
    if result.stage is None:
        tried = ", ".join(f"{s.stage.value} {s.outcome.value}" for s in steps) or "none"
        why = f"; likely cause: {result.cause.value}" if result.cause else ""
        name = qemu.recorder.name
        raise ShutdownFailed(
            f"{name}: QEMU is still running after the allowed rungs ({tried}){why}", result
        )
    return result
