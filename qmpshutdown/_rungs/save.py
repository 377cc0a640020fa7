"""The save rung: keep the running guest's whole state (RAM and devices) in a file, then quit.

Started again from that file (``launch(argv, restore=PATH)``, or QEMU's own
``-incoming``), the guest goes on from the very instruction where it stopped.
The file is opened here (mode 0600, ``O_EXCL``) and handed to QEMU as a
descriptor over the monitor socket (SCM_RIGHTS, ``getfd``), so no path ever
reaches a command line or a shell; ``migrate`` writes it, its end is read from
the MIGRATION events (capability ``events``), bounded by ``save_timeout``.
A save that fails, is cancelled or runs out of time is cancelled in QEMU
(``migrate_cancel``), its partial file removed, and the guest runs on as it
was: the ladder goes on to ``quit``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from collections.abc import Mapping

import anyio

from .._errors import CommandError, MonitorClosedError
from .._fdpass import FdPassingUnsupported, pass_fd
from .._policy import Stage
from .._qemu import Qemu
from .._result import Cause, Outcome
from .._steps import Ended, OpenStep
from .base import Budgeted, no_monitor
from .quit import quit_and_wait

logger = logging.getLogger("qmpshutdown")

#: Room the file needs beyond the guest's RAM (device state, stream overhead).
SPACE_MARGIN = 64 * 2**20
#: The state file's suffix.
SUFFIX = ".qemu-state"
#: MIGRATION statuses after which nothing more happens.
FINISHED = frozenset({"completed", "failed", "cancelled"})
#: Runstates with nothing (or nothing sane) to save.
UNSAVABLE_STATES = frozenset(
    {"shutdown", "inmigrate", "postmigrate", "finish-migrate", "colo", "save-vm", "restore-vm",
     "guest-panicked", "internal-error"}
)  # fmt: skip
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_MIB = 2**20


def state_file_name(target: str) -> str:
    """A new state file's name: the target made safe (any characters), the time, a random tag."""
    safe = _UNSAFE.sub("_", target).strip("._-")[:64] or "qemu"
    stamp = time.strftime("%Y%m%dT%H%M%S")
    return f"{safe}-{stamp}-{os.urandom(4).hex()}{SUFFIX}"


def _mib(size: int) -> str:
    return f"{size / _MIB:.1f} MiB"


class Save(Budgeted):
    """Save the guest's whole state to a new file in the job's ``save_dir``, then ``quit``.

    The file is the step's ``path`` once it was written whole (the record's
    ``saved_state`` when this rung ended the VM).
    """

    stage = Stage.SAVE
    forced = True  # it ends the VM (QEMU is in postmigrate, then quit)

    def why_not(self, qemu: Qemu) -> Ended | None:
        skip = no_monitor(qemu, or_closed=True)
        if skip is not None:
            return skip
        if qemu.job.save_dir is None:
            return Ended(Outcome.SKIPPED, "no save_dir given: nowhere to keep the state")
        return None

    async def run(self, qemu: Qemu, step: OpenStep) -> Ended:
        save_dir = qemu.job.save_path
        assert save_dir is not None
        runstate = await qemu.read_runstate()
        if runstate is None:
            return Ended(Outcome.FAILED, "no answer to query-status", Cause.MONITOR_UNRESPONSIVE)
        if runstate in UNSAVABLE_STATES:
            return Ended(Outcome.SKIPPED, f"guest is in runstate {runstate}: nothing to save")
        too_little = await _too_little_space(qemu, save_dir)
        if too_little is not None:
            return too_little
        try:
            dir_fd = os.open(save_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as err:
            return Ended(Outcome.FAILED, f"cannot open save_dir {save_dir!r}: {err}")
        try:
            return await self._save_in(qemu, step, save_dir, dir_fd)
        finally:
            os.close(dir_fd)

    async def _save_in(self, qemu: Qemu, step: OpenStep, save_dir: str, dir_fd: int) -> Ended:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
        for _ in range(5):  # a name taken already (O_EXCL): draw another
            name = state_file_name(qemu.recorder.name)
            try:
                fd = os.open(name, flags, 0o600, dir_fd=dir_fd)
                break
            except FileExistsError:
                continue
            except OSError as err:
                return Ended(Outcome.FAILED, f"cannot create a state file in {save_dir!r}: {err}")
        else:
            return Ended(Outcome.FAILED, f"no free state file name in {save_dir!r}")
        path = os.path.join(save_dir, name)
        keep = False
        try:
            os.fchmod(fd, 0o600)  # whatever the umask: it holds the guest's memory
            ended = await _migrate_to(qemu, step, fd, path)
            if ended is not None:
                return ended
            await anyio.to_thread.run_sync(os.fsync, fd)
            await anyio.to_thread.run_sync(os.fsync, dir_fd)  # the file's name, too
            size = os.fstat(fd).st_size
            keep = True
            step.wrote(path)  # before quit: QEMU's exit may end this step at once
            step.note(f"saved {_mib(size)} ({size} bytes) to {path}")
        finally:
            os.close(fd)
            if not keep:
                with contextlib.suppress(OSError):
                    os.unlink(name, dir_fd=dir_fd)
        return await _quit_after_save(qemu, step, path)


async def _too_little_space(qemu: Qemu, save_dir: str) -> Ended | None:
    """Skipped (with the figures) when *save_dir* cannot hold the guest's RAM plus a margin."""
    try:
        reply = await qemu.command("query-memory-size-summary")
    except (CommandError, MonitorClosedError, TimeoutError) as err:
        return Ended(Outcome.FAILED, f"query-memory-size-summary failed: {str(err) or 'no reply'}")
    ram = 0
    if isinstance(reply, Mapping):
        ram = int(reply.get("base-memory", 0)) + int(reply.get("plugged-memory", 0))
    try:
        stat = os.statvfs(save_dir)
    except OSError as err:
        return Ended(Outcome.FAILED, f"cannot read the free space of {save_dir!r}: {err}")
    free, need = stat.f_bavail * stat.f_frsize, ram + SPACE_MARGIN
    if free < need:
        why = (
            f"too little space in {save_dir}: {_mib(free)} free ({free} bytes), "
            f"needs {_mib(need)} ({need} bytes: RAM {_mib(ram)} + margin {_mib(SPACE_MARGIN)})"
        )
        return Ended(Outcome.SKIPPED, why)
    return None


async def _migrate_to(qemu: Qemu, step: OpenStep, fd: int, path: str) -> Ended | None:
    """Have QEMU write its state to *fd*; None once it completed, else how the rung ended."""
    assert qemu.monitor is not None
    policy = qemu.policy
    fdname = f"qmpshutdown-save-{os.urandom(4).hex()}"
    try:
        await qemu.command(
            "migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]}
        )
        with anyio.fail_after(policy.command_timeout):
            await pass_fd(qemu.monitor, fd, fdname)
    except FdPassingUnsupported as err:
        return Ended(Outcome.SKIPPED, f"cannot pass the state file to QEMU: {err}")
    except (CommandError, MonitorClosedError, TimeoutError) as err:
        return Ended(Outcome.FAILED, f"preparing the save failed: {str(err) or 'no reply'}")
    mark = len(qemu.watch.events)
    started = anyio.current_time()
    try:
        await qemu.command("migrate", {"uri": f"fd:{fdname}"})
    except (CommandError, MonitorClosedError, TimeoutError) as err:
        with contextlib.suppress(CommandError, MonitorClosedError, TimeoutError):
            await qemu.command("closefd", {"fdname": fdname})
        return Ended(Outcome.FAILED, f"migrate refused: {str(err) or 'no reply'}")
    step.note(f"saving the guest's state to {path}")
    finished = False
    try:
        status = await _wait_migration(qemu, mark, started + policy.save_timeout)
        if status is None:
            step.note(f"no end of the save in {policy.save_timeout:g} s; migrate_cancel")
            await qemu.try_command("migrate_cancel")
            until = anyio.current_time() + policy.command_timeout
            status = await _wait_migration(qemu, mark, until)
            if status != "completed":
                return await _left_running(qemu, f"save timed out after {policy.save_timeout:g} s")
        finished = True
    finally:
        if not finished and not qemu.gone:  # cancelled from outside: leave the guest running
            with anyio.move_on_after(policy.command_timeout, shield=True):
                await qemu.try_command("migrate_cancel")
    if status != "completed":
        return await _left_running(qemu, f"save {status}{await _error_desc(qemu)}")
    took = anyio.current_time() - started
    step.note(f"QEMU wrote the guest's state to {path} in {took:.2f} s")
    return None


async def _wait_migration(qemu: Qemu, mark: int, deadline: float) -> str | None:
    """The first finished MIGRATION status after event *mark*, or None at *deadline*."""

    def finished() -> str | None:
        for event in qemu.watch.events[mark:]:
            status = event.data.get("status")
            if event.event == "MIGRATION" and status in FINISHED:
                return str(status)
        return None

    await qemu.watch.wait_until(lambda: finished() is not None, deadline)
    return finished()


async def _error_desc(qemu: Qemu) -> str:
    try:
        reply = await qemu.command("query-migrate")
    except (CommandError, MonitorClosedError, TimeoutError):
        return ""
    desc = reply.get("error-desc") if isinstance(reply, Mapping) else None
    return f": {desc}" if desc else ""


async def _left_running(qemu: Qemu, what: str) -> Ended:
    """A save that did not finish: the file goes (the caller removes it); say how the guest is."""
    runstate = await qemu.read_runstate()
    outcome = Outcome.TIMEOUT if "timed out" in what else Outcome.FAILED
    return Ended(
        outcome, f"{what}; cancelled, partial file removed; guest left {runstate or 'unknown'}"
    )


async def _quit_after_save(qemu: Qemu, step: OpenStep, path: str) -> Ended:
    """End QEMU, its guest no longer running (runstate postmigrate): the VM lives on in *path*."""
    return await quit_and_wait(qemu, step, kept=" (the state is kept)")
