"""``launch()``: boot QEMU for a harness, and always take it down again.

QEMU gets two QMP monitors on unix sockets in a private temp dir: one the
caller holds as ``vm.monitor``, one kept free for the ladder, so the teardown
works whatever the caller's connection is doing (QEMU serves one client per
monitor). Nothing here holds a cancel scope or task group across the caller's
block: ``__aenter__`` and ``__aexit__`` may run in different tasks (as
pytest-asyncio does with fixtures).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import anyio
import attrs
from qemu.qmp import QMPClient

from ._errors import Error, LaunchError, ShutdownFailed
from ._monitor import HandshakeFailed, HandshakeTimeout, connect_client
from ._policy import ShutdownPolicy, Stage
from ._process import PidfdProcess
from ._result import Outcome, ShutdownResult, Step
from ._shutdown import stop_at

logger = logging.getLogger("qmpshutdown")

_DEFAULT_POLICY = ShutdownPolicy()
_PR_SET_PDEATHSIG = 1
_STDERR_LIMIT = 64 * 1024


# Resolved once here: the child between fork and exec must not run ldconfig
# (ctypes.util.find_library does) nor take locks another thread may hold.
_LIBC = ctypes.CDLL(None, use_errno=True)


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Have the kernel SIGKILL QEMU if the process that launched it dies first."""
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _spawn(argv: list[str], stderr_path: Path, name: str) -> subprocess.Popen[bytes]:
    """Start QEMU (subprocess, not anyio.open_process: prctl needs a preexec_fn)."""
    with open(stderr_path, "wb") as stderr:
        try:
            return subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                preexec_fn=_die_with_parent,
            )
        except OSError as err:
            raise LaunchError(f"{name}: cannot start {argv[0]}: {err}") from err


class VM:
    """A QEMU started by :func:`launch`; stopped and reaped when its block ends.

    :ivar pid: QEMU's pid.
    :ivar qmp_socket: the unix socket of the caller's QMP monitor.
    :ivar monitor: a connected :class:`qemu.qmp.QMPClient` for the caller's own commands.
    :ivar name: the name used in log lines.
    :ivar result: the :class:`ShutdownResult` of the stop, once QEMU was stopped.
    """

    def __init__(
        self,
        argv: Sequence[str],
        policy: ShutdownPolicy,
        name: str | None,
        startup_timeout: float,
    ) -> None:
        if isinstance(argv, (str, bytes)) or not argv:
            raise TypeError("argv is QEMU's command line as a sequence, binary first")
        if not isinstance(policy, ShutdownPolicy):
            raise TypeError(f"policy must be a ShutdownPolicy, not {type(policy).__name__}")
        self.argv = [os.fspath(arg) for arg in argv]
        self.policy = policy
        self.name = name or os.path.basename(self.argv[0])
        self.startup_timeout = startup_timeout
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
        return self._dir / "qmp.sock"

    @property
    def monitor(self) -> QMPClient:
        assert self._monitor is not None, "the VM is not running"
        return self._monitor

    @property
    def _ladder_socket(self) -> Path:
        assert self._dir is not None
        return self._dir / "ladder.sock"

    def __repr__(self) -> str:
        pid = self._popen.pid if self._popen is not None else None
        return f"<VM {self.name!r} pid={pid}>"

    async def shutdown(self, policy: ShutdownPolicy | None = None) -> ShutdownResult:
        """Stop QEMU now, with *policy* (default: the one given to :func:`launch`).

        :raises ShutdownFailed: the policy's rungs are used up and QEMU still
            runs (the block's end will still take it down).
        :return: the record, also kept as ``vm.result``.
        """
        policy = policy or self.policy
        assert self._process is not None, "the VM is not running"
        if self._process.has_exited():
            if self.result is None:
                raise Error(f"{self.name}: QEMU exited on its own (status {self._reap()})")
            return self.result
        try:
            self.result = await stop_at(
                os.fspath(self._ladder_socket),
                policy,
                started=anyio.current_time(),
                pinned=self._process,
                name=self.name,
            )
        except ShutdownFailed as err:
            self.result = err.result
            raise
        return self.result

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
        self._dir = Path(tempfile.mkdtemp(prefix="qmpshutdown-"))
        argv = [*self.argv]
        for monitor_id, path in (("qmpshutdown-caller", self.qmp_socket),
                                 ("qmpshutdown-ladder", self._ladder_socket)):  # fmt: skip
            argv += [
                "-chardev", f"socket,id={monitor_id},path={path},server=on,wait=off",
                "-mon", f"chardev={monitor_id},mode=control",
            ]  # fmt: skip
        self._popen = _spawn(argv, self._dir / "stderr", self.name)
        self._process = PidfdProcess(self._popen.pid, os.pidfd_open(self._popen.pid))
        logger.info("%s: started QEMU, pid %d", self.name, self._popen.pid)
        # QEMU exiting early races the greeting; the group never raises (no ExceptionGroup).
        exited = False

        async def watch_exit(scope: anyio.CancelScope) -> None:
            nonlocal exited
            assert self._process is not None
            await self._process.wait_exited()
            exited = True
            scope.cancel()

        error: Exception | None = None
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch_exit, tg.cancel_scope)
            try:
                self._monitor = await self._connect_caller_monitor()
            except Exception as err:  # raised below, outside the group
                error = err
            tg.cancel_scope.cancel()
        if exited:
            status = self._reap()
            stderr = self._stderr()
            last = (stderr.strip().splitlines() or ["(nothing on stderr)"])[-1]
            raise LaunchError(
                f"{self.name}: QEMU exited during start-up with status {status}: {last}",
                status,
                stderr,
            )
        if error is not None:
            raise error

    async def _connect_caller_monitor(self) -> QMPClient:
        path = os.fspath(self.qmp_socket)
        delay = 0.005
        while True:  # QEMU creates the socket early in its start-up; there is no event for it
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError, BlockingIOError):
                sock.close()
                await anyio.sleep(delay)
                delay = min(delay * 2, 0.05)
            except BaseException:
                sock.close()
                raise
        try:
            return await connect_client(sock, self.policy.connect_timeout, self.name)
        except (HandshakeTimeout, HandshakeFailed) as err:
            raise LaunchError(f"{self.name}: {err}", None, self._stderr()) from err

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
        """Stop QEMU with the ladder, kill it if that failed, reap it, remove the files.

        Runs shielded; every wait is bounded. Never raises an error of its own:
        it must not hide the one that ended the caller's block.
        """
        process, popen = self._process, self._popen
        try:
            if process is not None and not process.has_exited():
                with anyio.move_on_after(self.policy.bound + 5.0):
                    try:
                        await self.shutdown()
                    except Error as err:
                        logger.warning("%s: the ladder did not stop QEMU: %s", self.name, err)
                if not process.has_exited():
                    await self._kill(process)
            await self._close_caller_monitor()
        finally:
            if process is not None:
                process.close()
            if popen is not None:
                self._reap()
            if self._dir is not None:
                shutil.rmtree(self._dir, ignore_errors=True)

    async def _kill(self, process: PidfdProcess) -> None:
        started = anyio.current_time()
        process.send_signal(signal.SIGKILL)
        with anyio.move_on_after(self.policy.kill_timeout):
            await process.wait_exited()
        elapsed = anyio.current_time() - started
        logger.warning("%s: SIGKILL after the ladder failed", self.name)
        if self.result is not None:  # say in the record what really ended it
            base = self.result.elapsed
            step = Step(Stage.KILL, Outcome.DONE if process.has_exited() else Outcome.TIMEOUT,
                        base, base + elapsed, "launch() teardown: sent SIGKILL")  # fmt: skip
            self.result = attrs.evolve(
                self.result,
                stage=Stage.KILL if process.has_exited() else None,
                elapsed=base + elapsed,
                steps=(*self.result.steps, step),
            )

    async def _close_caller_monitor(self) -> None:
        client, self._monitor = self._monitor, None
        if client is None:
            return
        with anyio.move_on_after(2.0):
            with contextlib.suppress(Exception):  # EOFError etc.: QEMU is gone
                await client.disconnect()

    def _reap(self) -> int | None:
        assert self._popen is not None
        try:
            # The pidfd said it exited, or it was SIGKILLed: this does not block for long.
            return self._popen.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            logger.error("%s: QEMU pid %d could not be reaped", self.name, self._popen.pid)
            return None

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
    policy: ShutdownPolicy = _DEFAULT_POLICY,
    name: str | None = None,
    *,
    startup_timeout: float = 30.0,
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
    :raises LaunchError: (on entering) QEMU exited early or did not greet in
        time; carries its exit status and stderr.
    :return: the :class:`VM`, an async context manager. On leaving the block —
        normally, by exception or by cancellation — the ladder runs shielded
        and bounded, QEMU is SIGKILLed if the ladder did not end it, and it is
        reaped; no QEMU is ever left behind (the kernel kills it too if this
        process dies first).
    """
    return VM(argv, policy, name, startup_timeout)
