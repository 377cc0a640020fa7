"""Test guests restored from a state saved at their first boot's READY, not booted again.

A busybox guest takes 5-11 s and about 5.5 CPU-seconds to boot under TCG on a
2-core machine; QEMU loads a saved state of the same guest in about 0.2-0.3 s and
0.2 CPU-s. So the first guest of a *kind* (the same QEMU binary, the same kernel
and initramfs, the same command line but for its own directory) is booted for
real to its READY line, migrated into a file under ``build/states/`` while it
runs, and ended; every later guest of that kind starts with ``-incoming
'exec:cat STATE'`` and runs on from where the first stood at READY. Its serial
log begins with the first one's lines (the READY line included), so a test
reads the same console either way.

Only what a saved state stands for exactly is restored: a mode whose guest does
nothing after READY but wait for the power button (not ``asleep``, ``panics``
or ``counts``: their clocks start at READY) and whose first answer to the
button no test times (not ``cooperative`` or ``slow``: see :data:`RESTORABLE_MODES`), QMP
on, and no QEMU or kernel arguments of the test's own (``-S``, ``-incoming``, a
free port: each would be a kind of its own). A guest with a disk gets a copy of
the disk its kind's first guest had when the save ended (QEMU flushes and lets go
of its images then): the page cache and journal in the state expect that disk.
``QMPSHUTDOWN_TEST_RESTORE=0`` boots every guest. The states are keyed by
content (a changed image or QEMU is a new kind); ``rm -rf build/states`` is
always safe. xdist workers share them: the first to need a kind boots it
under a lock file, the others wait for it.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import os
import shlex
import shutil
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

#: Modes whose guest, once READY, only waits for the button (see the module's docstring),
#: and whose tests do not time its answer to the first press: a restored guest starts with
#: an empty TCG translation cache, and its first press handler (a shell, a dozen programs,
#: the kernel's power-off) runs about 0.35 s slower on an idle host (cooperative, QEMU 7.2,
#: press to exit: 0.52-0.55 s against 0.18-0.21 s booted), seconds on a loaded one: past the
#: 1-2 s timeouts that tests of cooperative and slow guests count on. (Restoring cooperative
#: guests too was tried: 0.7 CPU-s against 5.2-6.5 for a boot, but in one pass of the
#: real-guest tests out of two a restored cooperative guest was not off within an Ansible
#: test's 2 s and was forced.)
RESTORABLE_MODES = frozenset({"ignores", "needs-presses", "reboots", "updating", "stalls"})
#: Off with QMPSHUTDOWN_TEST_RESTORE=0: every guest is booted.
ENABLED = os.environ.get("QMPSHUTDOWN_TEST_RESTORE", "1") != "0"
#: The longest saving a kind's first guest may take (a 100 MB state takes ~1 s here).
SAVE_TIMEOUT = 60.0
#: The chardev id of a restored guest's serial console (a file it appends to).
SERIAL_ID = "qsdserial"


def restorable(
    mode: str,
    *,
    qmp: bool,
    wait_ready: bool,
    extra_args: Sequence[str],
    kernel_args: Sequence[str],
) -> bool:
    """Whether a guest booted with these options may be restored instead."""
    return (
        ENABLED and mode in RESTORABLE_MODES and qmp and wait_ready
        and not extra_args and not kernel_args
    )  # fmt: skip


def kind_of(
    argv: Sequence[str], workdir: Path, files: Sequence[Path], texts: Sequence[str] = ()
) -> str:
    """The kind of a guest: its command line but for *workdir*, and what its files hold.

    :param files: the kernel and initramfs (their size and mtime stand for their content).
    :param texts: whatever else makes the kind (how its disk is made).
    """
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode() + b"\0")
    binary = shutil.which(argv[0]) or argv[0]
    for path in (binary, *files):
        stat = os.stat(path)
        digest.update(f"{os.path.realpath(path)}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    digest.update("\0".join(arg.replace(str(workdir), "{workdir}") for arg in argv).encode())
    return digest.hexdigest()[:24]


async def state_of(
    states: Path, kind: str, first: Callable[[Path], Awaitable[Any]], end: Callable[[], None]
) -> tuple[Path, Path]:
    """The saved state of *kind* and its serial log; the first caller makes them.

    :param first: boots the kind's first guest in the directory it is given, to READY;
        returns it (a ``Guest``: its ``qmp_path``, ``serial_log`` and ``disk_path`` are
        read; a disk is saved too, at :func:`disk_of` the state).
    :param end: kills and reaps every guest *first* started (called however it went).
    """
    state, serial = states / f"{kind}.state", states / f"{kind}.serial"
    disk = disk_of(state)
    if state.is_file():
        return state, serial
    states.mkdir(parents=True, exist_ok=True)
    lock = os.open(states / f"{kind}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        await asyncio.to_thread(fcntl.flock, lock, fcntl.LOCK_EX)
        if not state.is_file():  # another worker may have made it while this one waited
            # Not under states/: a unix socket's path must stay short (108 bytes).
            workdir = Path(tempfile.mkdtemp(prefix="qsd-first-"))
            try:
                guest = await first(workdir)
                partial = states / f"{kind}.{os.getpid()}.partial"
                await _save(guest.qmp_path, partial)
                shutil.copyfile(guest.serial_log, serial)
                if guest.disk_path is not None:
                    # Paused at the end of the save, its disk flushed and let go of by QEMU
                    # (the image inactivated, as for a destination to take over): the disk
                    # as the saved page cache and journal expect it.
                    await asyncio.to_thread(shutil.copyfile, guest.disk_path, disk)
                os.replace(partial, state)  # last: the state's name says both are whole
            finally:
                end()
                shutil.rmtree(workdir, ignore_errors=True)
    finally:
        os.close(lock)  # and with it the lock
    return state, serial


def disk_of(state: Path) -> Path:
    """The disk saved beside *state* (its kind's guests have one): a copy for each restored one."""
    return state.with_suffix(".disk.qcow2")


class _Monitor:
    """A few JSON lines over QMP's unix socket, every read bounded; events are skipped.

    Not qemu.qmp: it takes the first message after ``qmp_capabilities`` for its reply,
    and a QEMU loading a state may send an event (RESUME) before that reply.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader, self._writer = reader, writer

    @classmethod
    async def connect(cls, path: Path, timeout: float = 10.0) -> _Monitor:
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), timeout)
        monitor = cls(reader, writer)
        try:
            greeting = await monitor._read(timeout)
            while "event" in greeting:
                # QEMU 7.2 loading a state can send an event (MIGRATION setup) to a new
                # connection before its greeting (CI of stop 37): skip it.
                greeting = await monitor._read(timeout)
            if "QMP" not in greeting:
                raise RuntimeError(f"not a QMP greeting: {greeting}")
            await monitor.execute("qmp_capabilities", timeout=timeout)
        except BaseException:
            monitor.close()
            raise
        return monitor

    async def _read(self, timeout: float) -> dict[str, Any]:
        line = await asyncio.wait_for(self._reader.readline(), timeout)
        if not line:
            raise EOFError("QMP socket closed")
        message = json.loads(line)
        if not isinstance(message, dict):
            raise RuntimeError(f"not a QMP message: {line!r}")
        return message

    async def execute(
        self, command: str, arguments: dict[str, Any] | None = None, *, timeout: float = 10.0
    ) -> Any:
        request: dict[str, Any] = {"execute": command}
        if arguments is not None:
            request["arguments"] = arguments
        self._writer.write(json.dumps(request).encode() + b"\n")
        await self._writer.drain()
        while True:
            reply = await self._read(timeout)
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise RuntimeError(f"{command}: {reply['error']}")

    def close(self) -> None:
        self._writer.close()


async def _save(qmp_path: Path, into: Path) -> None:
    """Migrate the running guest behind *qmp_path* into the file *into* (QEMU's exec: URI)."""
    monitor = await _Monitor.connect(qmp_path)
    try:
        # While it runs: the state says "running", and the restored guest starts at once.
        await monitor.execute("migrate", {"uri": f"exec:cat > {shlex.quote(str(into))}"})
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SAVE_TIMEOUT
        while True:
            reply = await monitor.execute("query-migrate")
            status = reply.get("status") if isinstance(reply, dict) else None
            if status == "completed":
                return
            if status in ("failed", "cancelled") or loop.time() > deadline:
                raise RuntimeError(f"saving the first guest of a kind: {status}: {reply}")
            await asyncio.sleep(0.05)
    finally:
        monitor.close()


def restoring_argv(argv: Sequence[str], state: Path) -> list[str]:
    """*argv* loading *state*: its serial file appended to, not truncated, and ``-incoming``."""
    out = list(argv)
    at = out.index("-serial")
    target = out[at + 1]
    if not target.startswith("file:"):
        raise ValueError(f"a restored guest's serial console must be a file, not {target!r}")
    path = target[len("file:") :]
    out[at : at + 2] = [
        "-chardev", f"file,id={SERIAL_ID},path={path},append=on", "-serial", f"chardev:{SERIAL_ID}",
    ]  # fmt: skip
    return [*out, "-incoming", f"exec:cat {shlex.quote(str(state))}"]


async def wait_running(qmp_path: Path, timeout: float, alive: Callable[[], bool]) -> None:
    """Wait until the guest loading its state behind *qmp_path* runs (runstate ``running``).

    :raises RuntimeError: when QEMU exits first, or the load ends other than running.
    :raises TimeoutError: after *timeout* seconds.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    monitor = await _Monitor.connect(qmp_path, timeout)
    try:
        while True:
            reply = await monitor.execute("query-status", timeout=timeout)
            status = reply.get("status") if isinstance(reply, dict) else None
            if status == "running":
                return
            if status != "inmigrate" or not alive():
                running = "running" if alive() else "exited"
                raise RuntimeError(f"a restored guest is {status}, not running (QEMU {running})")
            if loop.time() > deadline:
                raise TimeoutError(f"a restored guest still loading its state after {timeout} s")
            await asyncio.sleep(0.02)
    finally:
        monitor.close()
