"""The shutdown policy: how much force may be used, and how patiently."""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from typing import Any

import attrs


class Stage(str, enum.Enum):
    """A rung of the ladder, or how a VM was found.

    ``ALREADY_OFF`` is never a rung: it is the stage of a result whose guest
    was already powered off (runstate ``shutdown``) when the monitor was reached.
    ``SCREENSHOT`` is a step, not a rung: the guest's screen saved as evidence
    right before the first forced rung (see ``evidence_dir``).
    ``FREEZE`` and ``THAW`` are never rungs either: they are steps the ladder
    records around force (a policy cannot list them). Nor is ``DIAGNOSE``: the
    step that asks the guest, through its agent, why a graceful rung did not
    end it (see ``ShutdownPolicy.diagnose``).
    """

    ALREADY_OFF = "already-off"
    POWERDOWN = "powerdown"
    AGENT = "agent"  #: ``guest-shutdown`` through the guest agent
    QUIT = "quit"
    SAVE = "save"
    TERMINATE = "terminate"
    KILL = "kill"
    SCREENSHOT = "screenshot"
    FREEZE = "freeze"  #: a step, not a rung: the guest's filesystems frozen before force
    THAW = "thaw"  #: a step, not a rung: the guest's filesystems thawed
    #: a step, not a rung: the guest asked through its agent why it has not gone
    DIAGNOSE = "diagnose"

    def __str__(self) -> str:
        return self.value


#: The rungs a policy may list, in the default order (the graceful two in either order).
RUNGS: tuple[Stage, ...] = (
    Stage.POWERDOWN, Stage.AGENT, Stage.SAVE, Stage.QUIT, Stage.TERMINATE, Stage.KILL,
)  # fmt: skip
#: The rungs of the default policy: all but ``save`` (it writes as much as the guest's RAM).
DEFAULT_STAGES: tuple[Stage, ...] = tuple(s for s in RUNGS if s is not Stage.SAVE)
#: The rungs that ask the guest to power itself off (the others end QEMU).
GRACEFUL_STAGES: frozenset[Stage] = frozenset({Stage.POWERDOWN, Stage.AGENT})


def _convert_stages(value: Any) -> tuple[Stage, ...]:
    if isinstance(value, (str, Stage)):
        value = (value,)
    try:
        items = tuple(value)
    except TypeError:
        raise ValueError(f"stages must be a sequence of stage names, not {value!r}") from None
    stages = []
    for item in items:
        try:
            stages.append(Stage(item))
        except ValueError:
            names = ", ".join(s.value for s in RUNGS)
            raise ValueError(f"unknown stage {item!r}; the rungs are {names}") from None
    return tuple(stages)


def _validate_stages(instance: Any, attribute: Any, value: tuple[Stage, ...]) -> None:
    if not value:
        raise ValueError("stages must name at least one rung")
    if Stage.ALREADY_OFF in value:
        raise ValueError("'already-off' is a result, not a rung")
    for stage in value:
        if stage not in RUNGS:
            names = ", ".join(s.value for s in RUNGS)
            raise ValueError(f"{stage.value!r} is a step, not a rung; the rungs are {names}")
    if len(set(value)) != len(value):
        raise ValueError(f"stages must not repeat a rung: {[s.value for s in value]}")
    # The graceful rungs come first, in either order; the forced ones after them, in order.
    order = [0 if s in GRACEFUL_STAGES else RUNGS.index(s) for s in value]
    if order != sorted(order):
        raise ValueError(
            "stages must keep the ladder's order: powerdown and agent (either first), "
            f"then save, quit, terminate, kill; got {[s.value for s in value]}"
        )


def _positive(unit: str) -> Callable[[Any, Any, float], None]:
    """A validator: a finite number > 0 (of *unit*, e.g. "seconds"; "" for a plain number)."""
    what = f"number of {unit}" if unit else "number"

    def check(instance: Any, attribute: Any, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{attribute.name} must be a {what}, not {value!r}")
        try:
            finite = math.isfinite(value)
        except OverflowError:  # an int too large for a float
            finite = False
        if not finite or value <= 0:
            raise ValueError(f"{attribute.name} must be a finite {what} > 0, not {value!r}")

    return check


_seconds = _positive("seconds")
_rate = _positive("")


def _optional_seconds(instance: Any, attribute: Any, value: float | None) -> None:
    if value is not None:
        _seconds(instance, attribute, value)


class Patience(str, enum.Enum):
    """How a graceful rung waits for the guest (``ShutdownPolicy.patience``)."""

    FIXED = "fixed"  #: wait ``powerdown_timeout``, whatever the guest does
    ADAPTIVE = "adaptive"  #: wait on while the guest works, give up early when it idles

    def __str__(self) -> str:
        return self.value


#: The patiences a policy may name.
PATIENCES = tuple(p.value for p in Patience)


def _convert_patience(value: Any) -> Patience:
    try:
        return Patience(value)
    except ValueError:
        raise ValueError(f"patience must be 'fixed' or 'adaptive', not {value!r}") from None


def _flag(instance: Any, attribute: Any, value: bool) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{attribute.name} must be True or False, not {value!r}")


@attrs.frozen(kw_only=True)
class ShutdownPolicy:
    """How to stop a VM: which rungs may be used, and how long each may take.

    Frozen and validated: a value that makes no sense raises ``ValueError`` at
    construction, and ``attrs.evolve(policy, field=...)`` validates again.

    :param powerdown_timeout: seconds the guest gets to power itself off,
        counted from the first press of the power button.
    :param repress_interval: press again every this many seconds while waiting
        (a guest early in boot loses presses; some guests want a second one);
        None presses once.
    :param quit_timeout: seconds QEMU gets to exit after ``quit``.
    :param terminate_timeout: seconds after SIGTERM before SIGKILL.
    :param kill_timeout: seconds to wait for the exit after SIGKILL.
    :param connect_timeout: seconds for connect, greeting and capabilities.
    :param command_timeout: seconds for any single QMP command.
    :param stages: the rungs allowed, in ladder order; ``("powerdown",)``
        never uses force. The graceful rungs ``powerdown`` and ``agent`` may
        come in either order (``agent`` first asks the agent before pressing,
        as Proxmox does); ``agent`` is skipped (recorded) without an agent socket.
    :param wake_suspended: wake an S3-suspended guest (``system_wakeup``)
        before pressing; otherwise the press is skipped.
    :param resume_paused: ``cont`` a paused guest before pressing; otherwise
        the press is skipped (a press latched in a paused guest would power it
        off by surprise when it is resumed later).
    :param save_timeout: seconds the ``save`` rung gives QEMU to write the
        guest's whole state to its file (the rung is cancelled after that).
    :param agent_timeout: seconds the guest gets to power off after the
        agent's ``guest-shutdown``.
    :param freeze_before_force: when an agent answers, freeze the guest's
        filesystems (``guest-fsfreeze-freeze``) right before the first forced
        rung, so that they come back clean; a running guest is never left frozen.
    :param freeze_timeout: the longest a freeze may take (Windows' VSS itself
        gives up after 10 s).
    :param patience: a :class:`Patience` (or its value as a string): ``"fixed"``
        waits ``powerdown_timeout`` for the guest;
        ``"adaptive"`` reads the guest while it waits: it waits on while the guest
        works (CPU or disk), up to ``max_powerdown_timeout``, and escalates early
        once the guest has been idle for ``idle_cutoff`` after the press.
    :param max_powerdown_timeout: adaptive: the hard cap on waiting for the guest,
        counted from the first press (at least ``powerdown_timeout``).
    :param idle_cutoff: adaptive: escalate once the guest has done nothing for this
        long after the press (or since it last worked); a re-press gets
        ``min(idle_cutoff, repress_interval)`` to show a reaction.
    :param busy_cpu: vCPU time per second (run plus run-queue wait, the wait
        counted up to twice the run, summed over the vCPUs) at or above which the
        guest counts as working. Calibrated under TCG on 2 loaded cores: an idle
        guest reads 0.00 to 0.02, a working one 0.9 to 1.0 per busy vCPU, with or
        without another guest burning a core beside it.
    :param busy_io: bytes per second of block I/O (read plus written) at or above
        which the guest counts as working (idle guests read 0; an update writing
        with fsync reads ~0.5 MiB/s).
    :param sample_interval: seconds between readings of the guest while a
        graceful rung waits (under both patiences; the readings refine the cause).
    :param diagnose: when a graceful rung ends with the guest still running and
        an agent answers, ask the guest why (read-only commands through the
        agent's ``guest-exec``, chosen by its OS) before anything changes it: the
        ``diagnose`` step, at most once per ladder; its findings go into the
        result's ``diagnosis`` and, when they name a cause, into its ``cause``.
    :param diagnose_timeout: the longest the whole ``diagnose`` step may take (each
        command in it is also held to ``command_timeout``).
    """

    powerdown_timeout: float = attrs.field(default=60.0, validator=_seconds)
    repress_interval: float | None = attrs.field(default=10.0, validator=_optional_seconds)
    quit_timeout: float = attrs.field(default=30.0, validator=_seconds)
    terminate_timeout: float = attrs.field(default=10.0, validator=_seconds)
    kill_timeout: float = attrs.field(default=10.0, validator=_seconds)
    connect_timeout: float = attrs.field(default=5.0, validator=_seconds)
    command_timeout: float = attrs.field(default=5.0, validator=_seconds)
    stages: tuple[Stage, ...] = attrs.field(
        default=DEFAULT_STAGES, converter=_convert_stages, validator=_validate_stages
    )
    wake_suspended: bool = attrs.field(default=True, validator=_flag)
    resume_paused: bool = attrs.field(default=False, validator=_flag)
    save_timeout: float = attrs.field(default=120.0, validator=_seconds)
    agent_timeout: float = attrs.field(default=60.0, validator=_seconds)
    freeze_before_force: bool = attrs.field(default=True, validator=_flag)
    freeze_timeout: float = attrs.field(default=10.0, validator=_seconds)
    patience: Patience = attrs.field(default=Patience.FIXED, converter=_convert_patience)
    max_powerdown_timeout: float = attrs.field(default=600.0, validator=_seconds)
    idle_cutoff: float = attrs.field(default=15.0, validator=_seconds)
    busy_cpu: float = attrs.field(default=0.4, validator=_rate)
    busy_io: float = attrs.field(default=256 * 1024, validator=_rate)
    sample_interval: float = attrs.field(default=1.0, validator=_seconds)
    diagnose: bool = attrs.field(default=True, validator=_flag)
    diagnose_timeout: float = attrs.field(default=10.0, validator=_seconds)

    def __attrs_post_init__(self) -> None:
        adaptive = self.patience is Patience.ADAPTIVE
        if adaptive and self.max_powerdown_timeout < self.powerdown_timeout:
            raise ValueError(
                f"max_powerdown_timeout ({self.max_powerdown_timeout:g} s) must not be below "
                f"powerdown_timeout ({self.powerdown_timeout:g} s) under adaptive patience"
            )

    def allows(self, stage: Stage) -> bool:
        """Tell whether the rung *stage* may be used."""
        return stage in self.stages

    @property
    def may_signal(self) -> bool:
        """True when SIGTERM or SIGKILL may be sent."""
        return Stage.TERMINATE in self.stages or Stage.KILL in self.stages

    @property
    def bound(self) -> float:
        """The longest a ladder under this policy can take, in seconds.

        Connecting and the three commands around the rungs (the runstate on
        arrival, QEMU's last events, closing the monitor), plus the budget of
        every rung the policy allows (and of the steps before force when one of
        them is forced); the ladder holds each step to its budget (the table
        ``BUDGETS`` in this module says what each step spends).
        """
        return ARRIVAL.of(self) + sum(budget.of(self) for budget in step_budgets(self))

    @property
    def commands(self) -> int:
        """How many ``command_timeout`` s the bound counts (connecting aside)."""
        return ARRIVAL.commands + sum(budget.commands for budget in step_budgets(self))


#: The one default policy (every entry point's default).
DEFAULT_POLICY = ShutdownPolicy()


def with_save_rung(policy: ShutdownPolicy) -> ShutdownPolicy:
    """*policy* with the ``save`` rung where the ladder's order puts it (right before quit).

    What a save directory given without a list of rungs of its own means (the
    command's ``--save-dir``, the Ansible collection's ``save_dir``).
    """
    if Stage.SAVE in policy.stages:
        return policy
    return attrs.evolve(policy, stages=sorted((*policy.stages, Stage.SAVE), key=RUNGS.index))


def step_budgets(policy: ShutdownPolicy) -> list[Budget]:
    """The budget of each step the bound counts: the rungs, then the steps before force."""
    steps = [BUDGETS[stage] for stage in policy.stages]
    if policy.diagnose and any(stage in GRACEFUL_STAGES for stage in policy.stages):
        steps.append(BUDGETS[Stage.DIAGNOSE])
    if any(stage not in GRACEFUL_STAGES for stage in policy.stages):
        steps += [BUDGETS[stage] for stage in BEFORE_FORCE_STAGES]
    return steps


def wait_budget(policy: ShutdownPolicy, timeout: float) -> float:
    """The longest a graceful wait of *timeout* may last under *policy* (adaptive: the cap)."""
    if policy.patience is Patience.ADAPTIVE:
        return max(timeout, policy.max_powerdown_timeout)
    return timeout


# ---- budgets: what each step may spend, as data ------------------------------------


@attrs.frozen
class Wait:
    """One of the policy's timeouts, as the steps spend it.

    :ivar seconds: its value under a policy.
    :ivar shortened: a copy of a policy with it set to a number of seconds.
    :ivar reserve_share: its share of a fleet deadline's reserve for everything but
        the graceful waits (``shutdown_many(deadline=)``); None for a graceful wait,
        which gets what the reserve leaves, and for ``command_timeout``, which
        shares what the others leave among the commands the bound counts.
    """

    seconds: Callable[[ShutdownPolicy], float]
    shortened: Callable[[ShutdownPolicy, float], ShutdownPolicy]
    reserve_share: float | None = None


CONNECT = Wait(lambda p: p.connect_timeout, lambda p, s: attrs.evolve(p, connect_timeout=s), 0.15)
COMMAND = Wait(lambda p: p.command_timeout, lambda p, s: attrs.evolve(p, command_timeout=s))
POWERDOWN = Wait(lambda p: p.powerdown_timeout, lambda p, s: attrs.evolve(p, powerdown_timeout=s))
AGENT = Wait(lambda p: p.agent_timeout, lambda p, s: attrs.evolve(p, agent_timeout=s))
SAVE = Wait(lambda p: p.save_timeout, lambda p, s: attrs.evolve(p, save_timeout=s), 0.05)
QUIT = Wait(lambda p: p.quit_timeout, lambda p, s: attrs.evolve(p, quit_timeout=s), 0.1)
TERMINATE = Wait(
    lambda p: p.terminate_timeout, lambda p, s: attrs.evolve(p, terminate_timeout=s), 0.05
)
KILL = Wait(lambda p: p.kill_timeout, lambda p, s: attrs.evolve(p, kill_timeout=s), 0.05)
FREEZE = Wait(lambda p: p.freeze_timeout, lambda p, s: attrs.evolve(p, freeze_timeout=s), 0.05)
DIAGNOSE = Wait(
    lambda p: p.diagnose_timeout, lambda p, s: attrs.evolve(p, diagnose_timeout=s), 0.05
)

#: Every timeout, in the order a fleet deadline shortens them.
WAITS: tuple[Wait, ...] = (
    CONNECT, COMMAND, POWERDOWN, AGENT, SAVE, QUIT, TERMINATE, KILL, FREEZE, DIAGNOSE,
)  # fmt: skip
#: The graceful waits, with the rung that spends each.
GRACEFUL_WAITS: tuple[tuple[Stage, Wait], ...] = (
    (Stage.POWERDOWN, POWERDOWN),
    (Stage.AGENT, AGENT),
)


@attrs.frozen
class Budget:
    """What one step may spend: a number of commands (each ``command_timeout``) and waits.

    :ivar commands: the QMP (or agent) commands it may send.
    :ivar waits: the policy's timeouts it may wait out.
    :ivar patient: its first wait is a graceful one that adaptive patience may
        stretch to ``max_powerdown_timeout`` (:func:`wait_budget`).
    """

    commands: int
    waits: tuple[Wait, ...] = ()
    patient: bool = False

    def of(self, policy: ShutdownPolicy) -> float:
        """The budget in seconds under *policy*."""
        waits = [wait.seconds(policy) for wait in self.waits]
        if self.patient and waits:
            waits[0] = wait_budget(policy, waits[0])
        return self.commands * policy.command_timeout + sum(waits)


#: Connecting, then the runstate on arrival, QEMU's last events and closing the monitor.
ARRIVAL = Budget(3, (CONNECT,))
#: Each step's budget. The power button: a press sent at the deadline, then confirming the
#: power-off. The agent: the probe, osinfo, users, fsfreeze-status, a thaw (its own three),
#: guest-shutdown and confirming the power-off. Save: query-status, the memory size,
#: capabilities, getfd, migrate, then migrate_cancel or the last query-migrate, and quit.
#: The screenshot: one before force, one more when the ladder ends with QEMU running. The
#: freeze: reaching the agent (connect and resync), then the freeze itself. The diagnosis:
#: everything it does (reaching the agent, each question) within ``diagnose_timeout``.
BUDGETS: dict[Stage, Budget] = {
    # The power button's two, and two more: the reboot action set before the first press and
    # put back when the ladder ends with QEMU running (_rungs/reboot.py).
    Stage.POWERDOWN: Budget(4, (POWERDOWN,), patient=True),
    Stage.AGENT: Budget(9, (AGENT,)),
    Stage.SAVE: Budget(7, (SAVE, QUIT)),
    Stage.QUIT: Budget(1, (QUIT,)),
    Stage.TERMINATE: Budget(0, (TERMINATE,)),
    Stage.KILL: Budget(0, (KILL,)),
    Stage.SCREENSHOT: Budget(2),
    Stage.FREEZE: Budget(1, (FREEZE,)),
    Stage.DIAGNOSE: Budget(0, (DIAGNOSE,)),
}
#: The steps that run right before the first forced rung, in order (the screenshot first,
#: so that it shows the guest as it was; the freeze last).
BEFORE_FORCE_STAGES: tuple[Stage, ...] = (Stage.SCREENSHOT, Stage.FREEZE)
#: The rungs that end QEMU rather than ask its guest.
FORCED_STAGES: frozenset[Stage] = frozenset(RUNGS) - GRACEFUL_STAGES
