"""``shutdown()`` and ``shutdown_sync()``: stop one VM, described by a :class:`Job` or keywords."""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Awaitable, Callable
from typing import Any, ParamSpec, TypeVar

import anyio
from qemu.qmp import QMPClient

from ._attach import stop
from ._job import Job, Target
from ._policy import DEFAULT_POLICY, ShutdownPolicy
from ._progress import ProgressCallback
from ._result import ShutdownResult

P = ParamSpec("P")
R = TypeVar("R")


def as_job(
    target: Target | Job,
    policy: ShutdownPolicy,
    pid: int | None,
    *,
    save_dir: str | os.PathLike[str] | None,
    evidence_dir: str | os.PathLike[str] | None,
    agent: str | os.PathLike[str] | None,
) -> Job:
    """The :class:`Job` a call describes: *target* itself, or one built from the keywords.

    :raises TypeError: a Job given together with per-VM keywords (say it in the Job),
        or an argument of the wrong type (before anything is sent).
    :raises ValueError: an argument out of range.
    """
    if not isinstance(policy, ShutdownPolicy):
        raise TypeError(f"policy must be a ShutdownPolicy, not {type(policy).__name__}")
    given = {
        "policy": policy is not DEFAULT_POLICY,
        "pid": pid is not None,
        "save_dir": save_dir is not None,
        "evidence_dir": evidence_dir is not None,
        "agent": agent is not None,
    }
    if isinstance(target, Job):
        extra = [name for name, is_given in given.items() if is_given]
        if extra:
            raise TypeError(
                f"a Job carries its VM's options: give {', '.join(extra)} in the Job, not as "
                "keywords too"
            )
        return target.under(DEFAULT_POLICY)
    if pid is not None and (
        isinstance(pid, bool) or not isinstance(pid, int) or not 0 < pid < 2**31
    ):
        raise ValueError(f"pid must be a positive int (a Linux pid), not {pid!r}")
    return Job(target, policy=policy, pid=pid, agent=agent, save_dir=save_dir,
               evidence_dir=evidence_dir)  # fmt: skip


async def shutdown(
    target: Target | Job,
    policy: ShutdownPolicy = DEFAULT_POLICY,
    pid: int | None = None,
    *,
    on_progress: ProgressCallback | None = None,
    save_dir: str | os.PathLike[str] | None = None,
    evidence_dir: str | os.PathLike[str] | None = None,
    agent: str | os.PathLike[str] | None = None,
) -> ShutdownResult:
    """Stop one VM with the least force that works, and say how it went.

    Press the ACPI power button (re-pressing while waiting), then, if the
    guest does not power itself off and the policy allows it, ``quit``,
    SIGTERM and SIGKILL, each with its timeout. The stop is complete when
    QEMU's process has exited (or, without a pid, when its monitor closed).

    :param target: a unix socket path, a ``(host, port)`` TCP monitor, an
        already connected :class:`qemu.qmp.QMPClient` (used as is and left
        open), or a :class:`Job` that carries the VM's options itself (then
        *policy*, *pid*, *save_dir*, *evidence_dir* and *agent* must not be given).
    :param policy: which rungs may be used and how long each may take.
    :param pid: QEMU's pid when the caller knows it (e.g. for a TCP monitor).
        For a unix socket the pid is read from the socket; a *pid* that
        differs is refused before anything is sent.
    :param on_progress: called with a :class:`Progress` as each thing happens
        (a step begins or ends, a QMP event arrives, QEMU is gone), in order,
        before this returns. It must be quick; if it raises, the error is
        logged once and the ladder goes on.
    :param save_dir: the directory where the ``save`` rung (when the policy's
        stages name it) keeps the guest's whole state in a new file (mode
        0600); without it that rung is skipped. The path is the result's
        ``saved_state``.
    :param evidence_dir: a directory (on QEMU's host, writable by QEMU) for a
        PNG of the guest's screen (QMP ``screendump``), taken right before the
        first forced rung and again if the ladder ends with QEMU still running;
        never on a graceful stop. Its path is ``result.screenshot``; the step
        ``screenshot`` says how it went (a failure never stops the ladder).
    :param agent: the unix socket of QEMU's chardev for the guest agent's
        virtio-serial port (``org.qemu.guest_agent.0``), or None. With it the
        ``agent`` rung asks the agent for ``guest-shutdown``, and the guest's
        filesystems are frozen before any forced rung (``freeze_before_force``).
    :raises TypeError: a :class:`Job` together with per-VM keywords, or an
        argument of the wrong type (nothing is sent).
    :raises ConnectError: no QMP monitor could be reached and there was no
        safe way to escalate (a peer that answers with anything but QMP, such
        as QEMU's human monitor, is never signalled).
    :raises PidMismatchError: *pid* is not the QEMU behind the monitor.
    :raises ShutdownFailed: the allowed rungs are used up and QEMU still runs;
        its ``.result`` holds the record.
    :return: the record: the rung that ended the VM, the reason, presses,
        every step and event.
    """
    job = as_job(target, policy, pid, save_dir=save_dir, evidence_dir=evidence_dir, agent=agent)
    return await stop(job, started=anyio.current_time(), on_progress=on_progress)


def _in_own_loop(
    async_fn: Callable[P, Awaitable[R]],
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Make the decorated stub run *async_fn* in an event loop of its own, with its parameters.

    The stub gives the name and the docstring; *async_fn* the signature (shown by
    ``inspect.signature`` and checked by type checkers), so the two never drift.
    """

    def decorate(stub: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(stub)
        def run(*args: P.args, **kwargs: P.kwargs) -> R:
            for given in (*args[:1], kwargs.get("target")):
                if isinstance(given, QMPClient) or (
                    isinstance(given, Job) and isinstance(given.target, QMPClient)
                ):
                    raise TypeError(
                        f"{stub.__name__}() cannot use a QMPClient; await the async one in its loop"
                    )
            call = functools.partial(async_fn, *args, **kwargs)
            return anyio.run(call, backend="asyncio")

        run.__signature__ = inspect.signature(async_fn)  # type: ignore[attr-defined]
        return run

    return decorate


@_in_own_loop(shutdown)
def shutdown_sync(*args: Any, **kwargs: Any) -> ShutdownResult:
    """Like :func:`shutdown`, for synchronous callers (runs its own event loop).

    Takes exactly :func:`shutdown`'s parameters. *target* is a unix socket path, a
    ``(host, port)`` TCP monitor or a :class:`Job` (a QMPClient belongs to an event
    loop of its own: use :func:`shutdown`); *on_progress* is called in this thread.

    :raises TypeError, ConnectError, PidMismatchError, ShutdownFailed: see :func:`shutdown`.
    :return: see :func:`shutdown`.
    """
    raise NotImplementedError  # pragma: no cover - replaced by the decorator
