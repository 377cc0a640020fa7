"""What QEMU has said so far: its events, read into the state the ladder waits on."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import anyio

from ._result import EventRecord

logger = logging.getLogger("qmpshutdown")


class Watch:
    """What the events and the process have said so far; wakes waiters on every change."""

    def __init__(self, runstate: str | None = None) -> None:
        self.events: list[EventRecord] = []
        self.first_shutdown: Mapping[str, Any] | None = None
        self.stopped_after_shutdown = False
        self.suspended = runstate == "suspended"
        self.slept = self.suspended
        self.panicked = False
        self.panic_stays = False
        self.resets = 0
        self.gone = anyio.Event()
        self.gone_at: float | None = None
        self._changed = anyio.Event()

    def note(self, event: EventRecord) -> None:
        self.events.append(event)
        name, data = event.event, event.data
        if name == "SHUTDOWN" and self.first_shutdown is None:
            self.first_shutdown = data
        elif name == "STOP" and self.first_shutdown is not None:
            self.stopped_after_shutdown = True  # -no-shutdown: runstate is now 'shutdown'
        elif name == "SUSPEND":
            self.suspended = self.slept = True
        elif name == "WAKEUP":
            self.suspended = False
        elif name == "RESET" and data.get("guest", True):
            self.resets += 1
        elif name == "GUEST_PANICKED":
            # action "poweroff": QEMU shuts down by itself, SHUTDOWN guest-panic follows;
            # "pause" or "run": it stays, and nobody is there to answer the button.
            self.panicked = True
            self.panic_stays = data.get("action") != "poweroff"
        self.changed()

    def changed(self) -> None:
        changed, self._changed = self._changed, anyio.Event()
        changed.set()

    @property
    def guest_shut_down(self) -> bool:
        """True once the guest itself sent SHUTDOWN (powered off, reset under -no-reboot, panic)."""
        return self.first_shutdown is not None and bool(self.first_shutdown.get("guest"))

    @property
    def exit_begun(self) -> bool:
        """True once a SHUTDOWN came and no STOP after it: QEMU is in its exit (or done),
        where a command read late can crash QEMU 10.0 (docs/why.md); send it none."""
        return self.first_shutdown is not None and not self.stopped_after_shutdown

    @property
    def reason(self) -> str | None:
        if self.first_shutdown is None:
            return None
        reason = self.first_shutdown.get("reason")
        return str(reason) if reason is not None else None

    async def wait_until(self, predicate: Callable[[], bool], deadline: float) -> bool:
        """Wait for *predicate* to hold, until *deadline* (anyio clock); tell whether it held."""
        if predicate():
            return True
        with anyio.move_on_after(max(0.0, deadline - anyio.current_time())):
            while not predicate():
                await self._changed.wait()
        return predicate()


T = TypeVar("T")


async def race(gone: Callable[[], Awaitable[None]], work: Callable[[], Awaitable[T]]) -> T | None:
    """Run *work* until it returns, or until *gone* returns first; whichever ends cancels the other.

    The one exit race of the library: the ladder races its rungs against "QEMU
    is gone", ``launch()`` races connecting against QEMU exiting early.
    Exceptions of either side are raised as they are (never an ExceptionGroup);
    when both sides fail, the first is raised and the second logged as an error.

    :return: what *work* returned, or None when *gone* came first.
    """
    outcome: list[T] = []
    errors: list[Exception] = []

    async def run(side: Callable[[], Awaitable[Any]], keep: bool, scope: anyio.CancelScope) -> None:
        try:
            value = await side()
        except Exception as err:  # raised below, outside the task group
            errors.append(err)
        else:
            if keep:
                outcome.append(value)
        scope.cancel()

    async with anyio.create_task_group() as tg:
        tg.start_soon(run, work, True, tg.cancel_scope)
        tg.start_soon(run, gone, False, tg.cancel_scope)
    if len(errors) > 1:
        # Both sides failed: the first is raised; the second must not vanish without a word.
        logger.error("the other side of the race failed too: %r", errors[1], exc_info=errors[1])
    if errors:
        raise errors[0]
    return outcome[0] if outcome else None
