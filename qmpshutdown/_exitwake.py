"""A stalled exit, woken: after its guest's SHUTDOWN, QEMU's exit can wait for a wake-up
it missed, until a signal comes (seen on QEMU 10.0 and 7.2: docs/why.md).

Its main thread waits in ``monitor_cleanup()`` for QMP's dispatcher to end, in a poll
without timeout. SIGTERM's handler only asks for the exit that has already begun, and
wakes that poll (0.01 s here). So a QEMU not gone ``command_timeout`` after its guest's
SHUTDOWN gets a SIGTERM where nothing else can come of it (no command: one read late can
crash QEMU 10.0 in that window), then ``quit_timeout`` for its exit.
"""

from __future__ import annotations

import signal
from collections.abc import Awaitable, Callable

import anyio

from ._policy import ShutdownPolicy, Stage
from ._process import Process
from ._qemuargs import shutdown_action


def waker(policy: ShutdownPolicy, process: Process | None, running: bool) -> Process | None:
    """The process to wake with SIGTERM, or None where SIGTERM could end more than an exit.

    :param running: the process runs (not stopped: SIGSTOP, a debugger).
    :return: None when the plan has no ``terminate``, the process is stopped or unknown,
        or its command line keeps QEMU once its guest is off (``-no-shutdown``,
        ``-action shutdown=pause``) or cannot be read.
    """
    if process is None or not running or Stage.TERMINATE not in policy.stages:
        return None
    read = getattr(process, "command_line", None)  # a caller's Process may lack it
    argv = None if read is None else read()
    return process if argv is not None and shutdown_action(argv) == "poweroff" else None


async def wait_or_wake(
    wait_until: Callable[[float], Awaitable[bool]],
    seconds: float,
    process: Process | None,
    say: Callable[[str], None],
) -> str:
    """Wait up to *seconds* for the exit, waking *process* (if any) with SIGTERM first.

    :param wait_until: waits for the exit until a deadline (anyio clock); tells whether it came.
    :return: ``"exited"``, ``"woken"`` (it came after the SIGTERM) or ``"stalled"``.
    """
    deadline = anyio.current_time() + seconds
    if process is None:
        return "exited" if await wait_until(deadline) else "stalled"
    process.send_signal(signal.SIGTERM)
    say("QEMU's exit stalled after the guest's SHUTDOWN: sent SIGTERM")
    return "woken" if await wait_until(deadline) else "stalled"
