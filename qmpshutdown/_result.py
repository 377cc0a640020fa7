"""The record a shutdown returns: every step, every event, and which rung ended the VM."""

from __future__ import annotations

import copy
import enum
import types
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from ._finding import Finding
from ._policy import Stage


class Outcome(str, enum.Enum):
    """How one rung went."""

    DONE = "done"  #: QEMU (or the guest) ended during this rung
    TIMEOUT = "timeout"  #: the rung's time ran out and QEMU was still running
    SKIPPED = "skipped"  #: the rung was not tried (see the step's detail)
    FAILED = "failed"  #: the rung could not be carried out (see the step's detail)

    def __str__(self) -> str:
        return self.value


class Cause(str, enum.Enum):
    """The likely reason a guest did not power itself off."""

    IGNORED_POWER_BUTTON = "ignored-power-button"  #: pressed, delivered, no reaction
    ASLEEP = "asleep"  #: suspended to RAM (S3)
    PAUSED = "paused"  #: paused, prelaunch, debug, io-error or watchdog
    PANICKED = "panicked"  #: guest-panicked or internal-error
    MIGRATING = "migrating"  #: an incoming or outgoing migration, or a snapshot
    REBOOTED = "rebooted"  #: the guest rebooted instead of powering off
    MONITOR_UNRESPONSIVE = "monitor-unresponsive"  #: QMP gave no greeting or reply
    #: a Windows guest (its agent said so) with nobody logged in: it refuses the button
    NO_LOGON = "no-logon"
    BUSY = "busy"  #: still working (CPU or disk) when it had to be forced
    STALLED = "stalled"  #: worked after the press, then idled without powering off
    #: an application holds a block inhibitor (the guest's agent said so): logind refuses the key
    INHIBITED = "inhibited"

    def __str__(self) -> str:
        return self.value


#: Why a graceful wait ended (:attr:`Activity.ended`).
WAIT_ENDS = ("powered-off", "idle-cutoff", "cap", "timeout")


@attrs.frozen
class Activity:
    """What the guest did while the graceful rungs waited for it (their sampler's readings).

    :ivar samples: readings taken (about one a second, the first one at the first press).
    :ivar vcpu_seconds: CPU time the vCPU threads ran during the wait, in seconds.
    :ivar bytes_read: bytes the guest read from its block devices during the wait.
    :ivar bytes_written: bytes it wrote.
    :ivar longest_idle: the longest stretch, in seconds, in which it did no work.
    :ivar busy_seconds: seconds of the wait in which it worked (CPU or disk above
        the policy's ``busy_cpu`` / ``busy_io``).
    :ivar busy_at_end: True when it was still working in the last two readings.
    :ivar ended: why the (last) wait ended: ``powered-off``, ``idle-cutoff`` (adaptive:
        idle too long), ``cap`` (adaptive: ``max_powerdown_timeout``), ``timeout``; None
        when it was cut short otherwise (QEMU went without the guest, a panic, a failure).
    """

    samples: int
    vcpu_seconds: float
    bytes_read: int
    bytes_written: int
    longest_idle: float
    busy_seconds: float
    busy_at_end: bool
    ended: str | None

    @property
    def reacted(self) -> bool:
        """True when the guest worked at all during the wait (a reaction to the press)."""
        return self.busy_seconds > 0

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict: the fields, times as ``*_s``.

        Keys: ``samples``, ``vcpu_seconds``, ``bytes_read``, ``bytes_written``,
        ``longest_idle_s``, ``busy_s``, ``busy_at_end``, ``ended``.
        """
        return {
            "samples": self.samples,
            "vcpu_seconds": round(self.vcpu_seconds, 6),
            "bytes_read": self.bytes_read,
            "bytes_written": self.bytes_written,
            "longest_idle_s": round(self.longest_idle, 6),
            "busy_s": round(self.busy_seconds, 6),
            "busy_at_end": self.busy_at_end,
            "ended": self.ended,
        }

    def summary(self) -> str:
        """A few words for a step's detail: how busy, how idle."""
        state = "busy at the end" if self.busy_at_end else f"idle for {self.longest_idle:.0f} s"
        return (
            f"guest {state}: {self.vcpu_seconds:.1f} vCPU s, "
            f"{_size(self.bytes_read)} read, {_size(self.bytes_written)} written, "
            f"busy {self.busy_seconds:.0f} s"
        )


def _size(count: int) -> str:
    return f"{count / 2**20:.1f} MiB" if count >= 2**20 else f"{count // 1024} KiB"


def _frozen_data(value: Mapping[str, Any] | None) -> Mapping[str, Any]:
    # A read-only deep copy: the record must not change when the caller's dict does.
    return types.MappingProxyType(_copied(dict(value or {})))


def _copied(value: Any) -> Any:
    """A deep copy of *value*: JSON's values by hand (an event's few members: a third of
    copy.deepcopy's time), anything else by copy.deepcopy."""
    kind = type(value)
    if kind is dict:
        return {key: _copied(item) for key, item in value.items()}
    if kind is list:
        return [_copied(item) for item in value]
    if kind in _IMMUTABLE:
        return value
    return copy.deepcopy(value)


_IMMUTABLE = frozenset({str, int, float, bool, type(None)})


def _optional_cause(value: Cause | str | None) -> Cause | None:
    return None if value is None else Cause(value)


def _optional_stage(value: Stage | str | None) -> Stage | None:
    return None if value is None else Stage(value)


@attrs.frozen
class EventRecord:
    """One QMP event as QEMU sent it.

    :ivar event: the event's name, e.g. ``"SHUTDOWN"``.
    :ivar timestamp: QEMU's timestamp, float seconds since the epoch.
    :ivar data: the event's ``data`` member (empty when it had none).
    """

    event: str
    timestamp: float
    data: Mapping[str, Any] = attrs.field(factory=dict, converter=_frozen_data, hash=False)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict with the keys ``event``, ``timestamp``, ``data``."""
        data = copy.deepcopy(dict(self.data))
        return {"event": self.event, "timestamp": self.timestamp, "data": data}


@attrs.frozen
class Step:
    """One rung tried, and how it went.

    :ivar stage: the rung.
    :ivar outcome: ``done``, ``timeout``, ``skipped`` or ``failed``.
    :ivar started: seconds from the call to the rung's start.
    :ivar ended: seconds from the call to the rung's end.
    :ivar detail: a short human-readable account.
    :ivar cause: what this step saw of why the guest would not go (a paused or
        sleeping guest, a monitor that did not answer, …), else None; the
        result's ``cause`` is the first one a step names.
    :ivar path: the file the step wrote (the PNG of a ``screenshot`` step, the
        state file of a ``save`` step), else None.
    """

    stage: Stage = attrs.field(converter=Stage)
    outcome: Outcome = attrs.field(converter=Outcome)
    started: float
    ended: float
    detail: str = ""
    cause: Cause | None = attrs.field(default=None, converter=_optional_cause)
    path: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict.

        Keys: ``stage``, ``outcome``, ``started_s``, ``ended_s``, ``detail``,
        ``cause``, ``path``.
        """
        return {
            "stage": self.stage.value,
            "outcome": self.outcome.value,
            "started_s": round(self.started, 6),
            "ended_s": round(self.ended, 6),
            "detail": self.detail,
            "cause": None if self.cause is None else self.cause.value,
            "path": self.path,
        }


def _optional_lines(value: Iterable[str] | None) -> tuple[str, ...] | None:
    return None if value is None else tuple(value)


def _events(value: Iterable[EventRecord]) -> tuple[EventRecord, ...]:
    return tuple(value)


def _steps(value: Iterable[Step]) -> tuple[Step, ...]:
    return tuple(value)


def _optional_users(value: Iterable[str] | None) -> tuple[str, ...] | None:
    return None if value is None else tuple(str(user) for user in value)


def _optional_findings(value: Iterable[Finding] | None) -> tuple[Finding, ...] | None:
    return None if value is None else tuple(value)


def is_forced(stage: Stage | None, graceful: bool) -> bool:
    """Whether the VM was ended by force rather than by its guest: the one definition.

    The verdict (:func:`~._verdict.decide`), :attr:`ShutdownResult.forced`, the
    record's evidence and the CLI's exit status all use it. A VM found already
    off, or gone before anything was sent (``already-off``), was never forced;
    neither was one whose guest powered itself off.
    """
    return stage is not None and stage is not Stage.ALREADY_OFF and not graceful


@attrs.frozen(kw_only=True)
class ShutdownResult:
    """What one shutdown did, and why it ended the way it did.

    :ivar stage: the rung that ended the VM (``already-off``, ``powerdown``,
        ``agent``, ``quit``, ``terminate``, ``kill``), or None when nothing ended it (only
        inside :class:`~qmpshutdown.ShutdownFailed`).
    :ivar graceful: True when the guest powered itself off (or was already off).
    :ivar reason: the ``reason`` of the first SHUTDOWN event seen, else None.
    :ivar presses: how many ``system_powerdown`` were sent.
    :ivar runstate: QEMU's runstate found on connecting (None if never read).
    :ivar cause: when the guest did not power itself off, or did so only when
        a later graceful rung asked (its agent after an ignored button), the
        likely why the earlier one failed.
    :ivar pid: QEMU's pid, if known.
    :ivar elapsed: seconds from the call to the confirmed end.
    :ivar events: every QMP event seen, in order.
    :ivar steps: each rung tried, in order.
    :ivar saved_state: the path of the file holding the guest's whole state
        when the ``save`` rung ended the VM (restore it with
        ``launch(argv, restore=PATH)``), else None.
    :ivar screenshot: the PNG of the guest's screen saved when it had to be
        forced (the last ``screenshot`` step's file; see ``evidence_dir``), else None.
    :ivar console_tail: the serial console's last lines when the VM had to be
        forced (``launch(console_log=True)``), else None.
    :ivar steps: each rung tried, in order (with the ``freeze`` and ``thaw`` steps).
    :ivar guest_os: the OS the guest agent named (``pretty-name``, else
        ``name``); None when no agent answered or it named no OS.
    :ivar guest_users: who was logged in, as the guest agent said; None when
        no agent answered, ``()`` when nobody was.
    :ivar activity: what the guest did while the graceful rungs waited (sampled
        when QEMU's pid is known), else None.
    :ivar diagnosis: what the guest said, through its agent, when asked why it had
        not gone (the ``diagnose`` step): a tuple of :class:`~qmpshutdown.Finding`;
        ``()`` when asked and nothing was found; None when not asked (no agent,
        ``diagnose=False``, or the guest went before it had to be asked).
    """

    stage: Stage | None = attrs.field(converter=_optional_stage)
    graceful: bool
    reason: str | None
    presses: int
    runstate: str | None
    cause: Cause | None = attrs.field(converter=_optional_cause)
    pid: int | None
    elapsed: float
    events: tuple[EventRecord, ...] = attrs.field(converter=_events)
    steps: tuple[Step, ...] = attrs.field(converter=_steps)
    saved_state: str | None = None
    screenshot: str | None = None
    console_tail: tuple[str, ...] | None = attrs.field(default=None, converter=_optional_lines)
    guest_os: str | None = None
    guest_users: tuple[str, ...] | None = attrs.field(default=None, converter=_optional_users)
    activity: Activity | None = None
    diagnosis: tuple[Finding, ...] | None = attrs.field(default=None, converter=_optional_findings)

    @property
    def forced(self) -> bool:
        """True when QEMU was ended by force (quit or a signal) rather than by its guest.

        Never for ``already-off`` (one definition: ``is_forced()``, which the verdict uses).
        """
        return is_forced(self.stage, self.graceful)

    def step(self, stage: Stage | str) -> Step | None:
        """Return the last step of the rung *stage*, or None if it was not tried."""
        for step in reversed(self.steps):
            if step.stage == stage:
                return step
        return None

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict of the whole record.

        Keys: ``stage``, ``graceful``, ``reason``, ``presses``, ``runstate``,
        ``cause``, ``pid``, ``elapsed_s``, ``events``, ``steps``, ``saved_state``,
        ``screenshot``, ``console_tail`` (a list of lines, or None), ``guest_os``,
        ``guest_users``, ``activity``, ``diagnosis`` (a list of dicts with
        ``kind``, ``detail`` and ``source``, or None).
        """
        return {
            "stage": None if self.stage is None else self.stage.value,
            "graceful": self.graceful,
            "reason": self.reason,
            "presses": self.presses,
            "runstate": self.runstate,
            "cause": None if self.cause is None else self.cause.value,
            "pid": self.pid,
            "elapsed_s": round(self.elapsed, 6),
            "events": [event.to_dict() for event in self.events],
            "steps": [step.to_dict() for step in self.steps],
            "saved_state": self.saved_state,
            "screenshot": self.screenshot,
            "console_tail": None if self.console_tail is None else list(self.console_tail),
            "guest_os": self.guest_os,
            "guest_users": None if self.guest_users is None else list(self.guest_users),
            "activity": None if self.activity is None else self.activity.to_dict(),
            "diagnosis": (
                None if self.diagnosis is None else [f.to_dict() for f in self.diagnosis]
            ),
        }

    def summary(self) -> str:
        """Return one line: the rung, reason, presses, elapsed time and cause."""
        stage = "still running" if self.stage is None else self.stage.value
        parts = [
            stage,
            _how(self),
            f"reason={self.reason or '-'}",
            f"presses={self.presses}",
            f"elapsed={self.elapsed:.2f}s",
            f"cause={self.cause.value if self.cause else '-'}",
        ]
        return " ".join(parts)


def _how(result: ShutdownResult) -> str:
    if result.graceful:
        return "graceful"
    if result.forced:
        return "forced"
    return "failed" if result.stage is None else "already off"
