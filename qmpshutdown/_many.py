"""``shutdown_many()``: stop many VMs at once; one's failure never stops the others."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Sequence

import anyio

from ._errors import Error
from ._policy import ShutdownPolicy
from ._progress import ProgressCallback
from ._result import ShutdownResult
from ._shutdown import Target, check_target, shutdown

logger = logging.getLogger("qmpshutdown")

_DEFAULT_POLICY = ShutdownPolicy()


async def shutdown_many(
    targets: Sequence[Target],
    policy: ShutdownPolicy = _DEFAULT_POLICY,
    limit: int | None = None,
    *,
    on_progress: ProgressCallback | None = None,
    evidence_dir: str | os.PathLike[str] | None = None,
) -> list[ShutdownResult | Error]:
    """Stop every target concurrently, at most *limit* at a time when given.

    :param targets: what :func:`shutdown` accepts, one per VM.
    :param policy: the policy for every VM.
    :param limit: the most ladders running at once; None runs all at once.
    :param on_progress: called with every VM's :class:`Progress` updates
        (``target`` tells them apart).
    :param evidence_dir: see :func:`shutdown`; one file per target that had
        to be forced, each named after its target.
    :raises TypeError: a target is not a path, ``(host, port)`` or QMPClient
        (ValueError for a port out of range)
        (checked before anything starts).
    :raises ValueError: *limit* is not a positive int.
    :return: in the targets' order, each a :class:`ShutdownResult` or the
        :class:`Error` that target raised (a :class:`ShutdownFailed` carries
        its own ``.result``).
    """
    targets = list(targets)
    for target in targets:
        check_target(target)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int or None, not {limit!r}")
    limiter = anyio.CapacityLimiter(limit) if limit is not None else None
    results: list[ShutdownResult | Error | None] = [None] * len(targets)

    async def stop_one(index: int, target: Target) -> None:
        async with limiter if limiter is not None else contextlib.nullcontext():
            try:
                results[index] = await shutdown(
                    target, policy, on_progress=on_progress, evidence_dir=evidence_dir
                )
            except Error as err:
                results[index] = err
            except Exception as err:  # a bug must not stop the other VMs, nor leak a group
                logger.exception("unexpected error stopping %r", target)
                wrapped = Error(f"unexpected {type(err).__name__}: {err}")
                wrapped.__cause__ = err
                results[index] = wrapped

    async with anyio.create_task_group() as tg:
        for index, target in enumerate(targets):
            tg.start_soon(stop_one, index, target)
    done = [result for result in results if result is not None]
    assert len(done) == len(targets), "every target has its result, in order"
    return done
