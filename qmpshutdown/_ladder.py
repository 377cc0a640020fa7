"""The ladder: press the power button, then quit, then SIGTERM, then SIGKILL.

:func:`climb` reads top to bottom: read the runstate, press (waking or
resuming the guest first when the policy says so), then force, each rung a
small named step. A watcher for "QEMU is gone" races the ladder in one task
group; whichever finishes first cancels the other, so a rung never waits a
moment longer than QEMU lives.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Mapping

import anyio

from ._errors import ShutdownFailed
from ._monitor import CommandError, Monitor, MonitorClosedError
from ._policy import ShutdownPolicy, Stage
from ._process import Process
from ._result import Cause, Outcome, ShutdownResult
from ._steps import StepLog
from ._watch import GUEST_OFF_REASONS, Watch

logger = logging.getLogger("qmpshutdown")

# Runstates in which a press is pointless or harmful (see QEMU-FACTS).
PAUSED_STATES = frozenset({"paused", "prelaunch", "debug", "io-error", "watchdog"})
PANICKED_STATES = frozenset({"guest-panicked", "internal-error"})
MIGRATING_STATES = frozenset(
    {"inmigrate", "postmigrate", "finish-migrate", "colo", "save-vm", "restore-vm"}
)


class _Ladder(StepLog):
    def __init__(
        self,
        monitor: Monitor | None,
        process: Process | None,
        policy: ShutdownPolicy,
        *,
        started: float,
        name: str,
        no_monitor_why: str,
        no_signal_why: str,
    ) -> None:
        self.monitor = monitor
        self.process = process
        self.policy = policy
        super().__init__(started, name)
        self.no_monitor_why = no_monitor_why
        self.no_signal_why = no_signal_why
        self.watch = Watch()
        self.presses = 0
        self.runstate: str | None = None
        self.cause: Cause | None = None
        self.already_off = False
        self.guest_off_stage: Stage | None = None  # rung during which the guest powered off
        self.error: BaseException | None = None

    # ---- the ladder, top to bottom -------------------------------------------------

    async def rungs(self) -> None:
        if self.process is not None and self.process.has_exited():
            self.mark_gone()  # QEMU went away while we connected
            return
        if self.monitor is None:
            self.cause = Cause.MONITOR_UNRESPONSIVE
            self.skip_monitor_rungs(self.no_monitor_why)
            await self.signal_rungs()
            return
        self.runstate = await self.read_runstate()
        if self.runstate is None:
            self.cause = Cause.MONITOR_UNRESPONSIVE
        self.watch.suspended = self.watch.slept = self.runstate == "suspended"
        if self.runstate == "shutdown":
            self.already_off = True  # -no-shutdown, and the guest is off already
            self.log("guest is already off (runstate shutdown)")
        elif self.policy.allows(Stage.POWERDOWN):
            await self.press_power_button()
        if self.guest_off_stage is not None or self.already_off:
            await self.end_qemu_after_guest_off()
        else:
            await self.force()

    async def force(self) -> None:
        if self.policy.allows(Stage.QUIT):
            await self.send_quit()
        await self.signal_rungs()

    async def signal_rungs(self) -> None:
        if self.policy.allows(Stage.TERMINATE):
            await self.send_signal(Stage.TERMINATE, signal.SIGTERM, self.policy.terminate_timeout)
        if self.policy.allows(Stage.KILL):
            await self.send_signal(Stage.KILL, signal.SIGKILL, self.policy.kill_timeout)

    async def end_qemu_after_guest_off(self) -> None:
        """The guest is off but QEMU runs on (-no-shutdown): end it with what is allowed."""
        if not any(self.policy.allows(s) for s in (Stage.QUIT, Stage.TERMINATE, Stage.KILL)):
            self.log("guest is off; QEMU is left in runstate 'shutdown' (no force allowed)")
            return
        await self.force()

    # ---- rung: the power button -------------------------------------------------

    async def press_power_button(self) -> None:
        self.begin(Stage.POWERDOWN)
        runstate = self.runstate
        if runstate is None:
            self.cause = Cause.MONITOR_UNRESPONSIVE
            self.end(Outcome.FAILED, "no answer to query-status")
            return
        if runstate == "suspended":
            self.cause = Cause.ASLEEP
            if not self.policy.wake_suspended:
                self.end(Outcome.SKIPPED, "guest is suspended (S3) and wake_suspended is off")
                return
            if not await self.wake_guest():
                self.end(Outcome.FAILED, "guest is suspended (S3) and did not wake")
                return
        elif runstate in PAUSED_STATES:
            self.cause = Cause.PAUSED
            if not self.policy.resume_paused:
                # A press latched in a paused guest would power it off by surprise later.
                self.end(Outcome.SKIPPED, f"guest is {runstate} and resume_paused is off")
                return
            if not await self.resume_guest():
                self.end(Outcome.FAILED, f"guest is {runstate} and 'cont' failed")
                return
        elif runstate in PANICKED_STATES:
            self.cause = Cause.PANICKED
            self.end(Outcome.SKIPPED, f"guest is {runstate}: nobody is there to press for")
            return
        elif runstate in MIGRATING_STATES:
            self.cause = Cause.MIGRATING
            self.end(Outcome.SKIPPED, f"guest is in runstate {runstate}")
            return
        elif runstate != "running":
            self.end(Outcome.SKIPPED, f"unexpected runstate {runstate!r}")
            return
        await self.press_until_off()

    async def press_until_off(self) -> None:
        policy = self.policy
        deadline = anyio.current_time() + policy.powerdown_timeout
        while True:
            if self.watch.suspended and policy.wake_suspended:
                self.cause = Cause.ASLEEP  # it went to sleep while we waited
                await self.wake_guest()
            if not await self.press():
                self.end(Outcome.FAILED, self.press_detail("system_powerdown failed"))
                return
            interval = policy.repress_interval
            until = deadline if interval is None else min(deadline, anyio.current_time() + interval)
            await self.watch.wait_until(
                lambda: self.watch.guest_shut_down or self.watch.panic_stays, until
            )
            if self.watch.guest_shut_down:
                if await self.confirm_guest_off():
                    self.guest_off_stage = Stage.POWERDOWN
                    self.end(Outcome.DONE, self.press_detail(f"guest off ({self.watch.reason})"))
                else:
                    self.end(
                        Outcome.FAILED,
                        self.press_detail("SHUTDOWN came but QEMU neither exited nor stopped"),
                    )
                return
            if self.watch.panic_stays:
                self.cause = Cause.PANICKED
                self.end(Outcome.FAILED, self.press_detail("guest panicked"))
                return
            if anyio.current_time() >= deadline:
                self.end(
                    Outcome.TIMEOUT,
                    self.press_detail(f"no power-off in {policy.powerdown_timeout:g} s"),
                )
                return

    async def press(self) -> bool:
        try:
            await self.command("system_powerdown")
        except (CommandError, MonitorClosedError, TimeoutError) as err:
            if isinstance(err, TimeoutError):
                self.cause = Cause.MONITOR_UNRESPONSIVE
            self.log("system_powerdown failed: %s", str(err) or "no reply")
            return False
        self.presses += 1
        if self.presses == 1:
            self.log("pressed the power button")
        else:
            self.log("pressed the power button again (press %d)", self.presses)
        return True

    async def confirm_guest_off(self) -> bool:
        """After the guest's SHUTDOWN: QEMU exits at once, or stops under -no-shutdown."""
        deadline = anyio.current_time() + self.policy.command_timeout
        if await self.watch.wait_until(lambda: self.watch.stopped_after_shutdown, deadline):
            self.log("guest powered off; QEMU stays (runstate shutdown)")
            return True
        return await self.read_runstate() == "shutdown"

    async def wake_guest(self) -> bool:
        try:
            await self.command("system_wakeup")
        except (CommandError, MonitorClosedError, TimeoutError) as err:
            self.log("system_wakeup failed: %s", err)
            return False
        self.log("woke the guest (system_wakeup)")
        deadline = anyio.current_time() + self.policy.command_timeout
        if await self.watch.wait_until(lambda: not self.watch.suspended, deadline):
            return True
        return await self.read_runstate() == "running"

    async def resume_guest(self) -> bool:
        try:
            await self.command("cont")
        except (CommandError, MonitorClosedError, TimeoutError) as err:
            self.log("cont failed: %s", err)
            return False
        self.log("resumed the guest (cont)")
        return True

    # ---- rungs of force -------------------------------------------------

    async def send_quit(self) -> None:
        self.begin(Stage.QUIT)
        if self.monitor is None or self.monitor.is_closed():
            self.end(Outcome.SKIPPED, self.no_monitor_why or "the monitor is closed")
            return
        try:
            await self.command("quit")
        except MonitorClosedError:
            pass  # QEMU may close the socket before it answers quit
        except TimeoutError:
            self.cause = self.cause or Cause.MONITOR_UNRESPONSIVE
            self.end(Outcome.FAILED, f"no reply to quit in {self.policy.command_timeout:g} s")
            return
        except CommandError as err:
            self.end(Outcome.FAILED, f"quit refused: {err}")
            return
        self.progress("sent quit")
        await anyio.sleep(self.policy.quit_timeout)  # the gone-watcher ends this wait
        self.end(Outcome.TIMEOUT, f"QEMU still running {self.policy.quit_timeout:g} s after quit")

    async def send_signal(self, stage: Stage, signum: int, grace: float) -> None:
        self.begin(stage)
        if self.process is None:
            self.end(Outcome.SKIPPED, self.no_signal_why)
            return
        name = signal.Signals(signum).name
        self.process.send_signal(signum)
        detail = f"sent {name}"
        if signum == signal.SIGTERM and self.process.is_stopped():
            # A stopped process queues SIGTERM until it runs again; let it take its clean exit.
            self.process.send_signal(signal.SIGCONT)
            detail += " and SIGCONT (QEMU was stopped)"
        self.progress(detail)
        await anyio.sleep(grace)  # the gone-watcher ends this wait
        self.end(Outcome.TIMEOUT, f"QEMU still running {grace:g} s after {name}")

    def skip_monitor_rungs(self, why: str) -> None:
        for stage in (Stage.POWERDOWN, Stage.QUIT):
            if self.policy.allows(stage):
                self.begin(stage)
                self.end(Outcome.SKIPPED, why)

    # ---- helpers -------------------------------------------------

    async def command(self, name: str, arguments: Mapping[str, object] | None = None) -> object:
        assert self.monitor is not None
        with anyio.fail_after(self.policy.command_timeout):
            return await self.monitor.execute(name, arguments)

    async def read_runstate(self) -> str | None:
        try:
            reply = await self.command("query-status")
        except (CommandError, MonitorClosedError, TimeoutError) as err:
            self.log("query-status failed: %s", str(err) or "no reply")
            return None
        status = reply.get("status") if isinstance(reply, Mapping) else None
        return str(status) if status is not None else None

    def press_detail(self, what: str) -> str:
        times = "once" if self.presses == 1 else f"{self.presses} times"
        return f"pressed {times}; {what}" if self.presses else what

    # ---- the race -------------------------------------------------

    async def pump_events(self) -> None:
        assert self.monitor is not None
        try:
            while True:
                self.watch.note(await self.monitor.next_event())
        except Exception as err:  # events stop; the ladder goes on without them
            logger.warning("%s: reading events failed: %r", self.name, err)

    async def watch_gone(self, scope: anyio.CancelScope) -> None:
        try:
            if self.process is not None:
                await self.process.wait_exited()
            elif self.monitor is not None:
                # Without a pid, the monitor's EOF is the only sign of the exit there is.
                await self.monitor.wait_closed()
                if not self.monitor.peer_hung_up():
                    await anyio.sleep_forever()  # our side gave up: no sign of an exit
            else:
                await anyio.sleep_forever()
        except Exception as err:  # kept, and raised outside the task group
            self.error = err
        else:
            self.mark_gone()
        scope.cancel()

    def mark_gone(self) -> None:
        if not self.watch.gone.is_set():
            self.watch.gone_at = self.now()
            self.watch.gone.set()
            self.log("QEMU is gone")

    async def run_rungs(self, scope: anyio.CancelScope) -> None:
        try:
            await self.rungs()
        except Exception as err:  # kept, and raised outside the task group
            self.error = err
        finally:
            scope.cancel()

    async def collect_last_events(self) -> None:
        """QEMU exited: read what it said before its socket closed (bounded)."""
        if self.monitor is None:
            return
        with anyio.move_on_after(min(1.0, self.policy.command_timeout)):
            await self.monitor.wait_closed()
        for event in self.monitor.pending_events():
            self.watch.note(event)

    # ---- the record -------------------------------------------------

    def result(self) -> ShutdownResult:
        watch = self.watch
        gone = watch.gone.is_set()
        if self.open is not None:  # the rung in progress when QEMU went
            stage, _, so_far = self.open
            outcome = Outcome.DONE if gone else Outcome.FAILED
            ended = watch.gone_at if watch.gone_at is not None else self.now()
            detail = self.gone_detail(stage)
            if so_far:
                detail = f"{so_far}; {detail}"
            self.close_open(outcome, ended, detail)
        ended_by: Stage | None
        if self.already_off or (gone and not self.steps):
            ended_by = Stage.ALREADY_OFF
        elif self.guest_off_stage is not None:
            ended_by = self.guest_off_stage
        elif gone:
            done = [s.stage for s in self.steps if s.outcome is Outcome.DONE]
            ended_by = done[0] if done else self.steps[-1].stage
        else:
            ended_by = None
        if self.already_off:
            graceful = True  # the guest powered itself off before we came
        elif ended_by is Stage.ALREADY_OFF:  # QEMU went away while we connected
            graceful = watch.guest_shut_down and watch.reason in GUEST_OFF_REASONS
        else:
            graceful = (
                ended_by is not None
                and watch.guest_shut_down
                and (watch.reason in GUEST_OFF_REASONS)
            )
        return ShutdownResult(
            stage=ended_by,
            graceful=graceful,
            reason=watch.reason,
            presses=self.presses,
            runstate=self.runstate,
            cause=None if graceful else self.likely_cause(),
            pid=None if self.process is None else self.process.pid,
            elapsed=watch.gone_at if watch.gone_at is not None else self.now(),
            events=watch.events,
            steps=self.steps,
        )

    def gone_detail(self, stage: Stage) -> str:
        reason = self.watch.reason
        said = f" (SHUTDOWN {reason})" if reason else ""
        if not reason and stage in (Stage.POWERDOWN, Stage.QUIT):
            said = " without a SHUTDOWN event (ended from outside?)"
        if stage is Stage.POWERDOWN:
            what = "guest powered off" if self.watch.guest_shut_down else "QEMU exited"
            return self.press_detail(what + said)
        return f"QEMU exited{said}"

    def likely_cause(self) -> Cause | None:
        if self.cause is not None:
            return self.cause
        if self.watch.panicked or self.watch.reason == "guest-panic":
            return Cause.PANICKED
        if self.watch.slept:
            return Cause.ASLEEP
        if self.watch.resets:
            return Cause.REBOOTED
        if self.presses:
            return Cause.IGNORED_POWER_BUTTON
        return None


async def climb(
    monitor: Monitor | None,
    process: Process | None,
    policy: ShutdownPolicy,
    *,
    started: float,
    name: str = "qemu",
    no_monitor_why: str = "",
    no_signal_why: str = "QEMU's pid is unknown",
) -> ShutdownResult:
    """Run the ladder against *monitor* and *process* and return its record.

    :param monitor: the QMP monitor, or None when it could not be reached.
    :param process: QEMU's pinned process, or None when signals are not possible.
    :param policy: which rungs, how long each.
    :param started: the anyio clock at the caller's start (times count from it).
    :param name: how log lines name this VM.
    :param no_monitor_why: why there is no monitor, for the skipped steps.
    :param no_signal_why: why there is no process, for the skipped steps.
    :raises ShutdownFailed: the allowed rungs are used up and QEMU still runs.
    :return: the record of what happened.
    """
    ladder = _Ladder(
        monitor,
        process,
        policy,
        started=started,
        name=name,
        no_monitor_why=no_monitor_why,
        no_signal_why=no_signal_why,
    )
    async with anyio.create_task_group() as tg:
        if monitor is not None:
            tg.start_soon(ladder.pump_events)
        tg.start_soon(ladder.watch_gone, tg.cancel_scope)
        tg.start_soon(ladder.run_rungs, tg.cancel_scope)
    if process is not None and process.has_exited():
        ladder.mark_gone()  # it exited just as the ladder ended
    if ladder.watch.gone.is_set():
        await ladder.collect_last_events()
    elif monitor is not None:
        for event in monitor.pending_events():
            ladder.watch.note(event)
    if ladder.error is not None:
        raise ladder.error
    result = ladder.result()
    if result.stage is None:
        tried = ", ".join(f"{s.stage.value} {s.outcome.value}" for s in result.steps) or "none"
        why = f"; likely cause: {result.cause.value}" if result.cause else ""
        raise ShutdownFailed(
            f"{name}: QEMU is still running after the allowed rungs ({tried}){why}", result
        )
    return result
