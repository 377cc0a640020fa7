"""The QEMU being stopped, as the rungs see it: its monitor, its process, what it said.

Rungs act through this object and nothing else: bounded commands, the waits
they share (for the guest to power itself off, for QEMU to be gone), and the
recorder that turns each rung into a step.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from functools import partial
from typing import TypeVar

import anyio

from ._agent import AgentLink
from ._errors import CommandError, MonitorClosedError
from ._exitwake import only_an_exit_follows, wait_or_wake, waker
from ._job import Job
from ._monitor import Monitor, QMPMonitor
from ._patience import Sampler
from ._policy import GRACEFUL_STAGES, RUNGS, ShutdownPolicy, Stage
from ._process import Process
from ._result import Cause, EventRecord, Outcome
from ._steps import Ended, OpenStep, Recorder
from ._watch import Watch, race

logger = logging.getLogger("qmpshutdown")
T = TypeVar("T")
#: Seconds from QEMU seen gone to cancelling a step that does not wait on the watch.
GONE_GRACE = 0.05

#: Stages whose end is not announced by a SHUTDOWN event (SIGKILL gives none).
_SIGNAL_STAGES = frozenset({Stage.TERMINATE, Stage.KILL})


class Guest(enum.Enum):
    """What a graceful rung's wait for the guest saw."""

    OFF = "off"  #: the guest powered off: QEMU exited, or stopped under -no-shutdown
    OFF_UNCONFIRMED = "off-unconfirmed"  #: SHUTDOWN came, yet QEMU neither exited nor stopped
    PANICKED = "panicked"  #: the guest panicked and QEMU stays (action pause or run)
    GONE = "gone"  #: QEMU went without the guest's SHUTDOWN
    WAITING = "waiting"  #: none of these yet, and the time asked for is up


class Qemu:
    """One QEMU under the ladder.

    :param job: the VM and its options (its policy set).
    :param monitor: its QMP monitor, or None when it could not be reached.
    :param process: its pinned process, or None when signals are impossible.
    :param recorder: where steps, log lines and progress go.
    :param no_monitor_why: why there is no monitor (for skipped steps).
    :param no_signal_why: why there is no process (for skipped steps).
    """

    def __init__(
        self,
        job: Job,
        monitor: Monitor | None,
        process: Process | None,
        recorder: Recorder,
        *,
        no_monitor_why: str = "",
        no_signal_why: str = "",
    ) -> None:
        self.job = job
        self.policy: ShutdownPolicy = job.the_policy
        self.monitor = monitor
        self.process = process
        self.recorder = recorder
        self.no_monitor_why = no_monitor_why
        self.no_signal_why = no_signal_why
        self.watch = Watch()
        self.runstate: str | None = None  #: as found on arrival
        self.presses = 0
        self.reboot_action: str | None = None  #: to put back at the end (:mod:`._rungs.reboot`)
        #: True when the guest powered off (its SHUTDOWN) and QEMU's exit did not end (below).
        self.exit_stalled = False
        #: True when such an exit ended after a SIGTERM that woke it (:mod:`._exitwake`).
        self.exit_woken = False
        self.sampler = Sampler(self.policy, None if process is None else process.pid)  #: reads it
        #: The way to the guest agent (the job's socket), shared by the agent rung and the
        #: freeze; None without an agent socket.
        agent = job.agent_path
        self.agent = None if agent is None else AgentLink(agent, self.policy.command_timeout)

    # ---- state -------------------------------------------------------------------

    @property
    def gone(self) -> bool:
        """True once QEMU was seen gone (its process exited, or without a pid its monitor EOF)."""
        return self.watch.gone.is_set()

    @property
    def guest_off(self) -> bool:
        """True once the guest is off: found so, a step ended it, or its QEMU's exit stalled."""
        return self.exit_stalled or self.runstate == "shutdown" or any(
            step.outcome is Outcome.DONE and step.stage in RUNGS for step in self.recorder.steps
        )

    def mark_gone(self) -> None:
        if not self.gone:
            self.watch.gone_at = self.recorder.now()
            self.watch.gone.set()
            self.watch.changed()
            self.recorder.gone(self.watch.gone_at)

    # ---- commands ------------------------------------------------------------------

    async def command(self, name: str, arguments: Mapping[str, object] | None = None) -> object:
        """Run one QMP command, bounded by ``command_timeout`` (a plain scope: cheaper than
        ``fail_after``'s two generators). :raises CommandError, MonitorClosedError, TimeoutError.
        """
        assert self.monitor is not None
        with anyio.move_on_after(self.policy.command_timeout):
            return await self.monitor.execute(name, arguments)
        raise TimeoutError

    async def try_command(self, name: str) -> Exception | None:
        """Run *name*; return the error instead of raising it (logged)."""
        try:
            await self.command(name)
        except (CommandError, MonitorClosedError, TimeoutError) as err:
            self.recorder.say(f"{name} failed: {str(err) or 'no reply'}")
            return err
        return None

    async def ask(self, name: str) -> object:
        """A reading's reply, or None (no monitor, an error, the guest off: QEMU 10.0 exiting
        can crash reading a command, docs/why.md)."""
        if self.monitor is None or self.monitor.is_closed() or self.watch.guest_shut_down:
            return None
        try:
            return await self.command(name)
        except (CommandError, MonitorClosedError, TimeoutError) as err:
            logger.debug("%s: %s for sampling failed: %r", self.recorder.name, name, err)
            return None

    async def read_runstate(self, answered: object = None) -> str | None:
        """QEMU's runstate, or None; *answered*: query-status's reply (or error) asked already."""
        try:
            if isinstance(answered, Exception):
                raise answered
            reply = await self.command("query-status") if answered is None else answered
        except (CommandError, MonitorClosedError, TimeoutError) as err:
            self.recorder.say(f"query-status failed: {str(err) or 'no reply'}")
            return None
        status = reply.get("status") if isinstance(reply, Mapping) else None
        return str(status) if status is not None else None

    async def arrive(self) -> None:
        """Read the runstate the ladder starts from."""
        if self.monitor is None:
            return
        monitor = self.monitor
        asked = monitor.take_arrival("query-status") if isinstance(monitor, QMPMonitor) else None
        self.runstate = await self.read_runstate(asked)
        self.watch.suspended = self.watch.slept = self.runstate == "suspended"
        if self.runstate == "shutdown":
            self.recorder.say("guest is already off (runstate shutdown)")

    # ---- the waits the rungs share ---------------------------------------------------

    async def wait_for_guest(self, until: float) -> Guest:
        """Wait until the guest powered off, panicked, QEMU went, or *until* (anyio clock)."""
        watch = self.watch
        await watch.wait_until(
            lambda: watch.guest_shut_down or watch.panic_stays or self.gone, until
        )
        if watch.guest_shut_down:
            return Guest.OFF if await self._confirm_guest_off() else Guest.OFF_UNCONFIRMED
        if self.gone:
            return Guest.GONE
        if watch.panic_stays:
            return Guest.PANICKED
        return Guest.WAITING

    async def _confirm_guest_off(self) -> bool:
        """After the guest's SHUTDOWN: QEMU exits at once, or stops under -no-shutdown."""
        deadline = anyio.current_time() + self.policy.command_timeout
        watch = self.watch

        def off() -> bool:
            return watch.stopped_after_shutdown or self.gone

        if await watch.wait_until(off, deadline) or self.exited_now():
            if not self.gone:
                self.recorder.say("guest powered off; QEMU stays (runstate shutdown)")
            return True
        running = self.may_answer_late()
        wake = waker(self.policy, self.process, running)  # QEMU 10.0: _exitwake
        if not (running and only_an_exit_follows(self.process)):  # else no command into it
            runstate = await self.read_runstate()
            if runstate == "shutdown" or self.exited_now():
                return True
            if runstate is not None or not running:
                return False
        # Its exit not ended: seconds on a loaded host (seen in CI), or stalled. Give it what
        # quit would (no command into it) rather than force a guest already off.
        timeout = self.policy.quit_timeout
        self.recorder.say(f"guest powered off; waiting up to {timeout:g} s for QEMU's exit")
        ended = await wait_or_wake(partial(watch.wait_until, off), timeout, wake, self.recorder.say)
        self.exit_woken = ended == "woken" and self.gone
        if ended != "stalled":
            return True
        # Still there: the guest is off, quit cannot end an exit begun, nor need force wait.
        self.exit_stalled = True
        return False

    def guest_ended(self, seen: Guest, step: OpenStep, cause: Cause | None) -> Ended:
        """How a graceful rung ended, from what its wait saw (not WAITING)."""
        if seen is Guest.OFF and self.gone:
            return self.gone_ended(step)
        if seen is Guest.OFF:
            return Ended(Outcome.DONE, _join(step.so_far, f"guest off ({self.watch.reason})"))
        if seen is Guest.OFF_UNCONFIRMED:
            what = "SHUTDOWN came but QEMU neither exited nor stopped"  # not the guest's doing
            return Ended(Outcome.FAILED, _join(step.so_far, what), Cause.MONITOR_UNRESPONSIVE)
        if seen is Guest.PANICKED:
            return Ended(Outcome.FAILED, _join(step.so_far, "guest panicked"), Cause.PANICKED)
        return self.gone_ended(step)

    async def wait_gone_or(self, seconds: float, step: OpenStep, still_running: str) -> Ended:
        """Wait up to *seconds* for QEMU to be gone: done if it went, else a timeout."""
        with anyio.move_on_after(seconds):
            await self.watch.gone.wait()
        return self.gone_ended(step) if self.gone else Ended(Outcome.TIMEOUT, still_running)

    def may_answer_late(self) -> bool:
        """True when QEMU's process is known and runs (not stopped: SIGSTOP, a debugger).

        Such a QEMU that missed ``command_timeout`` may still answer, or exit, a moment
        later (a loaded host); a stopped one cannot, and one without a pid cannot be told.
        """
        return self.process is not None and not self.process.is_stopped()

    def exited_now(self) -> bool:
        """True once QEMU is gone, also when its process exited but the watcher has not said so."""
        if not self.gone and self.process is not None and self.process.has_exited():
            self.mark_gone()
        return self.gone

    def gone_ended(self, step: OpenStep, so_far: str | None = None) -> Ended:
        """The step in progress when QEMU went: done, saying how it went (after *so_far*)."""
        reason = self.watch.reason
        said = f" (SHUTDOWN {reason})" if reason else ""
        if not reason and step.stage not in _SIGNAL_STAGES:
            said = " without a SHUTDOWN event (ended from outside?)"
        graceful_rung = step.stage in GRACEFUL_STAGES
        what = "QEMU exited"
        if graceful_rung and self.watch.guest_shut_down:
            what = "guest powered off"
        if self.exit_woken:
            said += "; its exit had stalled until a SIGTERM woke it"
        so_far = step.so_far if so_far is None else so_far
        return Ended(Outcome.DONE, _join(so_far, what + said), at=self.watch.gone_at)

    def ended_by_cancel(self, step: OpenStep) -> Ended:
        """How a step cut short by cancellation ended: done if QEMU went, else cancelled."""
        if self.gone:
            return self.gone_ended(step)
        return Ended(Outcome.FAILED, _join(step.so_far, "cancelled"))

    @contextlib.asynccontextmanager
    async def sampling(self) -> AsyncIterator[None]:
        """Read the guest while a graceful rung waits for it. Nothing runs before the first
        reading is due (a timer, no task): a guest off before then costs no task, no reading.
        """
        sampler = self.sampler
        if sampler.pid is None:
            yield
            return
        loop = asyncio.get_running_loop()
        pressed = anyio.current_time()
        task: asyncio.Task[None] | None = None

        def start() -> None:
            nonlocal task
            task = loop.create_task(
                sampler.sample_forever(
                    self.ask, self.recorder.name, self.recorder.sample, pressed=pressed
                )
            )

        timer = loop.call_later(sampler.first_reading_after, start)
        try:
            yield
        finally:
            timer.cancel()
            if task is not None:
                task.cancel()
                with anyio.CancelScope(shield=True):
                    await asyncio.wait([task])
                error = None if task.cancelled() else task.exception()
                if error is not None:  # a sampler's own failure, not the guest's
                    raise error

    # ---- the race --------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def listening(self) -> AsyncIterator[None]:
        """QEMU's events go to the watch while this lasts, as the monitor's reader reads them
        (:meth:`~._monitor.Monitor.on_event`); a caller's monitor without it: by a task."""
        monitor = self.monitor
        on_event = None if monitor is None else getattr(monitor, "on_event", None)
        if on_event is not None:
            on_event(self.note)
            try:
                yield
            finally:
                on_event(None)
            return
        async with anyio.create_task_group() as pump:
            if monitor is not None:
                pump.start_soon(self._pump_events, monitor)
            try:
                yield
            finally:
                pump.cancel_scope.cancel()

    async def _pump_events(self, monitor: Monitor) -> None:
        try:
            while True:
                self.note(await monitor.next_event())
        except Exception as err:  # events stop; the ladder goes on without them
            logger.warning("%s: reading events failed: %r", self.recorder.name, err)

    def note(self, event: EventRecord) -> None:
        self.watch.note(event)
        self.recorder.event(event)

    async def until_gone(self, work: Callable[[], Awaitable[T]]) -> T | None:
        """Run *work* until it returns, or until QEMU is seen gone (which cancels it).

        With a process, its exit is a callback on the loop that marks QEMU gone
        and cancels *work*'s scope :data:`GONE_GRACE` later (no task waits for
        it); without one (or with a caller's process that has no ``on_exit``),
        :func:`~._watch.race` against :meth:`wait_gone`.
        What *work* raises is raised as it is.

        :return: what *work* returned, or None when QEMU went first.
        """
        on_exit = getattr(self.process, "on_exit", None)  # a caller's Process may lack it
        if on_exit is None:
            return await race(self.wait_gone, work)
        loop = asyncio.get_running_loop()
        cancel: asyncio.TimerHandle | None = None
        with anyio.CancelScope() as scope:

            def exited() -> None:
                nonlocal cancel
                # Seen gone at once: every wait on the watch ends now. What the loop has
                # already read runs first (the reply to a press read in the same turn as
                # the exit: the press is counted and said); a step that waits on anything
                # else is cancelled a moment later.
                self.mark_gone()
                cancel = loop.call_later(GONE_GRACE, scope.cancel)

            withdraw = on_exit(exited)
            try:
                return await work()
            finally:
                withdraw()
                if cancel is not None:
                    cancel.cancel()
        return None

    async def wait_gone(self) -> None:
        """Return once QEMU is seen gone: its pidfd, or without a pid its monitor's EOF."""
        if self.process is not None:
            await self.process.wait_exited()
        elif self.monitor is not None:
            await self.monitor.wait_closed()
            if not self.monitor.peer_hung_up():
                await anyio.sleep_forever()  # our side gave up: no sign of an exit
        else:
            await anyio.sleep_forever()
        self.mark_gone()

    async def settle(self) -> None:
        """After the ladder: see an exit that came just now, and read QEMU's last words."""
        if self.process is not None and self.process.has_exited():
            self.mark_gone()
        if self.monitor is None:
            return
        if self.gone and not self.monitor.is_closed():  # read its last words (bounded)
            with anyio.move_on_after(min(1.0, self.policy.command_timeout)):
                await self.monitor.wait_closed()
        for event in self.monitor.pending_events():
            self.note(event)


def _join(so_far: str, what: str) -> str:
    return f"{so_far}; {what}" if so_far else what
