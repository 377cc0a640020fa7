"""``shutdown_many()``: a fleet of VMs, one deadline for all, and our own descriptors.

One :class:`~._job.Job` per VM (its own policy, pid, agent, name, group, ...);
two pieces that keep a fleet within its limits:

- :func:`fit_policy`: a policy shortened so that its ladder ends by a deadline;
- :func:`ladder_capacity`: how many ladders may run at once with the open
  files this process may hold (raising the soft ``RLIMIT_NOFILE`` first when
  the fleet needs it), so that our own limit never costs a VM its stop.

One VM's failure never stops the others.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import resource
from collections import Counter
from collections.abc import Sequence

import anyio
import attrs

from ._attach import stop
from ._errors import ConnectError, DescriptorsExhausted, Error, InternalError, PidMismatchError
from ._job import Job, Target
from ._policy import (
    COMMAND,
    DEFAULT_POLICY,
    DIAGNOSE,
    GRACEFUL_WAITS,
    POWERDOWN,
    WAITS,
    Patience,
    ShutdownPolicy,
    Stage,
    Wait,
    wait_budget,
)
from ._process import out_of_descriptors
from ._progress import ProgressCallback
from ._result import ShutdownResult

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
#: How long a VM refused for want of descriptors waits for another ladder to end,
#: and how many such waits with no ladder ending it sits out before giving up.
_RETRY_WAIT = 1.0
_IDLE_RETRIES = 3


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
    (*agent* False) the ``agent`` rung and the diagnosis are left out (they would
    only be skipped),
    and everything but the graceful waits is held to a reserve of
    ``min(FORCED_RESERVE, left / 4)`` seconds: if the policy's own timeouts take
    more, each is cut to its share of the reserve (``reserve_share`` in the
    policy module's table of timeouts; the commands share the rest; ``quit``
    ends QEMU within milliseconds, signals as fast). The graceful waits
    (``powerdown_timeout``, and ``agent_timeout`` when the agent rung stays;
    halves each when both do; under adaptive patience the button's wait is its
    cap, ``max_powerdown_timeout``, which is held to the share, and
    ``powerdown_timeout`` to no more than the cap) then get all the rest, never
    more than the policy's own: a cooperative guest has nearly all of *left* to power itself
    off. *left* below :data:`MIN_LEFT` counts as :data:`MIN_LEFT`.

    :return: the policy, or a shortened copy (``attrs.evolve``, validated again).
    """
    if policy.bound <= left:
        return policy
    if not agent and policy.diagnose:
        policy = attrs.evolve(policy, diagnose=False)  # nothing to ask without an agent
    if not agent and Stage.AGENT in policy.stages and len(policy.stages) > 1:
        policy = attrs.evolve(policy, stages=[s for s in policy.stages if s is not Stage.AGENT])
    if policy.bound <= left:
        return policy
    left = max(left, MIN_LEFT)
    reserve = min(FORCED_RESERVE, left / 4)
    waits = [wait for stage, wait in GRACEFUL_WAITS if policy.allows(stage)]

    def overhead(p: ShutdownPolicy) -> float:
        return p.bound - sum(_graceful(p, wait) for wait in waits)

    if overhead(policy) > reserve:
        shared = [wait for wait in WAITS if wait.reserve_share is not None
                  and (wait is not DIAGNOSE or policy.diagnose)]  # fmt: skip
        spare = 1.0 - sum(wait.reserve_share or 0.0 for wait in shared)
        per_command = min(policy.command_timeout, spare * reserve / max(policy.commands, 1))
        for wait in shared:
            share = (wait.reserve_share or 0.0) * reserve
            policy = wait.shortened(policy, min(wait.seconds(policy), share))
        policy = COMMAND.shortened(policy, per_command)
    if waits:
        share = (left - overhead(policy)) / len(waits)
        for wait in waits:
            policy = _shorten_graceful(policy, wait, share)
    return policy


def _graceful(policy: ShutdownPolicy, wait: Wait) -> float:
    """What a graceful wait may last as the bound counts it (adaptive: the button's cap)."""
    seconds = wait.seconds(policy)
    return wait_budget(policy, seconds) if wait is POWERDOWN else seconds


def _shorten_graceful(policy: ShutdownPolicy, wait: Wait, share: float) -> ShutdownPolicy:
    """*policy* with the graceful *wait* held to *share* seconds (adaptive: its cap too)."""
    if wait is POWERDOWN and policy.patience is Patience.ADAPTIVE:
        cap = min(policy.max_powerdown_timeout, share)
        return attrs.evolve(policy, powerdown_timeout=min(policy.powerdown_timeout, cap),
                            max_powerdown_timeout=cap)  # fmt: skip
    return wait.shortened(policy, min(wait.seconds(policy), share))


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


async def shutdown_many(
    targets: Sequence[Target | Job],
    policy: ShutdownPolicy = DEFAULT_POLICY,
    limit: int | None = None,
    *,
    on_progress: ProgressCallback | None = None,
    deadline: float | None = None,
    save_dir: str | os.PathLike[str] | None = None,
    evidence_dir: str | os.PathLike[str] | None = None,
) -> list[ShutdownResult | Error]:
    """Stop every target concurrently, at most *limit* at a time when given.

    Groups (``Job.group``) go in ascending order: every VM of a group is
    done (or failed) before the next group starts; inside a group the VMs are
    stopped concurrently. One VM's failure never stops its group or the next.

    No more ladders run at once than this process's open files allow (each
    holds a socket, a spare of it and a pidfd): the soft ``RLIMIT_NOFILE`` is raised toward
    the hard limit when needed (logged), the other VMs wait their turn, and a
    VM refused for want of descriptors is retried once another ladder ended,
    never reported as unreachable.

    With a *deadline*, each VM's policy is shortened as its ladder starts so
    that its :attr:`~ShutdownPolicy.bound` fits the time left (the graceful
    wait ends early enough to leave a reserve of at most 2 s for the forced
    rungs, whose own timeouts shrink to fit it; see the README). A VM still
    running at the end is a :class:`ShutdownFailed` with its record.

    :param targets: what :func:`shutdown` accepts, or :class:`Job`\\ s, or a mix; one per VM.
    :param policy: the policy of every VM whose :class:`Job` names none.
    :param limit: the most ladders running at once; None runs all at once.
    :param on_progress: called with every VM's :class:`Progress` updates
        (``target`` tells them apart).
    :param evidence_dir: see :func:`shutdown`; one file per target that had
        to be forced, each named after its target.
    :param save_dir: see :func:`shutdown` (each VM's state gets its own file).
    :param deadline: seconds from this call by which every VM must be done
        (off gracefully, or forced), all groups included; None: no deadline.
    :raises TypeError: a target is not a path, ``(host, port)``, QMPClient or
        Job (ValueError for a port out of range) (checked before anything starts).
    :raises ValueError: *limit* is not a positive int, or *deadline* not a
        finite number of seconds > 0.
    :return: in the targets' order, each a :class:`ShutdownResult` or the
        :class:`Error` that target raised (a :class:`ShutdownFailed` carries
        its own ``.result``).
    """
    started = anyio.current_time()
    if not isinstance(policy, ShutdownPolicy):
        raise TypeError(f"policy must be a ShutdownPolicy, not {type(policy).__name__}")
    jobs = [
        (item if isinstance(item, Job) else Job(item)).under(
            policy, save_dir=save_dir, evidence_dir=evidence_dir
        )
        for item in targets
    ]
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int or None, not {limit!r}")
    seconds = check_deadline(deadline)
    ends_at = None if seconds is None else started + seconds
    sizes = Counter(job.group for job in jobs)
    largest = max(sizes.values(), default=0)
    capacity = ladder_capacity(min(limit or largest, largest))
    # No limiter when all of the largest group may run at once: nothing to wait for.
    limiter = anyio.CapacityLimiter(capacity) if capacity < largest else None
    turns = _Turns()
    results: list[ShutdownResult | Error | None] = [None] * len(jobs)

    async def stop_one(index: int, job: Job) -> None:
        try:
            results[index] = await _stop_in_turn(job, job.the_policy)
        except Error as err:
            results[index] = err
        except Exception as err:  # a bug must not stop the other VMs, nor leak a group
            logger.exception("unexpected error stopping %r", job.target)
            wrapped = InternalError(f"unexpected {type(err).__name__}: {err}")
            wrapped.__cause__ = err
            results[index] = wrapped

    async def _stop_in_turn(job: Job, job_policy: ShutdownPolicy) -> ShutdownResult:
        idle = 0
        while True:
            async with limiter if limiter is not None else contextlib.nullcontext():
                fitted = job_policy
                if ends_at is not None:
                    fitted = fit_policy(
                        job_policy, ends_at - anyio.current_time(), agent=job.agent is not None
                    )
                turns.running += 1
                try:
                    own = attrs.evolve(job, policy=fitted)
                    return await stop(own, started=anyio.current_time(), on_progress=on_progress)
                except (ConnectError, PidMismatchError) as err:
                    if not out_of_descriptors(err):
                        raise
                    if idle >= _IDLE_RETRIES:
                        why = f"not stopped: this process is out of open files: {err}"
                        raise DescriptorsExhausted(why) from err
                    logger.warning("%s; trying again once another VM is done", err)
                finally:
                    turns.running -= 1
                    turns.ended()
            idle = 0 if await turns.wait_for_one(_RETRY_WAIT) else idle + 1

    for group in sorted(sizes):
        if len(sizes) > 1:
            logger.info("group %d: stopping %d VMs", group, sizes[group])
        async with anyio.create_task_group() as tg:
            for index, job in enumerate(jobs):
                if job.group == group:
                    tg.start_soon(stop_one, index, job)
    done = [result for result in results if result is not None]
    assert len(done) == len(jobs), "every target has its result, in order"
    return done


class _Turns:
    """How many ladders run now, and a way to wait for the next one to end."""

    def __init__(self) -> None:
        self.running = 0
        self._ended = anyio.Event()

    def ended(self) -> None:
        self._ended.set()
        self._ended = anyio.Event()

    async def wait_for_one(self, limit: float) -> bool:
        """Wait (at most *limit* s) for a ladder to end; tell whether one did."""
        if self.running == 0:
            await anyio.sleep(min(limit, 0.1))
            return False
        with anyio.move_on_after(limit):
            await self._ended.wait()
            return True
        return False
