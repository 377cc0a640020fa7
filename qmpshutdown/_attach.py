"""Attaching to a QEMU: reach its monitor, pin its process, and climb the ladder.

The engine's entry for one :class:`~._job.Job`: :func:`stop` takes the job (its
policy set), connects to its target (or uses the caller's connected client),
ties the monitor to QEMU's process, and runs the ladder (:func:`~._ladder.run_plan`).
The front-ends (``shutdown()``, the fleet, ``launch()``) all come through here.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping, Sequence

import anyio
import attrs
from qemu.qmp import QMPClient

from ._arguments import check_address
from ._connect import connect_socket, format_address, handshake
from ._errors import ConnectError, PidMismatchError
from ._job import Job
from ._ladder import run_plan
from ._monitor import (
    HandshakeFailed,
    HandshakeTimeout,
    Monitor,
    QMPMonitor,
    client_socket,
    readable,
    wrap_client,
)
from ._policy import Stage
from ._process import (
    PidfdProcess,
    Process,
    command_line_of,
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
from ._rungs.reboot import REBOOT_AS_SHUTDOWN

logger = logging.getLogger("qmpshutdown")


async def stop(
    job: Job,
    *,
    started: float,
    on_progress: ProgressCallback | None = None,
    pinned: Process | None = None,
    rungs: Sequence[Rung] | None = None,
) -> ShutdownResult:
    """Stop the VM *job* describes (its policy set): attach to its QEMU, then climb.

    :param started: the anyio clock at the caller's start (times count from it).
    :param on_progress: called with a :class:`~._progress.Progress` as each thing happens.
    :param pinned: QEMU's process when the caller has pinned it already (its own
        child, from ``launch()``): checked against the socket's peer, used even
        if the monitor cannot be reached, and left open.
    :param rungs: the rungs to climb instead of the policy's plan.
    """
    if isinstance(job.target, QMPClient):
        return await _stop_client(job, job.target, started, on_progress)
    return await _stop_at(job, started, on_progress, pinned, rungs)


#: How long to wait for QEMU to accept our connection before its holder is checked without it.
ACCEPT_GRACE = 0.1


async def _stop_at(
    job: Job,
    started: float,
    on_progress: ProgressCallback | None,
    pinned: Process | None,
    rungs: Sequence[Rung] | None,
) -> ShutdownResult:
    """Connect to the job's address and climb the ladder.

    *pinned* (QEMU's own child, from ``launch()``) is checked against the
    socket's peer, used even if the monitor cannot be reached, and left open.
    """
    address = check_address(job.target)
    name = job.name or format_address(address)
    pid, policy = job.pid, job.the_policy
    rungs = plan(policy) if rungs is None else list(rungs)
    may_signal = any(rung.stage in (Stage.TERMINATE, Stage.KILL) for rung in rungs)

    async def climb_with(
        monitor: Monitor | None,
        process: Process | None,
        no_monitor_why: str = "",
        no_signal_why: str = "",
    ) -> ShutdownResult:
        return await run_plan(
            job, monitor, process, started=started, on_progress=on_progress, rungs=rungs, name=name,
            no_monitor_why=no_monitor_why, no_signal_why=no_signal_why,
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
            if not readable(sock):
                # Until QEMU accept()s, who holds the connection is the listener with our
                # connection in its queue: finding it means listing every listener of the
                # host, and for a TCP monitor it cannot be told at all. Its greeting says it
                # accepted: wait a moment for it (a TCP monitor: as long as connecting may
                # take), so that the check finds our peer by itself. A QEMU that does not
                # greet (stopped, hung) is pinned after the moment, while it is still there.
                wait = ACCEPT_GRACE if pid is None or not isinstance(address, tuple) else None
                left = max(0.0, deadline - anyio.current_time())
                with anyio.move_on_after(left if wait is None else min(wait, left)):
                    await anyio.wait_readable(sock)
            process, no_signal_why = _pin_process(sock, pid, may_signal, name)
        signallable = pinned or process
        logger.debug("%s: connected; waiting for its greeting", name)
        try:
            left = max(0.0, deadline - anyio.current_time())
            first = _first_commands(rungs, signallable)
            monitor = await handshake(sock, left, first=first, first_within=policy.command_timeout)
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
        try:
            if monitor is not None:
                await monitor.close()  # bounded and shielded, never raises
            else:
                sock.close()
        finally:
            if process is not None:
                process.close()


def _first_commands(
    rungs: Sequence[Rung], process: Process | None
) -> list[tuple[str, Mapping[str, object] | None]]:
    """The commands the handshake sends with the capabilities: the ladder's first question
    (``query-status``) and, when the power button will press, its ``set-action``."""
    first: list[tuple[str, Mapping[str, object] | None]] = [("query-status", None)]
    if any(rung.stage is Stage.POWERDOWN for rung in rungs):
        reboot = REBOOT_AS_SHUTDOWN.first_command(command_line_of(process))
        if reboot is not None:
            first.append(reboot)
    return first


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
    return process, "" if process is not None else _not_qemu_why(peer)  # (read only without one)


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


async def _stop_client(
    job: Job, client: QMPClient, started: float, on_progress: ProgressCallback | None
) -> ShutdownResult:
    """Climb on the caller's connected client (used as is and left open)."""
    job = attrs.evolve(job, name=client.name or "qmp-client")  # the client keeps its own name
    monitor: QMPMonitor = wrap_client(client)
    process: Process | None = None
    try:
        sock = client_socket(client)
        may_signal = job.the_policy.may_signal
        process, no_signal_why = _pin_process(sock, job.pid, may_signal, "qmp-client")
        return await run_plan(
            job, monitor, process, started=started, on_progress=on_progress,
            no_signal_why=no_signal_why,
        )  # fmt: skip
    finally:
        with anyio.CancelScope(shield=True):
            await monitor.close()  # removes our listener; the client stays open
            if process is not None:
                process.close()
