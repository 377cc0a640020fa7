"""A fleet of VMs: what one VM needs (:class:`Job`), one deadline for all, and our descriptors.

Three pieces that :func:`~qmpshutdown.shutdown_many` puts together:

- :class:`Job`: a target with its own policy, pid, name and group;
- :func:`fit_policy`: a policy shortened so that its ladder ends by a deadline;
- :func:`ladder_capacity`: how many ladders may run at once with the open
  files this process may hold (raising the soft ``RLIMIT_NOFILE`` first when
  the fleet needs it), so that our own limit never costs a VM its stop.
"""

from __future__ import annotations

import logging
import math
import os
import resource
from typing import Any

import attrs
from qemu.qmp import QMPClient

from ._arguments import check_target
from ._policy import ShutdownPolicy, Stage
from ._shutdown import Target

logger = logging.getLogger(__name__)

#: What one ladder holds open: the monitor's socket, a spare descriptor of it (its last
#: events survive a dropped connection) and QEMU's pidfd (measured in tests/test_fleet.py
#: from /proc/self/fd during a ladder).
FDS_PER_LADDER = 3
#: Descriptors left alone for everything else: the event loop's epoll and self-pipe,
#: stdio, logging files, and whatever the caller holds open besides.
FD_HEADROOM = 32

#: The most a deadline keeps back for everything but the graceful wait, in seconds.
FORCED_RESERVE = 2.0
#: A ladder that starts with less than this left is given this much (so it may end
#: up to this late): a VM is never left running for want of time.
MIN_LEFT = 0.5
#: Each timeout's share of the reserve when the policy's own ones do not fit in it;
#: ``command_timeout`` shares what is left among the commands the bound counts
#: (measured from the bound itself: the rungs and actions know how many they send).
RESERVE_SHARES: dict[str, float] = {
    "connect_timeout": 0.15,
    "quit_timeout": 0.1,
    "terminate_timeout": 0.05,
    "kill_timeout": 0.05,
    "freeze_timeout": 0.05,
    "save_timeout": 0.05,
}


def _target(instance: Any, attribute: Any, value: Any) -> None:
    check_target(value)  # TypeError / ValueError, as shutdown() would raise


def _policy(instance: Any, attribute: Any, value: Any) -> None:
    if value is not None and not isinstance(value, ShutdownPolicy):
        raise TypeError(f"policy must be a ShutdownPolicy or None, not {type(value).__name__}")


def _pid(instance: Any, attribute: Any, value: Any) -> None:
    if value is not None and (
        isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 2**31
    ):
        raise ValueError(f"pid must be a positive int (a Linux pid) or None, not {value!r}")


def _agent(instance: Any, attribute: Any, value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        raise TypeError(f"agent must be a guest agent socket path or None, not {value!r}")


def _name(instance: Any, attribute: Any, value: Any) -> None:
    if value is not None and (not isinstance(value, str) or not value):
        raise TypeError(f"name must be a non-empty str or None, not {value!r}")


def _group(instance: Any, attribute: Any, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"group must be an int >= 0, not {value!r}")


def _save_dir(instance: Any, attribute: Any, value: object) -> None:
    if value is not None and not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"save_dir must be a directory path or None, not {value!r}")


@attrs.frozen
class Job:
    """One VM of a fleet, with what it needs beyond the call's settings.

    :param target: what :func:`~qmpshutdown.shutdown` accepts.
    :param policy: this VM's policy; None uses the one given to ``shutdown_many()``.
    :param pid: QEMU's pid (see :func:`~qmpshutdown.shutdown`), e.g. for a TCP monitor.
    :param agent: the guest agent's socket, for the ``agent`` rung and the
        freeze before force (see :func:`~qmpshutdown.shutdown`).
    :param name: how progress, log lines and errors name the VM (default: the
        address; a QMPClient keeps its own name).
    :param save_dir: where this VM's ``save`` rung keeps its state (None: the
        one given to ``shutdown_many()``).
    :param group: the order of stopping: every VM of group 0 is done before
        group 1 starts, and so on.
    :raises TypeError, ValueError: a field that makes no sense (at construction).
    """

    target: Target = attrs.field(validator=_target)
    policy: ShutdownPolicy | None = attrs.field(default=None, kw_only=True, validator=_policy)
    pid: int | None = attrs.field(default=None, kw_only=True, validator=_pid)
    agent: str | os.PathLike[str] | None = attrs.field(default=None, kw_only=True, validator=_agent)
    name: str | None = attrs.field(default=None, kw_only=True, validator=_name)
    group: int = attrs.field(default=0, kw_only=True, validator=_group)
    save_dir: str | os.PathLike[str] | None = attrs.field(
        default=None, kw_only=True, validator=_save_dir
    )

    @property
    def label(self) -> str | None:
        """The name to give the ladder, when it can take one (not for a QMPClient)."""
        return None if isinstance(self.target, QMPClient) else self.name


def check_deadline(deadline: object) -> float | None:
    """Return *deadline* as seconds, or None; raise ValueError unless a finite number > 0."""
    if deadline is None:
        return None
    if isinstance(deadline, bool) or not isinstance(deadline, (int, float)):
        raise ValueError(f"deadline must be a number of seconds or None, not {deadline!r}")
    if not math.isfinite(deadline) or deadline <= 0:
        raise ValueError(f"deadline must be a finite number of seconds > 0, not {deadline!r}")
    return float(deadline)


def fit_policy(policy: ShutdownPolicy, left: float, *, agent: bool = True) -> ShutdownPolicy:
    """Shorten *policy* so that its ladder ends within *left* seconds (``bound <= left``).

    A policy that fits is returned as is. Otherwise, without an agent socket
    (*agent* False) the ``agent`` rung is left out (it would only be skipped),
    and everything but the graceful waits is held to a reserve of
    ``min(FORCED_RESERVE, left / 4)`` seconds: if the policy's own timeouts take
    more, each is cut to its share of the reserve (:data:`RESERVE_SHARES`; the
    commands share the rest; ``quit`` ends QEMU within milliseconds, signals as
    fast). The graceful waits (``powerdown_timeout``, and ``agent_timeout`` when
    the agent rung stays; halves each when both do) then get all the rest,
    never more than the policy's own: a cooperative guest has nearly all of
    *left* to power itself off. *left* below :data:`MIN_LEFT` counts as
    :data:`MIN_LEFT`.

    :return: the policy, or a shortened copy (``attrs.evolve``, validated again).
    """
    if policy.bound <= left:
        return policy
    if not agent and Stage.AGENT in policy.stages and len(policy.stages) > 1:
        policy = attrs.evolve(policy, stages=[s for s in policy.stages if s is not Stage.AGENT])
        if policy.bound <= left:
            return policy
    left = max(left, MIN_LEFT)
    reserve = min(FORCED_RESERVE, left / 4)
    graceful = (("powerdown_timeout", Stage.POWERDOWN), ("agent_timeout", Stage.AGENT))
    waits = [field for field, stage in graceful if policy.allows(stage)]

    def overhead(p: ShutdownPolicy) -> float:
        return float(p.bound - sum(getattr(p, f) for f in waits))

    if overhead(policy) > reserve:
        commands = attrs.evolve(policy, command_timeout=policy.command_timeout + 1.0)
        count = round(commands.bound - policy.bound)  # how many commands the bound counts
        cuts = {f: min(getattr(policy, f), share * reserve) for f, share in RESERVE_SHARES.items()}
        spare = 1.0 - sum(RESERVE_SHARES.values())
        cuts["command_timeout"] = min(policy.command_timeout, spare * reserve / max(count, 1))
        policy = attrs.evolve(policy, **cuts)
    if waits:
        share = (left - overhead(policy)) / len(waits)
        policy = attrs.evolve(policy, **{f: min(getattr(policy, f), share) for f in waits})
    return policy


def open_descriptors() -> int:
    """How many file descriptors this process holds open now."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # listdir's own descriptor
    except OSError:
        return 0


def ladder_capacity(wanted: int) -> int:
    """How many ladders may run at once, at most *wanted*, within our open-file limit.

    When *wanted* ladders need more descriptors than the soft ``RLIMIT_NOFILE``
    allows, the soft limit is raised toward the hard one first (logged; it
    stays raised). Beyond that the answer is what the descriptors left allow
    (never less than 1): the other VMs wait their turn.
    """
    if wanted <= 0:
        return 1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    used = open_descriptors()
    needed = used + FD_HEADROOM + FDS_PER_LADDER * wanted
    if soft != resource.RLIM_INFINITY and needed > soft:
        raised = needed if hard == resource.RLIM_INFINITY else min(hard, needed)
        if raised > soft:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            except (OSError, ValueError) as err:
                logger.warning("cannot raise the soft limit of open files from %d: %s", soft, err)
            else:
                logger.info(
                    "raised the soft limit of open files (RLIMIT_NOFILE) from %d to %d "
                    "for %d VMs at once",
                    soft, raised, wanted,
                )  # fmt: skip
                soft = raised
    if soft == resource.RLIM_INFINITY:
        return wanted
    capacity = max(1, min(wanted, (soft - used - FD_HEADROOM) // FDS_PER_LADDER))
    if capacity < wanted:
        logger.warning(
            "open files limited to %d (hard limit %s): %d VMs stopped at a time, not %d",
            soft, "unlimited" if hard == resource.RLIM_INFINITY else hard, capacity, wanted,
        )  # fmt: skip
    return capacity
