"""``shutdown()``: reach the monitor, pin QEMU's process, and climb the ladder."""

from __future__ import annotations

import functools
import logging
import os
import socket
from collections.abc import Sequence
from typing import Union

import anyio
from qemu.qmp import QMPClient

from ._arguments import check_address, check_agent, check_evidence_dir, check_save_dir
from ._connect import connect_socket, format_address, handshake
from ._errors import ConnectError, PidMismatchError
from ._ladder import run_plan
from ._monitor import (
    HandshakeFailed,
    HandshakeTimeout,
    Monitor,
    QMPMonitor,
    client_socket,
    wrap_client,
)
from ._policy import ShutdownPolicy, Stage
from ._process import (
    PidfdProcess,
    Process,
    executable,
    holds_socket,
    is_qemu_executable,
    out_of_descriptors,
    peer_pid,
    tcp_peer_is,
)
from ._progress import ProgressCallback
from ._result import ShutdownResult
from ._rungs import Rung, plan

logger = logging.getLogger("qmpshutdown")

#: What :func:`shutdown` accepts: a unix socket path, ``(host, port)``, or a connected client.
Target = Union[str, "os.PathLike[str]", tuple[str, int], QMPClient]

_DEFAULT_POLICY = ShutdownPolicy()


async def shutdown(
    target: Target,
    policy: ShutdownPolicy = _DEFAULT_POLICY,
    pid: int | None = None,
    *,
    on_progress: ProgressCallback | None = None,
    save_dir: str | os.PathLike[str] | None = None,
    evidence_dir: str | os.PathLike[str] | None = None,
    agent: str | os.PathLike[str] | None = None,
) -> ShutdownResult:
    """Stop one VM with the least force that works, and say how it went.

    Press the ACPI power button (re-pressing while waiting), then, if the
    guest does not power itself off and the policy allows it, ``quit``,
    SIGTERM and SIGKILL, each with its timeout. The stop is complete when
    QEMU's process has exited (or, without a pid, when its monitor closed).

    :param target: a unix socket path, a ``(host, port)`` TCP monitor, or an
        already connected :class:`qemu.qmp.QMPClient` (used as is and left open).
    :param policy: which rungs may be used and how long each may take.
    :param pid: QEMU's pid when the caller knows it (e.g. for a TCP monitor).
        For a unix socket the pid is read from the socket; a *pid* that
        differs is refused before anything is sent.
    :param on_progress: called with a :class:`Progress` as each thing happens
        (a step begins or ends, a QMP event arrives, QEMU is gone), in order,
        before this returns. It must be quick; if it raises, the error is
        logged once and the ladder goes on.
    :param save_dir: the directory where the ``save`` rung (when the policy's
        stages name it) keeps the guest's whole state in a new file (mode
        0600); without it that rung is skipped. The path is the result's
        ``saved_state``.
    :param evidence_dir: a directory (on QEMU's host, writable by QEMU) for a
        PNG of the guest's screen (QMP ``screendump``), taken right before the
        first forced rung and again if the ladder ends with QEMU still running;
        never on a graceful stop. Its path is ``result.screenshot``; the step
        ``screenshot`` says how it went (a failure never stops the ladder).
    :param agent: the unix socket of QEMU's chardev for the guest agent's
        virtio-serial port (``org.qemu.guest_agent.0``), or None. With it the
        ``agent`` rung asks the agent for ``guest-shutdown``, and the guest's
        filesystems are frozen before any forced rung (``freeze_before_force``).
    :raises ConnectError: no QMP monitor could be reached and there was no
        safe way to escalate (a peer that answers with anything but QMP, such
        as QEMU's human monitor, is never signalled).
    :raises PidMismatchError: *pid* is not the QEMU behind the monitor.
    :raises ShutdownFailed: the allowed rungs are used up and QEMU still runs;
        its ``.result`` holds the record.
    :return: the record: the rung that ended the VM, the reason, presses,
        every step and event.
    """
    if not isinstance(policy, ShutdownPolicy):
        raise TypeError(f"policy must be a ShutdownPolicy, not {type(policy).__name__}")
    if pid is not None and (
        isinstance(pid, bool) or not isinstance(pid, int) or not 0 < pid < 2**31
    ):
        raise ValueError(f"pid must be a positive int (a Linux pid), not {pid!r}")
    save_dir = check_save_dir(save_dir)
    agent_path = check_agent(agent)
    started = anyio.current_time()
    evidence = check_evidence_dir(evidence_dir)
    if isinstance(target, QMPClient):
        return await _shutdown_client(
            target, policy, pid, started, on_progress, save_dir, evidence, agent_path
        )
    return await stop_at(
        check_address(target), policy, pid=pid, started=started, on_progress=on_progress,
        save_dir=save_dir, evidence_dir=evidence, agent=agent_path,
    )  # fmt: skip


async def stop_at(
    address: str | tuple[str, int],
    policy: ShutdownPolicy,
    *,
    pid: int | None = None,
    started: float,
    pinned: Process | None = None,
    name: str | None = None,
    on_progress: ProgressCallback | None = None,
    rungs: Sequence[Rung] | None = None,
    save_dir: str | None = None,
    evidence_dir: str | None = None,
    console_log: str | None = None,
    agent: str | None = None,
) -> ShutdownResult:
    """Connect to *address* and climb the ladder (the body of :func:`shutdown`).

    :param pinned: QEMU's process when the caller has pinned it already (its
        own child, from :func:`launch`); it is checked against the socket's
        peer, used even if the monitor cannot be reached, and left open.
    :param rungs: the rungs to climb instead of the policy's plan.
    :param save_dir: where the ``save`` rung keeps the state (None skips it).
    :param evidence_dir: see :func:`shutdown`.
    :param console_log: the serial console's log file (from :func:`launch`).
    :param agent: the guest agent's socket (see :func:`shutdown`).
    """
    name = name or format_address(address)
    rungs = plan(policy) if rungs is None else list(rungs)
    may_signal = any(rung.stage in (Stage.TERMINATE, Stage.KILL) for rung in rungs)

    async def climb_with(
        monitor: Monitor | None,
        process: Process | None,
        no_monitor_why: str = "",
        no_signal_why: str = "",
    ) -> ShutdownResult:
        return await run_plan(
            monitor, process, policy, started=started, name=name, on_progress=on_progress,
            rungs=rungs, no_monitor_why=no_monitor_why, no_signal_why=no_signal_why,
            save_dir=save_dir,
            evidence_dir=evidence_dir, console_log=console_log,
            agent=agent,
        )  # fmt: skip

    deadline = started + policy.connect_timeout
    try:
        sock = await connect_socket(address, policy.connect_timeout)
    except ConnectError as err:
        if pinned is None or not may_signal:
            raise
        logger.debug("%s: %s", name, err)
        return await climb_with(None, pinned, no_monitor_why=str(err))
    process: Process | None = None
    monitor: Monitor | None = None
    try:
        if pinned is not None:
            peer = peer_pid(sock)
            if peer is not None and peer != pinned.pid:
                raise PidMismatchError(f"{name}: the socket's peer is pid {peer}, not {pinned.pid}")
            no_signal_why = ""
        else:
            if pid is not None and isinstance(address, tuple):
                # Until QEMU accept()s, /proc cannot tell who holds the connection;
                # its greeting says it has.
                with anyio.move_on_after(max(0.0, deadline - anyio.current_time())):
                    await anyio.wait_readable(sock)
            process, no_signal_why = _pin_process(sock, pid, may_signal, name)
        signallable = pinned or process
        logger.debug("%s: connected; waiting for its greeting", name)
        try:
            monitor = await handshake(sock, max(0.0, deadline - anyio.current_time()))
        except HandshakeTimeout as err:
            # Said nothing at all: QEMU stopped or hung, or its monitor is held by another client.
            sock.close()
            no_monitor_why = f"no QMP greeting within {policy.connect_timeout:g} s"
            if signallable is not None and signallable.is_stopped():
                no_monitor_why += " (QEMU is stopped)"
            logger.debug("%s: %s", name, no_monitor_why)
            if signallable is None or not may_signal:
                why = no_signal_why or "no pid to signal"
                if signallable is not None:
                    why = "signals are not allowed"
                raise ConnectError(f"{name}: {no_monitor_why}; {why}") from err
            return await climb_with(None, signallable, no_monitor_why=no_monitor_why,
                                    no_signal_why=no_signal_why)  # fmt: skip
        except HandshakeFailed as err:
            # It said something that is not QMP (QEMU's human monitor, another server):
            # whatever its pid, a guest nobody could ask is never forced.
            sock.close()
            if signallable is not None:
                # QEMU hanging up mid-handshake is most often QEMU exiting: let it finish.
                with anyio.move_on_after(min(1.0, policy.command_timeout)):
                    await signallable.wait_exited()
            if signallable is None or not signallable.has_exited():
                why = no_signal_why or "no pid to signal"
                if signallable is not None:
                    why = "not signalled: nothing was asked of its guest"
                raise ConnectError(f"{name}: {err}; {why}") from err
            return await climb_with(None, signallable, no_monitor_why=str(err))
        return await climb_with(monitor, signallable, no_signal_why=no_signal_why)
    finally:
        with anyio.CancelScope(shield=True):
            if monitor is not None:
                await monitor.close()
            else:
                sock.close()
            if process is not None:
                process.close()


def shutdown_sync(
    target: str | os.PathLike[str] | tuple[str, int],
    policy: ShutdownPolicy = _DEFAULT_POLICY,
    pid: int | None = None,
    *,
    on_progress: ProgressCallback | None = None,
    save_dir: str | os.PathLike[str] | None = None,
    evidence_dir: str | os.PathLike[str] | None = None,
    agent: str | os.PathLike[str] | None = None,
) -> ShutdownResult:
    """Like :func:`shutdown`, for synchronous callers (runs its own event loop).

    :param target: a unix socket path or a ``(host, port)`` TCP monitor (a
        QMPClient belongs to an event loop of its own: use :func:`shutdown`).
    :param policy: see :func:`shutdown`.
    :param pid: see :func:`shutdown`.
    :param on_progress: see :func:`shutdown` (called in this thread).
    :param save_dir: see :func:`shutdown`.
    :param evidence_dir: see :func:`shutdown`.
    :param agent: see :func:`shutdown`.
    :raises ConnectError, PidMismatchError, ShutdownFailed: see :func:`shutdown`.
    :return: see :func:`shutdown`.
    """
    if isinstance(target, QMPClient):
        raise TypeError("shutdown_sync() cannot use a QMPClient; await shutdown() in its loop")
    return anyio.run(
        functools.partial(
            shutdown,
            target,
            policy,
            pid,
            on_progress=on_progress,
            save_dir=save_dir,
            evidence_dir=evidence_dir,
            agent=agent,
        ),
        backend="asyncio",
    )


def _pin_process(
    sock: object, pid: int | None, may_signal: bool, name: str
) -> tuple[Process | None, str]:
    """Find and pin QEMU's process behind *sock*; say why not when it cannot be.

    :raises PidMismatchError: *pid* is given and is not the monitor's QEMU.
    :return: the pinned process (or None) and why signals are impossible.
    """
    peer = peer_pid(sock) if sock is not None else None  # type: ignore[arg-type]
    if pid is not None:
        if peer is not None and peer != pid:
            raise PidMismatchError(f"{name}: pid {pid} given, but the socket's peer is pid {peer}")
        if sock is not None:
            # A given pid is the caller's word: refused when it does not hold the socket,
            # used when /proc cannot tell (None).
            unix = peer is not None
            owns = holds_socket(pid, sock) if unix else tcp_peer_is(sock, pid)  # type: ignore[arg-type]
            if owns is False:
                raise PidMismatchError(f"{name}: pid {pid} does not hold this monitor connection")
        # An explicit pid must be QEMU; refusing is clearer than silently never signalling.
        return PidfdProcess.open_qemu(pid), ""
    if peer is None:
        return None, "QEMU's pid is unknown (pass pid= for a TCP monitor)"
    process = _pin_quietly(peer)
    if process is not None and (why := _not_holder_why(process, sock)):  # type: ignore[arg-type]
        process.close()
        return None, why
    if not may_signal:
        return process, "signals are not allowed"
    return process, _not_qemu_why(peer)


def _not_holder_why(process: Process, sock: socket.socket) -> str:
    """Why *process* (the socket's ``SO_PEERCRED`` pid) must not be signalled, or "".

    ``SO_PEERCRED`` names who called ``listen()``, not who holds the socket now
    (a listener can fork, keep the socket in the child and exec a QEMU). Fails
    closed: when it cannot be told (no sock_diag, /proc unreadable), the pid is
    not used, because signalling a process that may not be the VM is worse than
    leaving a hung VM to its caller (``quit`` still goes through the monitor);
    a caller who knows better passes ``pid=``, which is trusted when unverifiable.
    """
    holds = holds_socket(process.pid, sock)
    if holds:  # even if it exits now: the pidfd can reach no other process
        return ""
    if process.has_exited():  # /proc/PID may have named another process meanwhile
        return f"the monitor's peer (pid {process.pid}) exited while it was being checked"
    if holds is None:
        return f"cannot tell whether the monitor's peer (pid {process.pid}) holds the socket"
    return f"the monitor's peer (pid {process.pid}) does not hold the monitor socket"


def _pin_quietly(pid: int) -> Process | None:
    try:
        return PidfdProcess.open_qemu(pid)
    except PidMismatchError as err:
        if out_of_descriptors(err):
            raise  # our own shortage says nothing of the peer (shutdown_many() retries)
        return None


def _not_qemu_why(pid: int) -> str:
    if pid == os.getpid():
        return "the monitor's peer is this very process"
    exe = executable(pid)
    if exe is None:
        return f"cannot read the executable of the monitor's peer (pid {pid})"
    if not is_qemu_executable(exe):
        return f"the monitor's peer (pid {pid}) is not QEMU but {exe}"
    return f"the monitor's peer (pid {pid}) could not be pinned"


async def _shutdown_client(
    client: QMPClient,
    policy: ShutdownPolicy,
    pid: int | None,
    started: float,
    on_progress: ProgressCallback | None,
    save_dir: str | None = None,
    evidence_dir: str | None = None,
    agent: str | None = None,
) -> ShutdownResult:
    monitor: QMPMonitor = wrap_client(client)
    process: Process | None = None
    try:
        sock = client_socket(client)
        process, no_signal_why = _pin_process(sock, pid, policy.may_signal, "qmp-client")
        return await run_plan(
            monitor,
            process,
            policy,
            started=started,
            name=client.name or "qmp-client",
            no_signal_why=no_signal_why,
            on_progress=on_progress,
            save_dir=save_dir,
            evidence_dir=evidence_dir,
            agent=agent,
        )
    finally:
        with anyio.CancelScope(shield=True):
            await monitor.close()  # removes our listener; the client stays open
            if process is not None:
                process.close()
