"""``shutdown_many()``: stop many VMs at once; one's failure never stops the others."""

from __future__ import annotations

import contextlib
import logging
import os
from collections import Counter
from collections.abc import Sequence
from typing import Any

import anyio

from ._arguments import check_address, check_evidence_dir, check_save_dir
from ._errors import ConnectError, Error, PidMismatchError
from ._fleet import Job, check_deadline, fit_policy, ladder_capacity
from ._policy import ShutdownPolicy
from ._process import out_of_descriptors
from ._progress import ProgressCallback
from ._result import ShutdownResult
from ._shutdown import Target, shutdown, stop_at

logger = logging.getLogger("qmpshutdown")

_DEFAULT_POLICY = ShutdownPolicy()
#: How long a VM refused for want of descriptors waits for another ladder to end,
#: and how many such waits with no ladder ending it sits out before giving up.
_RETRY_WAIT = 1.0
_IDLE_RETRIES = 3


async def shutdown_many(
    targets: Sequence[Target | Job],
    policy: ShutdownPolicy = _DEFAULT_POLICY,
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
    jobs = [item if isinstance(item, Job) else Job(item) for item in targets]
    if not isinstance(policy, ShutdownPolicy):
        raise TypeError(f"policy must be a ShutdownPolicy, not {type(policy).__name__}")
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
            results[index] = await _stop_in_turn(job, job.policy or policy)
        except Error as err:
            results[index] = err
        except Exception as err:  # a bug must not stop the other VMs, nor leak a group
            logger.exception("unexpected error stopping %r", job.target)
            wrapped = Error(f"unexpected {type(err).__name__}: {err}")
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
                    keep = job.save_dir or save_dir
                    return await _stop_job(job, fitted, on_progress, keep, evidence_dir)
                except (ConnectError, PidMismatchError) as err:
                    if not out_of_descriptors(err):
                        raise
                    if idle >= _IDLE_RETRIES:
                        why = f"not stopped: this process is out of open files: {err}"
                        raise Error(why) from err
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


async def _stop_job(
    job: Job,
    policy: ShutdownPolicy,
    on_progress: ProgressCallback | None,
    save_dir: str | os.PathLike[str] | None,
    evidence_dir: str | os.PathLike[str] | None,
) -> ShutdownResult:
    extra: dict[str, Any] = {} if job.agent is None else {"agent": job.agent}
    if job.label is None:
        return await shutdown(
            job.target, policy, job.pid, on_progress=on_progress, save_dir=save_dir,
            evidence_dir=evidence_dir, **extra,
        )  # fmt: skip
    # A name is the ladder's own (stop_at); shutdown() names a VM by its address.
    return await stop_at(
        check_address(job.target), policy, pid=job.pid, started=anyio.current_time(),
        name=job.label, on_progress=on_progress, save_dir=check_save_dir(save_dir),
        evidence_dir=check_evidence_dir(evidence_dir),
        agent=None if job.agent is None else os.fspath(job.agent),
    )  # fmt: skip
