"""Passing an open file to QEMU over its monitor: the save rung's target and the restore's source.

No path and no shell reach QEMU: the descriptor itself goes over the unix socket.
"""

from __future__ import annotations

from ._monitor import FdPassingUnsupported, Monitor

__all__ = ["FdPassingUnsupported", "pass_fd"]


async def pass_fd(monitor: Monitor, fd: int, fdname: str) -> None:
    """Give QEMU a copy of the open *fd* under *fdname* (``getfd``), without any path or shell.

    The descriptor goes over the monitor socket with SCM_RIGHTS (qemu.qmp's
    ``send_fd_scm``); QEMU keeps it for the next ``getfd``, which names it.
    A monitor that is not a :class:`QMPMonitor` may offer the same as a
    ``send_fd(fd)`` method (the tests' fakes do). Unbounded: the caller bounds it.

    :raises FdPassingUnsupported: the monitor cannot pass descriptors.
    :raises CommandError, MonitorClosedError: as :meth:`Monitor.execute`.
    """
    send = getattr(monitor, "send_fd", None)
    if send is None:
        raise FdPassingUnsupported(f"{type(monitor).__name__} cannot pass file descriptors")
    send(fd)
    await monitor.execute("getfd", {"fdname": fdname})
