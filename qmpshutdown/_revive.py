"""Saved on the way down, started again after: the manifest and ``--restore``.

``--all --save-dir DIR`` leaves, beside each state file the save rung wrote, a
manifest (``STATE.manifest.json``, 0600, written atomically): the QEMU's
command line, working directory and name, and the state file's name.
``--restore DIR`` starts each such VM again with that command line plus
``-incoming defer``, **detached** (its own session, stdio on /dev/null and a
log file: it outlives the command), loads the state over its QMP monitor
(``load_state``: a descriptor over SCM_RIGHTS, no shell), checks that it runs,
and then retires the manifest (``*.restored``) so that a second ``--restore``
starts nothing twice. Nothing from a manifest is executed but a QEMU command
line whose program is a QEMU system emulator.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Any

import anyio
import attrs

from ._discover import Found, describe
from ._errors import ConnectError, LaunchError
from ._process import PidfdProcess, is_qemu_executable
from ._qemuargs import without_incoming
from ._restore import INCOMING_ARGS, load_state, open_state
from ._watch import race

logger = logging.getLogger(__name__)

#: A manifest's name: the state file's plus this.
MANIFEST_SUFFIX = ".manifest.json"
#: What a restored VM's manifest is renamed to end with.
RETIRED_SUFFIX = ".restored"
#: The format's tag and version, so that a file that is not ours is never run.
FORMAT = "qmpshutdown-manifest"
VERSION = 1
#: Seconds a restored QEMU gets to open its monitor and load its state.
RESTORE_TIMEOUT = 120.0
#: Outcomes of a restore.
RESTORED = "restored"
#: Runstates of a VM that runs again; with -S on its command line ``paused`` too. (QEMU
#: pauses a VM whose disks it cannot lock once loaded: "Failed to get "write" lock".)
RUNNING = frozenset({"running"})
STOPPED_BY_S = frozenset({"running", "paused", "prelaunch"})


class ManifestError(ValueError):
    """A manifest that is not ours, is corrupt, or names what is not there."""


def write_manifest(vm: Found, state: str) -> str:
    """Write *vm*'s manifest beside its state file *state* (0600, atomically); return its path."""
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "name": vm.name,
        "argv": list(vm.argv),
        "cwd": vm.cwd,
        "state": os.path.basename(state),
        "pid": vm.pid,
    }
    directory = os.path.dirname(os.path.abspath(state))
    path = os.path.join(directory, os.path.basename(state) + MANIFEST_SUFFIX)
    fd, temporary = tempfile.mkstemp(prefix=".manifest-", dir=directory)  # mode 0600
    try:
        with os.fdopen(fd, "w") as file:
            json.dump(manifest, file, indent=1)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    logger.info("%s: manifest %s", vm.name, path)
    return path


@attrs.frozen(kw_only=True)
class Manifest:
    """A manifest read back and checked."""

    path: str
    name: str
    argv: tuple[str, ...]
    cwd: str
    state: str  #: the state file's absolute path (always in the manifest's directory)

    @property
    def socket(self) -> str:
        """The QMP unix socket its command line gives (the state is passed over it)."""
        found = describe(0, self.argv, self.cwd)
        if not isinstance(found.target, str):
            raise ManifestError(f"{self.name}: its command line has no QMP unix socket")
        return found.target


def read_manifest(path: str) -> Manifest:
    """Read and check one manifest.

    :raises ManifestError: not ours, corrupt, or its state file is missing.
    """
    try:
        with open(path, encoding="utf-8") as file:
            data: Any = json.load(file)
    except (OSError, ValueError) as err:
        raise ManifestError(f"cannot read it: {err}") from err
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ManifestError("not a qmpshutdown manifest")
    if data.get("version") != VERSION:
        raise ManifestError(f"manifest version {data.get('version')!r}, not {VERSION}")
    argv, cwd, name, state = (data.get(k) for k in ("argv", "cwd", "name", "state"))
    if not (isinstance(argv, list) and argv and all(isinstance(a, str) and a for a in argv)):
        raise ManifestError("corrupt: argv is not a list of strings")
    if not is_qemu_executable(argv[0]):
        raise ManifestError(f"its program {argv[0]!r} is not a QEMU system emulator")
    if not isinstance(cwd, str) or not os.path.isabs(cwd):
        raise ManifestError("corrupt: cwd is not an absolute path")
    if not isinstance(name, str) or not name:
        raise ManifestError("corrupt: no name")
    if not isinstance(state, str) or not state or os.path.basename(state) != state:
        raise ManifestError("corrupt: state is not a file name")
    state_path = os.path.join(os.path.dirname(os.path.abspath(path)), state)
    if not os.path.isfile(state_path):
        raise ManifestError(f"its state file {state_path} is missing")
    return Manifest(path=path, name=name, argv=tuple(argv), cwd=cwd, state=state_path)


@attrs.frozen(kw_only=True)
class Restored:
    """How one saved VM's restore went (a ``--restore --json`` row)."""

    name: str
    outcome: str  #: ``restored``, ``bad-manifest``, ``did-not-start`` or ``did-not-load``
    pid: int | None = None
    state: str | None = None
    manifest: str | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """``pid``, ``name``, ``outcome``, ``state``, ``manifest``, and ``error`` when it failed."""
        row = {"pid": self.pid, "name": self.name, "outcome": self.outcome,
               "state": self.state, "manifest": self.manifest}  # fmt: skip
        if self.error is not None:
            row["error"] = self.error
        return row


def start_detached(argv: list[str], cwd: str, log: str) -> int:
    """Start *argv* in its own session, stdio on /dev/null and *log*: it outlives us."""
    with open(log, "ab") as stderr:
        popen = subprocess.Popen(
            argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
            start_new_session=True, close_fds=True,
        )  # fmt: skip
    pid = popen.pid
    # Detached on purpose: no warning that it still runs when the object goes.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        del popen
    return pid


async def restore_one(manifest: Manifest) -> Restored:
    """Start one saved VM again from its state, detached; retire its manifest once it runs."""
    row = Restored(name=manifest.name, outcome="", state=manifest.state, manifest=manifest.path)
    try:
        socket = manifest.socket
        fd = open_state(manifest.state, manifest.name)
    except (ManifestError, LaunchError) as err:
        return attrs.evolve(row, outcome="bad-manifest", error=str(err))
    log = manifest.state + ".log"
    try:
        daemonize = ("-daemonize", "--daemonize")
        argv = [a for a in without_incoming(manifest.argv) if a not in daemonize]
        try:
            pid = start_detached([*argv, *INCOMING_ARGS], manifest.cwd, log)
        except OSError as err:
            return attrs.evolve(row, outcome="did-not-start", error=str(err))
        row = attrs.evolve(row, pid=pid)
        process = PidfdProcess(pid, os.pidfd_open(pid))
        try:
            with anyio.fail_after(RESTORE_TIMEOUT):
                runstate = await race(
                    process.wait_exited,
                    lambda: load_state(socket, fd, RESTORE_TIMEOUT, manifest.name),
                )
        except (LaunchError, ConnectError, TimeoutError) as err:
            if not process.has_exited():
                process.send_signal(signal.SIGKILL)  # ours, half started: it must not linger
                with anyio.move_on_after(10):
                    await process.wait_exited()
            # No monitor: QEMU did not start (it exits on a bad command line); else the load failed.
            outcome = "did-not-start" if isinstance(err, ConnectError) else "did-not-load"
            return attrs.evolve(row, outcome=outcome, error=f"{err}{_tail(log)}")
        finally:
            process.close()
        if runstate is None:
            return attrs.evolve(row, outcome="did-not-start", error=f"QEMU exited{_tail(log)}")
    finally:
        os.close(fd)
    if runstate not in (STOPPED_BY_S if "-S" in manifest.argv else RUNNING):
        # Loaded, yet not running: it is ours and must not linger half restored.
        _kill(pid)
        why = f"runstate {runstate} after the load{_tail(log)}"
        return attrs.evolve(row, outcome="did-not-load", error=why)
    os.replace(manifest.path, manifest.path + RETIRED_SUFFIX)
    logger.info("%s: restored, pid %d (runstate %s)", manifest.name, pid, runstate)
    return attrs.evolve(row, outcome=RESTORED)


def _kill(pid: int) -> None:
    with contextlib.suppress(OSError):
        pidfd = os.pidfd_open(pid)
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        finally:
            os.close(pidfd)


def _tail(log: str) -> str:
    try:
        lines = Path(log).read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return f": {' '.join(lines[-2:])}" if lines else ""


async def restore_dir(directory: str) -> list[Restored]:
    """Restore every VM whose manifest is in *directory*, one after the other, never twice."""
    try:
        names = sorted(n for n in os.listdir(directory) if n.endswith(MANIFEST_SUFFIX))
    except OSError as err:
        return [Restored(name=directory, outcome="bad-manifest", error=str(err))]
    rows = []
    for name in names:
        path = os.path.join(directory, name)
        try:
            manifest = read_manifest(path)
        except ManifestError as err:
            label = name.removesuffix(MANIFEST_SUFFIX)
            rows.append(Restored(name=label, outcome="bad-manifest", manifest=path, error=str(err)))
            continue
        rows.append(await restore_one(manifest))
    return rows
