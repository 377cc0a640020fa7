"""The verdict: which rung ended the VM, whether the guest went by itself, and why not.

Pure functions of what happened — the steps, the events, the runstate found
on arrival and the presses — so they are tested as plain functions and never
patched into a record afterwards.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from . import _finding as kinds
from ._finding import Finding
from ._policy import GRACEFUL_STAGES, RUNGS, Stage
from ._result import Activity, Cause, EventRecord, Outcome, Step, is_forced

#: SHUTDOWN reasons of a guest that ended itself without being forced.
GUEST_OFF_REASONS = frozenset({"guest-shutdown", "guest-reset"})


@attrs.frozen
class Verdict:
    """What a ladder's record says: the rung that ended the VM, graceful, forced, cause."""

    stage: Stage | None
    graceful: bool
    cause: Cause | None
    forced: bool = False


def screenshot_of(steps: Sequence[Step]) -> str | None:
    """The file of the last ``screenshot`` step that saved one, else None."""
    saved = [s.path for s in steps if s.stage is Stage.SCREENSHOT and s.outcome is Outcome.DONE]
    return saved[-1] if saved else None


def saved_state(stage: Stage | None, steps: Sequence[Step]) -> str | None:
    """The state file when the ``save`` rung is the one that ended the VM, else None."""
    if stage is not Stage.SAVE:
        return None
    saved = [s.path for s in steps if s.stage is Stage.SAVE and s.outcome is Outcome.DONE]
    return saved[-1] if saved else None


def first_shutdown(events: Sequence[EventRecord]) -> Mapping[str, Any] | None:
    """The data of the first SHUTDOWN event, or None."""
    return next((e.data for e in events if e.event == "SHUTDOWN"), None)


def shutdown_reason(events: Sequence[EventRecord]) -> str | None:
    """The ``reason`` of the first SHUTDOWN event, or None."""
    data = first_shutdown(events)
    reason = None if data is None else data.get("reason")
    return None if reason is None else str(reason)


def guest_went_by_itself(events: Sequence[EventRecord]) -> bool:
    """True when the first SHUTDOWN came from the guest, powering off or resetting."""
    data = first_shutdown(events)
    return (
        data is not None
        and bool(data.get("guest"))
        and shutdown_reason(events) in GUEST_OFF_REASONS
    )


def ended_by(steps: Sequence[Step], *, runstate: str | None, gone: bool) -> Stage | None:
    """The rung that ended the VM, ``already-off``, or None when QEMU still runs.

    A guest found off (runstate ``shutdown``), or QEMU gone before any step,
    is ``already-off``; otherwise the first rung that ended ``done`` (a graceful
    rung stays the answer when ``quit`` then ends a ``-no-shutdown`` QEMU).
    Steps that are not rungs (actions such as a freeze) never end a VM: QEMU gone
    while none of the rungs ran (killed from outside during the diagnosis, say) is
    put down to the last rung that ran, whose step says how it ended.
    """
    rungs = [step for step in steps if step.stage in RUNGS]
    if runstate == "shutdown" or (gone and not rungs):
        return Stage.ALREADY_OFF
    done = [step.stage for step in rungs if step.outcome is Outcome.DONE]
    if done:
        return done[0]
    return rungs[-1].stage if gone else None


def is_graceful(
    stage: Stage | None, events: Sequence[EventRecord], *, runstate: str | None
) -> bool:
    """True when the guest powered itself off (or was found off)."""
    if runstate == "shutdown":
        return True  # the guest powered itself off before we came
    return stage is not None and guest_went_by_itself(events)


def is_windows(guest_os: str | None) -> bool:
    """True when the agent named a Windows OS (``Microsoft Windows``, ``Windows 10 Pro`` …)."""
    return guest_os is not None and "windows" in guest_os.lower()


#: What the guest said, as a cause: the first kind in this order that it said wins (a key
#: logind ignores outright beats an inhibitor, which beats the work a shutdown waits for).
FINDING_CAUSES: tuple[tuple[str, Cause], ...] = (
    (kinds.POWER_KEY, Cause.IGNORED_POWER_BUTTON),
    (kinds.INHIBITOR, Cause.INHIBITED),
    (kinds.LOGON_REQUIRED, Cause.NO_LOGON),
    (kinds.STOP_JOB, Cause.BUSY),
    (kinds.UPDATING, Cause.BUSY),
    (kinds.SHUTDOWN_REASON_PROMPT, Cause.STALLED),
)


def said_cause(
    diagnosis: Sequence[Finding] | None, guest_users: tuple[str, ...] | None = None
) -> Cause | None:
    """The cause the guest's own findings name (:data:`FINDING_CAUSES`), else None.

    ``logon-required`` names ``no-logon`` only when the agent listed nobody logged on.
    """
    said = {finding.kind for finding in diagnosis or ()}
    for kind, cause in FINDING_CAUSES:
        if kind in said and (kind != kinds.LOGON_REQUIRED or guest_users == ()):
            return cause
    return None


def press_cause(activity: Activity | None) -> Cause:
    """Why a pressed guest did not go, from what it did while it was waited for.

    Still working at the end: ``busy``; worked after the press, then idled:
    ``stalled``; no work at all (or nothing read): ``ignored-power-button``.
    """
    if activity is None:
        return Cause.IGNORED_POWER_BUTTON
    if activity.busy_at_end:
        return Cause.BUSY
    if activity.reacted:
        return Cause.STALLED
    return Cause.IGNORED_POWER_BUTTON


def likely_cause(
    steps: Sequence[Step],
    events: Sequence[EventRecord],
    *,
    runstate: str | None,
    presses: int,
    guest_os: str | None = None,
    guest_users: tuple[str, ...] | None = None,
    activity: Activity | None = None,
    diagnosis: Sequence[Finding] | None = None,
) -> Cause | None:
    """Why the guest did not power itself off: what the guest said, else a panic QEMU
    reported, else the first cause a step named, else the other events'.

    What the guest itself said (its *diagnosis*, :func:`said_cause`) comes first.
    A Windows guest (its agent said so) that ignored the button with nobody
    logged in is ``no-logon``: Windows refuses a shutdown without a logon.
    A pressed guest with nothing else to show is told apart by its *activity*
    (:func:`press_cause`).
    """
    said = said_cause(diagnosis, guest_users)
    if said is not None:
        return said
    names = {event.event for event in events}
    if "GUEST_PANICKED" in names or shutdown_reason(events) == "guest-panic":
        # QEMU said so: beats what a step met afterwards (a monitor that stopped answering
        # while QEMU 7.2 ended after the panic, with a QMP command in flight).
        return Cause.PANICKED
    named = next((step.cause for step in steps if step.cause is not None), None)
    if named is not None:
        return named
    if runstate is None and steps:
        return Cause.MONITOR_UNRESPONSIVE
    if runstate == "suspended" or "SUSPEND" in names:
        return Cause.ASLEEP
    if any(e.event == "RESET" and e.data.get("guest", True) for e in events):
        return Cause.REBOOTED
    if presses and is_windows(guest_os) and guest_users == ():
        return Cause.NO_LOGON
    if presses:
        return press_cause(activity)
    return None


def decide(
    steps: Sequence[Step],
    events: Sequence[EventRecord],
    *,
    runstate: str | None,
    presses: int,
    gone: bool,
    guest_os: str | None = None,
    guest_users: tuple[str, ...] | None = None,
    activity: Activity | None = None,
    diagnosis: Sequence[Finding] | None = None,
) -> Verdict:
    """The whole verdict of a ladder from its record.

    ``cause`` is None when the guest went on the first graceful rung that ran;
    when an earlier graceful rung failed (the button ignored, then the agent
    worked) it says why that one failed.
    """
    stage = ended_by(steps, runstate=runstate, gone=gone)
    graceful = is_graceful(stage, events, runstate=runstate)
    earlier_failed = any(
        step.stage in GRACEFUL_STAGES and step.outcome in (Outcome.TIMEOUT, Outcome.FAILED)
        for step in steps
    )
    cause = None
    if not graceful or earlier_failed:
        cause = likely_cause(
            steps, events, runstate=runstate, presses=presses, guest_os=guest_os,
            guest_users=guest_users, activity=activity, diagnosis=diagnosis,
        )  # fmt: skip
    return Verdict(stage, graceful, cause, is_forced(stage, graceful))
