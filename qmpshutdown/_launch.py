"""``launch()``: boot QEMU for a harness, and always take it down again.

QEMU gets two QMP monitors on unix sockets in a private temp dir: one the
caller holds as ``vm.monitor``, one kept free for the ladder, so the teardown
works whatever the caller's connection is doing (QEMU serves one client per
monitor). Nothing here holds a cancel scope or task group across the caller's
block: ``__aenter__`` and ``__aexit__`` may run in different tasks (as
pytest-asyncio does with fixtures).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import anyio
from qemu.qmp import QMPClient

from ._arguments import check_save_dir
from ._attach import stop
from ._connect import open_client
from ._errors import ConnectError, Error, LaunchError, QemuExited, ShutdownFailed
from ._job import Job
from ._monitor import close_client
from ._policy import DEFAULT_POLICY, ShutdownPolicy, Stage
from ._process import PidfdProcess
from ._progress import ProgressCallback
from ._qemuargs import without_incoming
from ._restore import INCOMING_ARGS, load_state, open_state
from ._result import ShutdownResult
from ._rungs import LAST_RESORT_KILL, plan
from ._spawn import (
    AGENT_SOCKET,
    CALLER_SOCKET,
    LADDER_SOCKET,
    command_line,
    console_log_path,
    spawn,
)
from ._watch import race

logger = logging.getLogger("qmpshutdown")

_STDERR_LIMIT = 64 * 1024

class VM:
    """A QEMU started by :func:`launch`; stopped and reaped when its block ends.

    :ivar pid: QEMU's pid.
    :ivar qmp_socket: the unix socket of the caller's QMP monitor.
    :ivar monitor: a connected :class:`qemu.qmp.QMPClient` for the caller's own
        commands (its ``events`` listener keeps only the latest 1,000 events).
    :ivar name: the name used in log lines.
    :ivar result: the :class:`ShutdownResult` of the stop, once QEMU was stopped.
    :ivar console_log: the serial console's log file (``console_log=True``), else None;
        launch's own is removed with its private dir when the block ends.
    :ivar evidence_dir: where a forced stop saves the guest's screen, else None.
    :ivar agent_socket: the guest agent's chardev socket (``launch(agent=True)``),
        else None; the teardown and ``vm.shutdown()`` use it.
    """

    def __init__(
        self,
        argv: Sequence[str],
        policy: ShutdownPolicy,
        name: str | None,
        startup_timeout: float,
        on_progress: ProgressCallback | None = None,
        evidence_dir: str | os.PathLike[str] | None = None,
        console_log: bool = False,
        agent: bool = False,
        *,
        save_dir: str | os.PathLike[str] | None = None,
        restore: str | os.PathLike[str] | None = None,
    ) -> None:
        if isinstance(argv, (str, bytes)) or not argv:
            raise TypeError("argv is QEMU's command line as a sequence, binary first")
        if not isinstance(policy, ShutdownPolicy):
            raise TypeError(f"policy must be a ShutdownPolicy, not {type(policy).__name__}")
        self.argv = [os.fspath(arg) for arg in argv]
        self.policy = policy
        self.name = name or os.path.basename(self.argv[0])
        self.startup_timeout = startup_timeout
        self.on_progress = on_progress
        self.save_dir = check_save_dir(save_dir)
        if restore is not None and not isinstance(restore, (str, os.PathLike)):
            raise TypeError(f"restore must be a state file's path or None, not {restore!r}")
        self.restore = None if restore is None else os.fspath(restore)
        if not isinstance(console_log, bool):
            raise TypeError(f"console_log must be True or False, not {console_log!r}")
        if console_log:
            console_log_path(self.argv, Path("."))  # a -serial it cannot use: refused now
        self._console_log = console_log
        self.evidence_dir = None if evidence_dir is None else os.path.abspath(evidence_dir)
        self.agent = agent
        self.result: ShutdownResult | None = None
        self._dir: Path | None = None
        self._popen: subprocess.Popen[bytes] | None = None
        self._process: PidfdProcess | None = None
        self._monitor: QMPClient | None = None

    # ---- what the caller sees -------------------------------------------------

    @property
    def pid(self) -> int:
        assert self._popen is not None, "the VM is not running"
        return self._popen.pid

    @property
    def qmp_socket(self) -> Path:
        assert self._dir is not None, "the VM is not running"
        return self._dir / CALLER_SOCKET

    @property
    def agent_socket(self) -> Path | None:
        if not self.agent:
            return None
        assert self._dir is not None, "the VM is not running"
        return self._dir / AGENT_SOCKET

    @property
    def monitor(self) -> QMPClient:
        assert self._monitor is not None, "the VM is not running"
        return self._monitor

    @property
    def console_log(self) -> Path | None:
        if not self._console_log or self._dir is None:
            return None
        return console_log_path(self.argv, self._dir)[0]

    def __repr__(self) -> str:
        pid = self._popen.pid if self._popen is not None else None
        return f"<VM {self.name!r} pid={pid}>"

    async def shutdown(self, policy: ShutdownPolicy | None = None) -> ShutdownResult:
        """Stop QEMU now, with *policy* (default: the one given to :func:`launch`).

        :raises ShutdownFailed: the policy's rungs are used up and QEMU still
            runs (the block's end will still take it down).
        :return: the record, also kept as ``vm.result``.
        """
        return await self._stop(policy or self.policy, last_resort=False)

    async def _stop(self, policy: ShutdownPolicy, *, last_resort: bool) -> ShutdownResult:
        """Climb the ladder on the ladder's own monitor; with *last_resort*, SIGKILL last."""
        assert self._process is not None and self._dir is not None, "the VM is not running"
        if self._process.has_exited():
            if self.result is None:
                status = await self._reap()
                raise QemuExited(f"{self.name}: QEMU exited on its own (status {status})", status)
            return self.result
        rungs = plan(policy)
        if last_resort and Stage.KILL not in policy.stages:
            rungs.append(LAST_RESORT_KILL)  # a recorded step like any other
        try:
            self.result = await stop(
                self._job(policy), started=anyio.current_time(), on_progress=self.on_progress,
                pinned=self._process, rungs=rungs,
            )  # fmt: skip
        except ShutdownFailed as err:
            self.result = err.result
            raise
        return self.result

    def _job(self, policy: ShutdownPolicy) -> Job:
        """This VM as the ladder takes it: its own monitor, agent, console and directories."""
        assert self._dir is not None, "the VM is not running"
        return Job(
            os.fspath(self._dir / LADDER_SOCKET), policy=policy, name=self.name,
            agent=self.agent_socket, save_dir=self.save_dir, evidence_dir=self.evidence_dir,
            console_log=self.console_log,
        )  # fmt: skip

    # ---- start -----------------------------------------------------------------

    async def __aenter__(self) -> VM:
        try:
            with anyio.fail_after(self.startup_timeout):
                await self._start()
        except BaseException as err:
            with anyio.CancelScope(shield=True):
                await self._teardown()
            if isinstance(err, TimeoutError):
                raise LaunchError(
                    f"{self.name}: QEMU was not ready in {self.startup_timeout:g} s",
                    None,
                    self._stderr(),
                ) from err
            raise
        return self

    async def _start(self) -> None:
        state_fd = None if self.restore is None else open_state(self.restore, self.name)
        try:
            await self._start_qemu(state_fd)
        finally:
            if state_fd is not None:
                os.close(state_fd)

    async def _start_qemu(self, state_fd: int | None) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="qmpshutdown-"))
        argv = self.argv if state_fd is None else [*without_incoming(self.argv), *INCOMING_ARGS]
        argv = command_line(argv, self._dir, console_log=self._console_log, agent=self.agent)
        self._popen = spawn(argv, self._dir / "stderr", self.name)
        self._process = PidfdProcess(self._popen.pid, os.pidfd_open(self._popen.pid))
        logger.info("%s: started QEMU, pid %d", self.name, self._popen.pid)
        caller = os.fspath(self.qmp_socket)
        try:
            # QEMU exiting early races the greeting.
            self._monitor = await race(
                self._process.wait_exited,
                lambda: open_client(caller, self.startup_timeout, self.name),
            )
        except ConnectError as err:
            raise LaunchError(f"{self.name}: {err}", None, self._stderr()) from err
        if self._monitor is None:
            status = await self._reap()
            stderr = self._stderr()
            last = (stderr.strip().splitlines() or ["(nothing on stderr)"])[-1]
            raise LaunchError(
                f"{self.name}: QEMU exited during start-up with status {status}: {last}",
                status,
                stderr,
            )
        if state_fd is not None:
            await self._load_state(state_fd)

    async def _load_state(self, state_fd: int) -> None:
        """Load the saved state over the ladder's monitor; LaunchError if it does not load."""
        assert self._process is not None and self._dir is not None
        ladder = os.fspath(self._dir / LADDER_SOCKET)
        try:
            runstate = await race(
                self._process.wait_exited,
                lambda: load_state(ladder, state_fd, self.startup_timeout, self.name),
            )
        except LaunchError as err:
            raise LaunchError(str(err), None, self._stderr()) from err
        except ConnectError as err:
            raise LaunchError(f"{self.name}: {err}", None, self._stderr()) from err
        if runstate is None:  # QEMU exits when the state does not load
            status = await self._reap()
            stderr = self._stderr()
            last = (stderr.strip().splitlines() or ["(nothing on stderr)"])[-1]
            raise LaunchError(
                f"{self.name}: the saved state did not load; QEMU exited with status "
                f"{status}: {last}",
                status,
                stderr,
            )

    # ---- stop ------------------------------------------------------------------

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with anyio.CancelScope(shield=True):
            await self._teardown()

    async def _teardown(self) -> None:
        """Stop QEMU with the ladder (SIGKILL as its last step), reap it, remove the files.

        Runs shielded; every wait is bounded. Never raises an error of its own:
        it must not hide the one that ended the caller's block.
        """
        process = self._process
        try:
            if process is not None and not process.has_exited():
                with anyio.move_on_after(self.policy.bound + self.policy.kill_timeout + 5.0):
                    try:
                        await self._stop(self.policy, last_resort=True)
                    except Error as err:
                        logger.warning("%s: the ladder did not stop QEMU: %s", self.name, err)
                if not process.has_exited():  # the ladder itself could not run: no record
                    logger.error("%s: SIGKILL outside the ladder", self.name)
                    process.send_signal(signal.SIGKILL)
            client, self._monitor = self._monitor, None
            if client is not None:
                await close_client(client)
        finally:
            if self._popen is not None:
                await self._reap()
            if process is not None:
                process.close()
            if self._dir is not None:
                shutil.rmtree(self._dir, ignore_errors=True)

    async def _reap(self) -> int | None:
        """Collect QEMU's exit status once its pidfd says it exited (bounded, never blocks)."""
        assert self._popen is not None
        if self._process is not None:
            with anyio.move_on_after(self.policy.kill_timeout):
                await self._process.wait_exited()
        status = self._popen.poll()
        if status is None:
            logger.error("%s: QEMU pid %d could not be reaped", self.name, self._popen.pid)
        return status

    def _stderr(self) -> str:
        if self._dir is None:
            return ""
        try:
            with open(self._dir / "stderr", "rb") as stderr:
                return stderr.read(_STDERR_LIMIT).decode(errors="replace")
        except OSError:
            return ""


def launch(
    argv: Sequence[str],
    policy: ShutdownPolicy = DEFAULT_POLICY,
    name: str | None = None,
    *,
    startup_timeout: float = 30.0,
    on_progress: ProgressCallback | None = None,
    evidence_dir: str | os.PathLike[str] | None = None,
    console_log: bool = False,
    save_dir: str | os.PathLike[str] | None = None,
    restore: str | os.PathLike[str] | None = None,
    agent: bool = False,
) -> VM:
    """Boot QEMU for the length of an ``async with`` block; always stop and reap it.

    ::

        async with qmpshutdown.launch(["qemu-system-x86_64", ...]) as vm:
            await vm.monitor.execute("query-status")
        print(vm.result.stage)

    :param argv: QEMU's command line, binary first, without a QMP monitor
        (launch adds its own, on unix sockets in a private temp dir).
    :param policy: the ladder's policy for the teardown.
    :param name: how log lines name this VM (default: the binary's name).
    :param startup_timeout: seconds QEMU gets to greet on its monitor.
    :param on_progress: called with a :class:`Progress` as each step of the
        teardown (or of ``vm.shutdown()``) happens.
    :param save_dir: where the ``save`` rung (when *policy*'s stages name it)
        keeps the guest's whole state at the teardown; see :func:`shutdown`.
    :param restore: a state file the ``save`` rung wrote: QEMU starts with
        the same *argv* plus an incoming migration from that file (passed by
        descriptor) and the guest runs on from where it was saved. Keep the
        same QEMU version and command line, and the disk images untouched
        since the save.
    :param evidence_dir: where a stop that has to force saves a PNG of the
        guest's screen (see :func:`shutdown`); the directory must exist.
    :param console_log: capture the serial console to a file in the private
        dir (``vm.console_log``): launch adds ``-serial file:...`` as the first
        serial port, or, when *argv*'s first ``-serial`` is ``file:PATH``,
        uses that file. When the stop has to force, its last 50 lines are
        ``vm.result.console_tail``.
    :raises ValueError: *console_log* with a first ``-serial`` that is not ``file:PATH``.
    :param agent: add a virtio-serial device, the guest agent's port
        (``org.qemu.guest_agent.0``) and its chardev socket in the private dir;
        ``vm.agent_socket`` is its path, and the teardown uses it (the agent
        rung, the freeze before force).
    :raises LaunchError: (on entering) QEMU exited early or did not greet in
        time, or the saved state did not load; carries its exit status and stderr.
    :return: the :class:`VM`, an async context manager. On leaving the block —
        normally, by exception or by cancellation — the ladder runs shielded
        and bounded, QEMU is SIGKILLed if the ladder did not end it (a ``kill``
        step in the record), and it is reaped; no QEMU is ever left behind (the
        kernel kills it too if this process dies first).
    """
    return VM(
        argv, policy, name, startup_timeout, on_progress, evidence_dir, console_log, agent,
        save_dir=save_dir, restore=restore,
    )  # fmt: skip
