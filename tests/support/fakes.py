"""Fakes of the monitor and process seams, for cases a real QEMU gives only by luck.

They implement the same Protocols as the real seams (qmpshutdown.Monitor and
qmpshutdown.Process); a FakeQemu ties the two together and scripts the guest.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import anyio

from qmpshutdown import CommandError, EventRecord, MonitorClosedError

Handler = Callable[["FakeQemu", Mapping[str, object] | None], Awaitable[object]]


def _fire(callback: Callable[[], None], waiting: list[bool]) -> None:
    if waiting[0]:
        waiting[0] = False
        callback()


#: A fake QEMU's command line when none is given: QEMU's default reboot action (reset).
QEMU_ARGV = ("qemu-system-x86_64", "-nodefaults")


class FakeProcess:
    """A process that exits when told to, or on the signals it does not ignore.

    *argv* is its command line (``command_line()``); None: it cannot be read.
    """

    def __init__(
        self,
        pid: int = 4242,
        *,
        ignores: frozenset[int] = frozenset(),
        stopped=False,
        argv: tuple[str, ...] | None = QEMU_ARGV,
    ):
        self._pid = pid
        self.argv = argv
        self.ignores = ignores
        self.stopped = stopped
        self.signals: list[int] = []
        self.queued: list[int] = []  # a stopped process acts on SIGTERM when continued
        self.exited = anyio.Event()
        self._on_exit: list[tuple[Callable[[], None], list[bool]]] = []
        self.closed = False

    @property
    def pid(self) -> int:
        return self._pid

    def send_signal(self, signum: int) -> None:
        self.signals.append(signum)
        if signum == signal.SIGCONT:
            self.stopped = False
            if any(s not in self.ignores for s in self.queued):
                self.exit()
        elif signum == signal.SIGKILL or (signum not in self.ignores and not self.stopped):
            self.exit()
        elif self.stopped:
            self.queued.append(signum)

    def exit(self) -> None:
        if self.exited.is_set():
            return
        self.exited.set()
        for callback, waiting in self._on_exit:
            asyncio.get_running_loop().call_soon(_fire, callback, waiting)

    def has_exited(self) -> bool:
        return self.exited.is_set()

    def command_line(self) -> tuple[str, ...] | None:
        return self.argv

    def is_stopped(self) -> bool:
        return self.stopped

    async def wait_exited(self) -> None:
        await self.exited.wait()

    def on_exit(self, callback: Callable[[], None]) -> Callable[[], None]:
        # As a pidfd's reader: called from the loop, once, after the exit happened. A pidfd
        # has one reader on the loop: a second callback would replace the first.
        assert not any(w[0] for _, w in self._on_exit if not self.exited.is_set()), (
            "one on_exit callback at a time (the real one is the pidfd's only reader)"
        )
        waiting = [True]
        self._on_exit.append((callback, waiting))
        if self.exited.is_set():
            asyncio.get_running_loop().call_soon(_fire, callback, waiting)

        def withdraw() -> None:
            waiting[0] = False

        return withdraw

    def close(self) -> None:
        self.closed = True


class FakeMonitor:
    """A monitor whose commands are answered by the FakeQemu's handlers."""

    def __init__(self, qemu: FakeQemu) -> None:
        self.qemu = qemu
        self.commands: list[str] = []
        self._events: list[EventRecord] = []
        self._arrived = anyio.Event()
        self._callback: Callable[[EventRecord], None] | None = None
        self.closed = anyio.Event()

    async def execute(self, command: str, arguments: Mapping[str, object] | None = None) -> object:
        if self.closed.is_set():
            raise MonitorClosedError(f"{command}: closed")
        self.commands.append(command)
        handler = self.qemu.handlers.get(command)
        if handler is None:
            raise CommandError(
                command, "CommandNotFound", f"The command {command} has not been found"
            )
        return await handler(self.qemu, arguments)

    async def next_event(self) -> EventRecord:
        while not self._events:
            await self._arrived.wait()
            self._arrived = anyio.Event()
        return self._events.pop(0)

    def on_event(self, callback: Callable[[EventRecord], None] | None) -> None:
        self._callback = callback
        if callback is not None:
            for event in self.pending_events():
                callback(event)

    def pending_events(self) -> list[EventRecord]:
        events, self._events = self._events, []
        return events

    def is_closed(self) -> bool:
        return self.closed.is_set()

    def peer_hung_up(self) -> bool:
        return self.closed.is_set()

    async def wait_closed(self) -> None:
        await self.closed.wait()

    async def close(self) -> None:
        self.closed.set()

    def emit(self, name: str, **data: Any) -> None:
        event = EventRecord(name, time.time(), data)
        if self._callback is None:
            self._deliver(event)
        else:  # as qemu.qmp's reader would: from the loop, once the emitting task yields
            asyncio.get_running_loop().call_soon(self._deliver, event)

    def _deliver(self, event: EventRecord) -> None:
        if self._callback is not None:
            self._callback(event)
        else:
            self._events.append(event)
            self._arrived.set()


class FakeQemu:
    """A scripted QEMU: a runstate, a guest behaviour, a process and a monitor.

    ``set_action=False`` is a QEMU older than 6.0 (``set-action`` is CommandNotFound);
    :attr:`reboot` is its reboot action (``shutdown`` under ``-no-reboot`` in its
    process's argv), :attr:`actions` every ``set-action`` it was sent.
    """

    def __init__(
        self,
        *,
        runstate: str = "running",
        guest: str = "cooperative",
        no_shutdown: bool = False,
        quit: str = "reply-then-exit",
        process: FakeProcess | None = None,
        set_action: bool = True,
    ) -> None:
        self.runstate = runstate
        self.guest = guest
        self.no_shutdown = no_shutdown
        self.quit_behaviour = quit
        self.late_by = 0.0  #: quit="late": how long past command_timeout QEMU takes to exit
        self.process = process if process is not None else FakeProcess()
        self.monitor = FakeMonitor(self)
        self.presses = 0
        argv = self.process.argv or ()
        self.reboot = "shutdown" if "-no-reboot" in argv else "reset"
        self.actions: list[Mapping[str, object]] = []
        self.handlers: dict[str, Handler] = {
            "query-status": FakeQemu.query_status,
            "system_powerdown": FakeQemu.system_powerdown,
            "system_wakeup": FakeQemu.system_wakeup,
            "cont": FakeQemu.cont,
            "quit": FakeQemu.quit,
        }
        if set_action:  # QEMU >= 6.0
            self.handlers["set-action"] = FakeQemu.set_action

    # -- the guest ---------------------------------------------------------------
    def power_off(self, reason: str = "guest-shutdown") -> None:
        self.monitor.emit("SHUTDOWN", guest=True, reason=reason)
        if self.no_shutdown:
            self.runstate = "shutdown"
            self.monitor.emit("STOP")
        else:
            self.exit()

    def exit(self) -> None:
        self.runstate = "exited"
        self.process.exit()
        self.monitor.closed.set()

    # -- commands ------------------------------------------------------------
    async def query_status(self, arguments: Mapping[str, object] | None) -> object:
        return {"status": self.runstate, "running": self.runstate == "running"}

    async def system_powerdown(self, arguments: Mapping[str, object] | None) -> object:
        self.monitor.emit("POWERDOWN")
        if self.runstate != "running":
            return {}
        self.presses += 1
        if self.guest == "cooperative":
            self.power_off()
        elif self.guest.startswith("needs-"):
            if self.presses >= int(self.guest.removeprefix("needs-")):
                self.power_off()
        elif self.guest == "reboots":
            if self.reboot == "shutdown":  # -no-reboot, or set-action reboot=shutdown
                self.power_off("guest-reset")
            else:
                self.monitor.emit("RESET", guest=True, reason="guest-reset")
        elif self.guest == "panics":
            self.runstate = "guest-panicked"
            self.monitor.emit("GUEST_PANICKED", action="pause")
        elif self.guest == "panics-poweroff":
            # QEMU's default panic action: the event first, SHUTDOWN guest-panic after
            self.monitor.emit("GUEST_PANICKED", action="poweroff")
            await anyio.sleep(0.05)
            self.power_off("guest-panic")
        elif self.guest == "exits-on-the-second-press":
            # The race a real panic's poweroff gives: the monitor closes while a press is on
            # its way, and the process ends a moment after.
            if self.presses == 2:
                self.monitor.emit("GUEST_PANICKED", action="poweroff")
                self.monitor.emit("SHUTDOWN", guest=True, reason="guest-panic")
                self.monitor.closed.set()
                await anyio.sleep(0.1)
                self.runstate = "exited"
                self.process.exit()
                raise MonitorClosedError("system_powerdown: EOFError")
        elif self.guest == "sleeps":
            self.runstate = "suspended"
            self.monitor.emit("SUSPEND")
        return {}

    async def system_wakeup(self, arguments: Mapping[str, object] | None) -> object:
        if self.runstate != "suspended":
            raise CommandError("system_wakeup", "GenericError", "not suspended")
        self.runstate = "running"
        self.monitor.emit("WAKEUP")
        return {}

    async def set_action(self, arguments: Mapping[str, object] | None) -> object:
        self.actions.append(dict(arguments or {}))
        reboot = (arguments or {}).get("reboot")
        if reboot is not None:
            self.reboot = str(reboot)
        return {}

    async def cont(self, arguments: Mapping[str, object] | None) -> object:
        self.runstate = "running"
        self.monitor.emit("RESUME")
        return {}

    async def quit(self, arguments: Mapping[str, object] | None) -> object:
        behaviour = self.quit_behaviour
        if behaviour == "hang":
            await anyio.sleep_forever()
        if behaviour == "ignore":
            return {}
        self.monitor.emit("SHUTDOWN", guest=False, reason="host-qmp-quit")
        if behaviour == "stall":
            # Its exit begun, QEMU 10.0's main thread can wait for a wake-up it missed
            # (docs/why.md): no exit until a signal (the process's own rules) comes.
            return {}
        if behaviour == "late":
            # A loaded host: QEMU acts on quit, but its reply comes after command_timeout.
            # (QEMU's own clock: the caller giving up on the reply does not stop the exit.)
            asyncio.get_running_loop().call_later(self.late_by, self.exit)
            await anyio.sleep_forever()
        if behaviour == "eof":
            # QEMU closes the socket before its reply to quit is read.
            self.exit()
            raise MonitorClosedError("quit: EOFError")
        self.exit()
        return {}


async def climb_fake(qemu: FakeQemu, policy: Any, *, with_process: bool = True) -> Any:
    """The ladder (``qmpshutdown.climb``) against *qemu*'s monitor and process, bounded."""
    from qmpshutdown import climb

    with anyio.fail_after(10):
        return await climb(
            qemu.monitor,
            qemu.process if with_process else None,
            policy,
            started=anyio.current_time(),
            name="fake",
        )


def outcomes(result: Any) -> list[tuple[str, str]]:
    """Each step of a record as (stage, outcome)."""
    return [(step.stage.value, step.outcome.value) for step in result.steps]
