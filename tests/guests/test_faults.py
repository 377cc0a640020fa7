"""Faults on real QEMU guests: QEMU ends up gone and reaped, and the record says how.

Each case in ``CASES`` is run by the scenario its ``params["scenario"]`` names,
which returns a one-line outcome compared with ``case.expect``; the call must
return within ``case.limit`` seconds. docs/robustness.md is rendered from CASES.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import re
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable

import anyio
import attrs
import pytest

import qmpshutdown
from support.guests import free_port, qmp_connect, qmp_disconnect
from support.nbdhold import HoldingNbd, held_job_args, start_held_job
from support.policies import FAULTS, PRESSED
from support.records import as_pressed
from support.robustness import Case

pytestmark = [pytest.mark.asyncio, pytest.mark.qemu]

POLICY = FAULTS
#: Slack on top of the policy's own timeouts (scheduling on 2 busy cores).
SLACK = 1.5


def outcome(result: qmpshutdown.ShutdownResult) -> str:
    stage = result.stage.value if result.stage else "none"
    cause = result.cause.value if result.cause else "-"
    return f"stage {stage}, cause {cause}" + (", forced" if result.forced else "")


CASES = [
    Case(
        "fault",
        "QEMU stopped before the call",
        "no greeting in connect_timeout; SIGTERM then SIGCONT so QEMU takes its clean exit",
        "stage terminate, cause monitor-unresponsive, forced",
        POLICY.connect_timeout + SLACK,
        "connect_timeout",
        {"scenario": "stopped_before"},
    ),
    Case(
        "fault",
        "QEMU stopped during the ladder",
        "the press and quit get no reply in command_timeout; SIGCONT, and its answers before "
        "any SIGTERM: the quit it had been sent ends it",
        "stage terminate, cause monitor-unresponsive, forced",
        1.0 + 2 * POLICY.command_timeout + SLACK,
        "repress_interval + 2 * command_timeout",
        {"scenario": "stopped_during"},
    ),
    Case(
        "fault",
        "monitor held by another client",
        "no greeting (one client per monitor); SIGTERM; the holder sees SHUTDOWN host-signal",
        "stage terminate, cause monitor-unresponsive, forced",
        POLICY.connect_timeout + SLACK,
        "connect_timeout",
        {"scenario": "held_monitor"},
    ),
    Case(
        "fault",
        "QEMU killed while the button is pressed",
        "the pidfd turns readable: the ladder ends at once, no SHUTDOWN to report",
        "stage powerdown, cause ignored-power-button, forced",
        0.5 + SLACK,
        "the exit itself",
        {"scenario": "killed_while_pressing"},
    ),
    Case(
        "fault",
        "QEMU killed between two rungs",
        "killed as the press times out: quit meets a closed monitor, the exit is confirmed",
        "stage quit, cause ignored-power-button, forced",
        POLICY.powerdown_timeout + SLACK,
        "powerdown_timeout",
        {"scenario": "killed_between_rungs"},
    ),
    Case(
        "fault",
        "QEMU killed while quit is in flight",
        "killed as quit is written: EOF instead of a reply is expected, the exit confirms it",
        "stage quit, cause ignored-power-button, forced",
        POLICY.powerdown_timeout + SLACK,
        "powerdown_timeout",
        {"scenario": "killed_during_quit"},
    ),
    Case(
        "fault",
        "QEMU exiting during the handshake",
        "the greeting never completes; the pinned process is seen gone",
        "stage already-off, cause -",
        0.3 + 1.0 + SLACK,
        "min(1 s, command_timeout) grace for the exit",
        {"scenario": "exits_during_handshake"},
    ),
    Case(
        "fault",
        "socket file deleted after connecting",
        "nothing changes: the connection and the pidfd are what count",
        "stage quit, cause ignored-power-button, forced",
        POLICY.powerdown_timeout + SLACK,
        "powerdown_timeout",
        {"scenario": "socket_deleted"},
    ),
    Case(
        "fault",
        "guest rebooting on the press",
        "the reboot action is shutdown while the button is pressed: the reset ends QEMU, "
        "unforced (QEMU < 6.0: keeps pressing, then quit, cause rebooted)",
        "stage powerdown, cause -",
        4.0 + SLACK,
        "powerdown_timeout",
        {"scenario": "reboot_loop"},
    ),
    Case(
        "fault",
        "caller cancels while the button is pressed",
        "cancellation propagates; the monitor is closed (a new client is greeted); no task left",
        "cancelled, monitor closed",
        0.5 + SLACK,
        "the caller's scope",
        {"scenario": "cancel", "point": "pressing"},
    ),
    Case(
        "fault",
        "caller cancels during the handshake",
        "the connect task is cancelled once and awaited; no 'bug in the QMP library' log",
        "cancelled, monitor closed",
        0.5 + SLACK,
        "the caller's scope",
        {"scenario": "cancel", "point": "handshake"},
    ),
    Case(
        "fault",
        "QEMU's exit held after the guest's SHUTDOWN",
        "a block job's read is held (an NBD server of the test's), so QEMU's exit waits in "
        "its drain; command_timeout after the SHUTDOWN, SIGTERM and no command; the read "
        "answered then, QEMU exits: a stop on the press",
        "stage powerdown, cause -",
        1.0 + POLICY.command_timeout + SLACK,
        "the press + command_timeout",
        {"scenario": "exit_held", "released": True},
    ),
    Case(
        "fault",
        "QEMU's exit held for good after the guest's SHUTDOWN",
        "the same read never answered: SIGTERM cannot end the drain; quit_timeout, quit "
        "skipped (it cannot end an exit begun), terminate, then SIGKILL; graceful, for the "
        "guest went",
        "stage kill, cause monitor-unresponsive",
        1.0 + POLICY.command_timeout + POLICY.quit_timeout + POLICY.terminate_timeout + SLACK,
        "the press + command_timeout + quit_timeout + terminate_timeout",
        {"scenario": "exit_held", "released": False},
    ),
    Case(
        "fault",
        "QEMU's exit held after quit",
        "the same held read, a guest that ignores the button: quit's SHUTDOWN comes, its "
        "reply does not (the exit is held first); command_timeout more, SIGTERM; the read "
        "answered then, QEMU exits: the record stays quit",
        "stage quit, cause ignored-power-button, forced",
        POLICY.powerdown_timeout + 2 * POLICY.command_timeout + SLACK,
        "powerdown_timeout + 2 * command_timeout",
        {"scenario": "exit_held", "released": True, "mode": "ignores"},
    ),
    Case(
        "fault",
        "QEMU's exit held, no force allowed",
        "the same held read under a plan of the power button alone, with a screenshot "
        "directory: quit_timeout for the exit (no SIGTERM may wake it), then ShutdownFailed "
        "with the guest off; no command sent into the exit (no query-status, no set-action "
        "to put the reboot action back, no screenshot)",
        qmpshutdown.ShutdownFailed,
        1.0 + POLICY.command_timeout + POLICY.quit_timeout + SLACK,
        "the press + command_timeout + quit_timeout",
        {"scenario": "exit_held_no_force"},
    ),
    Case(
        "safety",
        "pid of another QEMU given",
        "refused before anything is sent (SO_PEERCRED names the real peer)",
        qmpshutdown.PidMismatchError,
        SLACK,
        "no wait",
        {"scenario": "wrong_pid", "who": "other-qemu"},
    ),
    Case(
        "safety",
        "our own pid given",
        "refused before anything is sent",
        qmpshutdown.PidMismatchError,
        SLACK,
        "no wait",
        {"scenario": "wrong_pid", "who": "self"},
    ),
    Case(
        "safety",
        "decoy process given as pid for a TCP monitor",
        "refused: /proc shows the decoy does not hold the connection; the decoy lives on",
        qmpshutdown.PidMismatchError,
        SLACK,
        "no wait",
        {"scenario": "tcp_decoy"},
    ),
    Case(
        "safety",
        "QEMU's human monitor (HMP) given, unix socket",
        "its greeting is not QMP: a typed error naming HMP and -qmp; the guest never signalled",
        qmpshutdown.ConnectError,
        POLICY.connect_timeout + SLACK,
        "connect_timeout",
        {"scenario": "human_monitor", "tcp": False},
    ),
    Case(
        "safety",
        "QEMU's human monitor (HMP) given, TCP port with QEMU's pid",
        "the same, though the pid is QEMU's own: a peer that is not QMP is never forced",
        qmpshutdown.ConnectError,
        POLICY.connect_timeout + SLACK,
        "connect_timeout",
        {"scenario": "human_monitor", "tcp": True},
    ),
    Case(
        "safety",
        "hung QEMU and no signals allowed",
        "no monitor and no permission to signal: a typed error, QEMU untouched",
        qmpshutdown.ConnectError,
        POLICY.connect_timeout + SLACK,
        "connect_timeout",
        {"scenario": "stopped_no_signals"},
    ),
]


class _OnLog(logging.Handler):
    """Runs *action* once, synchronously, when the ladder logs a line containing *text*."""

    def __init__(self, text: str, action: Callable[[], None]) -> None:
        super().__init__()
        self.text, self.action, self.fired = text, action, False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.fired and self.text in record.getMessage():
            self.fired = True
            self.action()


@contextlib.contextmanager
def on_log(text: str, action: Callable[[], None], logger_name: str = "qmpshutdown"):
    handler = _OnLog(text, action)
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


class Clock:
    """Times the library calls of a scenario (not the guests' boot)."""

    def __init__(self) -> None:
        self.elapsed: float | None = None

    @contextlib.contextmanager
    def timing(self):
        started = time.monotonic()
        try:
            yield
        finally:
            self.elapsed = time.monotonic() - started


async def stop(guest, clock, policy=POLICY, **kwargs):
    with clock.timing(), anyio.fail_after(policy.bound + 10):
        return as_pressed(await qmpshutdown.shutdown(guest.qmp_path, policy, **kwargs))


# ---- scenarios: each returns the outcome line ---------------------------------


async def stopped_before(guests, case, clock, caplog):
    guest = await guests.boot("cooperative")
    os.kill(guest.pid, signal.SIGSTOP)
    result = await stop(guest, clock)
    assert [(s.stage.value, s.outcome.value) for s in result.steps] == [
        ("powerdown", "skipped"),
        ("quit", "skipped"),
        ("terminate", "done"),
    ]
    assert "QEMU is stopped" in result.steps[0].detail
    assert "SIGCONT" in result.steps[2].detail
    assert await guest.wait_exit(5) == 0  # SIGTERM's clean exit, not SIGKILL
    return outcome(result)


async def stopped_during(guests, case, clock, caplog):
    guest = await guests.boot("ignores")
    with on_log("pressed the power button", lambda: os.kill(guest.pid, signal.SIGSTOP)):
        result = await stop(guest, clock)
    assert result.step("quit").outcome.value == "failed"
    # SIGCONT alone first: QEMU 10.0 crashed (SIGSEGV in monitor_cleanup, CI of stop 34)
    # when SIGTERM came with the commands it still had to read; the quit among them ends it.
    detail = result.step("terminate").detail
    continued = r"sent SIGCONT \(QEMU was stopped, \d+ commands? unanswered\); "
    assert re.match(continued, detail), detail
    assert await guest.wait_exit(5) == 0
    return outcome(result)


async def held_monitor(guests, case, clock, caplog):
    guest = await guests.boot("ignores")
    holder = await qmp_connect(guest.qmp_path)
    try:
        result = await stop(guest, clock)
        assert f"no QMP greeting within {POLICY.connect_timeout:g} s" in result.steps[0].detail
        assert await guest.wait_exit(5) == 0
        with anyio.fail_after(5):
            event = await holder.events.get()
            while event["event"] != "SHUTDOWN":
                event = await holder.events.get()
        assert event["data"]["reason"] == "host-signal"
    finally:
        await qmp_disconnect(holder)
    return outcome(result)


async def killed_while_pressing(guests, case, clock, caplog):
    guest = await guests.boot("ignores")
    kill = lambda: os.kill(guest.pid, signal.SIGKILL)  # noqa: E731
    with on_log("pressed the power button", kill) as hook:
        result = await stop(guest, clock)
    assert hook.fired
    assert result.reason is None
    assert "without a SHUTDOWN event" in result.steps[-1].detail
    assert await guest.wait_exit(5) == -signal.SIGKILL
    return outcome(result)


async def killed_between_rungs(guests, case, clock, caplog):
    guest = await guests.boot("ignores")
    with on_log("powerdown timeout:", lambda: os.kill(guest.pid, signal.SIGKILL)) as hook:
        result = await stop(guest, clock)
    assert hook.fired
    assert [s.stage.value for s in result.steps] == ["powerdown", "quit"]
    assert await guest.wait_exit(5) == -signal.SIGKILL
    return outcome(result)


async def killed_during_quit(guests, case, clock, caplog):
    guest = await guests.boot("ignores")
    kill = lambda: os.kill(guest.pid, signal.SIGKILL)  # noqa: E731
    # qemu.qmp logs each message as its writer sends it ("--> {...}")
    with on_log('"execute": "quit"', kill, logger_name="qemu.qmp.protocol") as hook:
        result = await stop(guest, clock)
    assert hook.fired
    assert result.reason is None  # QEMU died before it could say SHUTDOWN
    assert [(s.stage.value, s.outcome.value) for s in result.steps] == [
        ("powerdown", "timeout"),
        ("quit", "done"),
    ]
    assert await guest.wait_exit(5) == -signal.SIGKILL
    return outcome(result)


async def exits_during_handshake(guests, case, clock, caplog):
    guest = await guests.boot("cooperative")
    os.kill(guest.pid, signal.SIGSTOP)  # connected, but no greeting comes
    kill = lambda: os.kill(guest.pid, signal.SIGKILL)  # noqa: E731
    with on_log("waiting for its greeting", kill) as hook:
        result = await stop(guest, clock, attrs.evolve(POLICY, connect_timeout=5.0))
    assert hook.fired
    assert result.steps == ()
    return outcome(result)


async def human_monitor(guests, case, clock, caplog):
    """QEMU's human monitor (HMP) where QMP was meant: never taken for a hung QEMU."""
    if case.params["tcp"]:
        port = free_port()
        where = f"tcp:127.0.0.1:{port},server=on,wait=off"
        target: object = ("127.0.0.1", port)
    else:
        where = f"unix:{guests.root / 'hmp.sock'},server=on,wait=off"
        target = guests.root / "hmp.sock"
    guest = await guests.boot("cooperative", extra_args=["-monitor", where])
    try:
        with clock.timing(), anyio.fail_after(POLICY.bound + 10):
            await qmpshutdown.shutdown(
                target, POLICY, pid=guest.pid if case.params["tcp"] else None
            )
    except qmpshutdown.ConnectError as err:
        assert "human monitor (HMP)" in str(err) and "-qmp" in str(err), err
        raise
    finally:
        assert guest.alive() and not _stopped(guest.pid)
        # nothing reached the guest: the next stop, over QMP, finds it running and presses
        result = await stop(guest, Clock(), PRESSED)
        assert (result.stage.value, result.graceful, result.runstate) == (
            "powerdown", True, "running"
        ), result.steps  # fmt: skip


def _stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0] in ("T", "t")


async def socket_deleted(guests, case, clock, caplog):
    guest = await guests.boot("ignores")
    with on_log("pressed the power button", guest.qmp_path.unlink) as hook:
        result = await stop(guest, clock)
    assert hook.fired and not guest.qmp_path.exists()
    assert result.reason == "host-qmp-quit"
    return outcome(result)


async def reboot_loop(guests, case, clock, caplog):
    guest = await guests.boot("reboots")
    result = await stop(guest, clock, attrs.evolve(POLICY, powerdown_timeout=4.0))
    # set-action reboot=shutdown before the press: as under -no-reboot, no RESET, no new boot
    assert "RESET" not in [e.event for e in result.events]
    assert (result.graceful, result.reason) == (True, "guest-reset")
    assert result.presses >= 1  # a press during its orderly shutdown changes nothing
    assert [(s.stage.value, s.outcome.value) for s in result.steps] == [("powerdown", "done")]
    assert await guest.wait_exit(5) == 0
    return outcome(result)


async def cancel(guests, case, clock, caplog):
    guest = await guests.boot("ignores")
    if case.params["point"] == "handshake":
        os.kill(guest.pid, signal.SIGSTOP)
    caplog.set_level(logging.ERROR, logger="asyncio")
    caplog.set_level(logging.CRITICAL, logger="qemu.qmp")
    tasks_before = len(asyncio.all_tasks())
    with clock.timing(), anyio.move_on_after(0.5) as scope:
        await qmpshutdown.shutdown(guest.qmp_path, attrs.evolve(POLICY, connect_timeout=3.0))
    assert scope.cancelled_caught
    assert len(asyncio.all_tasks()) == tasks_before
    assert guest.alive()  # nothing of the ladder ran on
    os.kill(guest.pid, signal.SIGCONT)
    # QEMU serves one client per monitor: a greeting now proves ours was closed
    await qmp_disconnect(await qmp_connect(guest.qmp_path))
    gc.collect()
    await anyio.sleep(0.1)
    assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == []
    # qemu.qmp logs CRITICAL "bug in the QMP library" when a connect() is cancelled badly
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.CRITICAL] == []
    return "cancelled, monitor closed"


async def wrong_pid(guests, case, clock, caplog):
    if case.params["who"] == "other-qemu":
        guest, other = await guests.boot_many("cooperative", "ignores")
        wrong = other.pid
    else:
        guest, other = await guests.boot("cooperative"), None
        wrong = os.getpid()
    try:
        await stop(guest, clock, pid=wrong)
    finally:
        assert guest.alive() and (other is None or other.alive())
        # nothing reached the guest: the next stop finds it running and presses
        result = await stop(guest, Clock(), PRESSED)
        assert (result.stage.value, result.runstate) == ("powerdown", "running"), result.steps


async def tcp_decoy(guests, case, clock, caplog):
    port = free_port()
    guest = await guests.boot(
        "ignores", extra_args=["-qmp", f"tcp:127.0.0.1:{port},server=on,wait=off"]
    )
    decoy = subprocess.Popen(["sleep", "60"])  # noqa: ASYNC220 (a decoy, started at once)
    try:
        with clock.timing(), anyio.fail_after(10):
            await qmpshutdown.shutdown(("127.0.0.1", port), POLICY, pid=decoy.pid)
    finally:
        assert decoy.poll() is None  # never signalled
        assert guest.alive()
        decoy.kill()
        decoy.wait()


async def stopped_no_signals(guests, case, clock, caplog):
    guest = await guests.boot("cooperative")
    os.kill(guest.pid, signal.SIGSTOP)
    try:
        await stop(guest, clock, attrs.evolve(POLICY, stages=("powerdown", "quit")))
    finally:
        assert guest.alive()


async def exit_held(guests, case, clock, caplog):
    # Seen on QEMU 10.0 and 7.2 by chance (docs/why.md: the stalled exit), made here on
    # demand: a blockdev-backup job from an NBD export whose last MiB the test's server
    # holds is in flight when the guest powers off, and QEMU's exit drains it.
    released, mode = case.params["released"], case.params.get("mode", "cooperative")
    caplog.set_level(logging.DEBUG, logger="qemu.qmp")  # every message sent: "--> {...}"
    sock = guests.root / f"nbd-{len(guests.guests)}.sock"
    async with HoldingNbd(sock) as nbd:
        guest = await guests.boot(mode, restore=False, extra_args=held_job_args(sock))
        await start_held_job(guest.qmp_path, nbd)  # the job waits on the held read
        action = nbd.release if released else (lambda: None)
        with on_log("sent SIGTERM", action) as hook, clock.timing(), anyio.fail_after(
            POLICY.bound + 10
        ):
            result = await qmpshutdown.shutdown(guest.qmp_path, POLICY)  # the raw record
        assert hook.fired and nbd.held >= 1
        if mode == "ignores":  # quit began the exit, and its step says how it ended
            assert [(s.stage.value, s.outcome.value) for s in result.steps] == [
                ("powerdown", "timeout"), ("quit", "done")
            ]  # fmt: skip
            detail = result.step("quit").detail
            assert detail.endswith(
                "QEMU exited (SHUTDOWN host-qmp-quit); its exit had stalled until a SIGTERM woke it"
            ), detail
            assert await guest.wait_exit(5) == 0
            return outcome(result)
        assert result.reason == "guest-shutdown" and result.graceful
        powerdown = result.step("powerdown")
        if released:
            assert [(s.stage.value, s.outcome.value) for s in result.steps] == [
                ("powerdown", "done")
            ]
            assert powerdown.detail.endswith(
                "guest powered off (SHUTDOWN guest-shutdown); its exit had stalled until a "
                "SIGTERM woke it"
            ), powerdown.detail
            assert await guest.wait_exit(5) == 0
        else:
            assert [(s.stage.value, s.outcome.value) for s in result.steps] == [
                ("powerdown", "failed"), ("quit", "skipped"), ("terminate", "timeout"),
                ("kill", "done"),
            ]  # fmt: skip
            assert await guest.wait_exit(5) == -signal.SIGKILL
        # Nothing was sent into the exit: no query-status, no sampler's reading, no
        # set-action to put the reboot action back (QEMU 10.0 can crash reading one).
        said = [r.getMessage() for r in caplog.records]
        shutdown = next(i for i, line in enumerate(said) if "event SHUTDOWN" in line)
        sent = [line for line in said[shutdown:] if "--> " in line]
        assert sent == [], sent
        assert [line for line in said[:shutdown] if "--> " in line], "the log shows commands"
    return outcome(result)


async def exit_held_no_force(guests, case, clock, caplog):
    # The ladder's end (finish) sends nothing into an exit it leaves running: stand-ins
    # showed it (tests/test_ladder.py); here a real QEMU's exit is held until after it.
    caplog.set_level(logging.DEBUG, logger="qemu.qmp")  # every message sent: "--> {...}"
    caplog.set_level(logging.DEBUG, logger="qmpshutdown")  # each event: "event SHUTDOWN ..."
    sock = guests.root / f"nbd-{len(guests.guests)}.sock"
    policy = attrs.evolve(POLICY, stages=("powerdown",))
    async with HoldingNbd(sock) as nbd:
        guest = await guests.boot("cooperative", restore=False, extra_args=held_job_args(sock))
        await start_held_job(guest.qmp_path, nbd)
        try:
            with clock.timing(), anyio.fail_after(policy.bound + 10):
                await qmpshutdown.shutdown(
                    guest.qmp_path, policy, evidence_dir=guests.root  # a screenshot if forced
                )
        except qmpshutdown.ShutdownFailed as failed:
            result = failed.result
            assert result.reason == "guest-shutdown" and not result.forced
            assert [(s.stage.value, s.outcome.value) for s in result.steps] == [
                ("powerdown", "failed")
            ]
            assert result.screenshot is None
            assert guest.alive()  # in its exit, held
            said = [r.getMessage() for r in caplog.records]
            shutdown = next(i for i, line in enumerate(said) if "event SHUTDOWN" in line)
            sent = [line for line in said[shutdown:] if "--> " in line]
            assert sent == [], sent  # its command line ends QEMU: only an exit can follow
            assert [line for line in said[:shutdown] if "--> " in line], "the log shows commands"
            raise
        finally:
            nbd.release()
            assert await guest.wait_exit(10) == 0  # the read answered: the exit ends


SCENARIOS: dict[str, Callable[..., Awaitable[str | None]]] = {
    name: globals()[name] for name in {case.params["scenario"] for case in CASES}
}


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
async def test_fault(case: Case, guests, caplog) -> None:
    scenario = SCENARIOS[case.params["scenario"]]
    clock = Clock()
    if isinstance(case.expect, type):
        with pytest.raises(case.expect):
            await scenario(guests, case, clock, caplog)
    else:
        assert await scenario(guests, case, clock, caplog) == case.expect
    assert clock.elapsed is not None and clock.elapsed <= case.limit, clock.elapsed
