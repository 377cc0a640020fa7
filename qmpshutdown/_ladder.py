"""The ladder: read the runstate, then each rung of the plan in turn until QEMU is gone.

:func:`climb` runs the ladder until "QEMU is gone" (its pidfd turns readable,
or without a pid its monitor's EOF) cancels it, so a rung never waits a moment
longer than QEMU lives. QEMU's events reach the watch as they are read. The rungs
are values (:mod:`._rungs`); the record's verdict is a pure function of what
happened (:mod:`._verdict`).
"""

from __future__ import annotations

import collections
import logging
import os
from collections.abc import Awaitable, Callable, Sequence

import anyio
import anyio.lowlevel
import attrs

from ._errors import ShutdownFailed
from ._job import Job
from ._monitor import Monitor
from ._policy import RUNGS, ShutdownPolicy, Stage
from ._process import Process
from ._progress import ProgressCallback
from ._qemu import Qemu
from ._result import Outcome, ShutdownResult
from ._rungs import AFTER_GRACEFUL, BEFORE_FORCE, REBOOT_AS_SHUTDOWN, Action, Rung, plan
from ._steps import Ended, OpenStep, Recorder
from ._verdict import decide, saved_state, screenshot_of, shutdown_reason

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
            ended = await take_step(qemu, rung.stage, rung.budget(qemu.policy), rung.run)
            # The guest was asked (the rung ran, not skipped) and stays: ask it why, once.
            asked = ended.outcome in (Outcome.TIMEOUT, Outcome.FAILED)
            if not rung.forced and asked and not qemu.gone and not qemu.guest_off:
                for action in AFTER_GRACEFUL:
                    if action.applies(qemu):
                        await take_step(qemu, action.stage, action.budget(qemu.policy), action.run)
    if qemu.guest_off and not qemu.gone and not any(rung.forced for rung in rungs):
        stalled = qemu.exit_stalled
        left = "has not finished its exit" if stalled else "is left in runstate 'shutdown'"
        qemu.recorder.say(f"guest is off; QEMU {left} (no force allowed)")


async def take_step(
    qemu: Qemu, stage: Stage, budget: float, run: Callable[[Qemu, OpenStep], Awaitable[Ended]]
) -> Ended:
    """Run one rung or action as one recorded step, held to its *budget*; how it ended."""
    with qemu.recorder.step(stage, qemu.ended_by_cancel) as step:
        with anyio.move_on_after(budget) as scope:
            ended: Ended = await run(qemu, step)
        if scope.cancelled_caught:
            over = f"over its budget of {budget:g} s"
            detail = f"{step.so_far}; {over}" if step.so_far else over
            failed = step.failing is not None
            ended = Ended(Outcome.FAILED if failed else Outcome.TIMEOUT, detail, step.failing)
        if stage in RUNGS and ended.outcome is not Outcome.DONE and qemu.exited_now():
            # QEMU went while the rung ended some other way (an agent probe met its closing
            # socket): the rung in progress when it went is the one that ended it.
            gone = qemu.gone_ended(step, ended.detail)
            ended = attrs.evolve(gone, cause=ended.cause)
        step.end(ended)
    return ended


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
    # The caller reached QEMU its own way: the job names it, and has nothing else.
    job = Job(name, policy=policy, name=name)
    return await run_plan(
        job, monitor, process, started=started, on_progress=on_progress,
        no_monitor_why=no_monitor_why, no_signal_why=no_signal_why,
    )  # fmt: skip


async def run_plan(
    job: Job,
    monitor: Monitor | None,
    process: Process | None,
    *,
    started: float,
    on_progress: ProgressCallback | None = None,
    no_monitor_why: str = "",
    no_signal_why: str = "QEMU's pid is unknown",
    rungs: Sequence[Rung] | None = None,
    actions: Sequence[Action] | None = None,
    name: str | None = None,
) -> ShutdownResult:
    """:func:`climb` for one :class:`~._job.Job` (its policy set), with the rungs and
    actions given instead of the policy's own plan when given, named *name* (else the
    job's name).
    """
    recorder = Recorder(started, name or job.name or "qemu", on_progress)
    qemu = Qemu(job, monitor, process, recorder,
                no_monitor_why=no_monitor_why, no_signal_why=no_signal_why)  # fmt: skip
    rungs = plan(qemu.policy) if rungs is None else list(rungs)
    actions = BEFORE_FORCE if actions is None else tuple(actions)
    async with qemu.listening():  # events go to the watch as they are read
        try:
            await qemu.until_gone(lambda: ladder(qemu, rungs, actions))
        finally:
            with anyio.CancelScope(shield=True):
                for action in actions:
                    await action.finish(qemu)
                await REBOOT_AS_SHUTDOWN.finish(qemu)  # QEMU still running: its reboot action back
                if qemu.agent is not None:
                    await qemu.agent.close()
        await qemu.settle()
    return record(qemu)


def record(qemu: Qemu) -> ShutdownResult:
    """The ladder's record, with its verdict; raise ShutdownFailed when QEMU still runs."""
    steps, events = tuple(qemu.recorder.steps), tuple(qemu.watch.events)
    activity = qemu.sampler.activity(powered_off=qemu.watch.guest_shut_down)
    info = None if qemu.agent is None else qemu.agent.info
    guest_os, guest_users = (None, None) if info is None else (info.os, info.users)
    diagnosis = None if qemu.agent is None else qemu.agent.diagnosis
    verdict = decide(steps, events, runstate=qemu.runstate, presses=qemu.presses, gone=qemu.gone,
                     guest_os=guest_os, guest_users=guest_users, activity=activity,
                     diagnosis=diagnosis)  # fmt: skip
    gone_at = qemu.watch.gone_at
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
        saved_state=saved_state(verdict.stage, steps),
        screenshot=screenshot_of(steps),
        console_tail=console_tail(qemu.job.console_path) if verdict.forced else None,
        guest_os=guest_os,
        guest_users=guest_users,
        activity=activity,
        diagnosis=diagnosis,
    )
    if result.stage is None:
        tried = ", ".join(f"{s.stage.value} {s.outcome.value}" for s in steps) or "none"
        why = f"; likely cause: {result.cause.value}" if result.cause else ""
        name = qemu.recorder.name
        raise ShutdownFailed(
            f"{name}: QEMU is still running after the allowed rungs ({tried}){why}", result
        )
    return result


#: How many of the console's last lines go into the record.
CONSOLE_TAIL_LINES = 50
#: The most of a console log read to find its last lines (the end of the file).
_CONSOLE_TAIL_BYTES = 64 * 1024


def console_tail(path: str | None, lines: int = CONSOLE_TAIL_LINES) -> tuple[str, ...] | None:
    """The last *lines* lines of the console log at *path* (None if there is none to read)."""
    if path is None:
        return None
    try:
        with open(path, "rb") as log:
            size = log.seek(0, os.SEEK_END)
            log.seek(max(0, size - _CONSOLE_TAIL_BYTES))
            data = log.read(_CONSOLE_TAIL_BYTES)
    except OSError as err:
        logger.debug("cannot read the console log %s: %s", path, err)
        return None
    if size > _CONSOLE_TAIL_BYTES:
        data = data.partition(b"\n")[2]  # the first line read is cut short
    text = data.decode(errors="replace").replace("\r\n", "\n").replace("\r", "\n")
    kept: collections.deque[str] = collections.deque(text.splitlines(), maxlen=lines)
    return tuple(kept)
