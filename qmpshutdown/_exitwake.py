"""A stalled exit, woken: after its guest's SHUTDOWN (or ``quit``), QEMU's exit can wait
for a wake-up it missed, until a signal comes (seen on QEMU 10.0 and 7.2: docs/why.md).

Its main thread waits in ``monitor_cleanup()`` for QMP's dispatcher to end, in a poll
without timeout. SIGTERM's handler only asks for the exit that has already begun, and
wakes that poll (0.01 s here). So a QEMU not gone ``command_timeout`` after its guest's
SHUTDOWN gets a SIGTERM where nothing else can come of it (no command: one read late can
crash QEMU 10.0 in that window), then ``quit_timeout`` for its exit; one that answered
``quit`` gets it ``command_timeout`` into the ``quit_timeout`` it has for its exit.
"""

from __future__ import annotations

import signal
from collections.abc import Awaitable, Callable

import anyio

from ._policy import ShutdownPolicy, Stage
from ._process import Process, command_line_of
from ._qemuargs import shutdown_action


def waker(
    policy: ShutdownPolicy, process: Process | None, running: bool, *, quit_answered: bool = False
) -> Process | None:
    """The process to wake with SIGTERM, or None where SIGTERM could end more than an exit.

    :param running: the process runs (not stopped: SIGSTOP, a debugger).
    :param quit_answered: QEMU answered ``quit``, which ends it whatever its command line
        says; else the exit is the guest's SHUTDOWN's.
    :return: None when the plan has no ``terminate``, the process is stopped or unknown,
        or (after the guest's SHUTDOWN) its command line keeps QEMU once its guest is off
        (``-no-shutdown``, ``-action shutdown=pause``) or cannot be read.
    """
    if process is None or not running or Stage.TERMINATE not in policy.stages:
        return None
    return process if quit_answered or only_an_exit_follows(process) else None


def only_an_exit_follows(process: Process | None) -> bool:
    """True when QEMU's command line is known and ends QEMU once its guest is off (no
    ``-no-shutdown``, no ``-action shutdown=pause``): after the guest's SHUTDOWN, only its
    exit can follow, and no command need (or should) be sent into it."""
    argv = command_line_of(process)
    return argv is not None and shutdown_action(argv) == "poweroff"


async def wait_or_wake(
    wait_until: Callable[[float], Awaitable[bool]],
    seconds: float,
    process: Process | None,
    say: Callable[[str], None],
    *,
    wake_after: float = 0.0,
    began: str = "the guest's SHUTDOWN",
) -> str:
    """Wait up to *seconds* for the exit, waking *process* (if any) with SIGTERM after
    *wake_after* of them.

    :param wait_until: waits for the exit until a deadline (anyio clock); tells whether it came.
    :param began: what began the exit, for the line said with the SIGTERM.
    :return: ``"exited"``, ``"woken"`` (it came after the SIGTERM) or ``"stalled"``.
    """
    deadline = anyio.current_time() + seconds
    if process is None or wake_after >= seconds:  # no time left to wake it for
        return "exited" if await wait_until(deadline) else "stalled"
    if wake_after > 0 and await wait_until(deadline - seconds + wake_after):
        return "exited"
    process.send_signal(signal.SIGTERM)
    say(f"QEMU's exit stalled after {began}: sent SIGTERM")
    return "woken" if await wait_until(deadline) else "stalled"
