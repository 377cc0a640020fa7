"""The exceptions qmpshutdown raises.

Every error the library raises on purpose derives from :class:`Error`::

    Error
     ├── ConnectError          no QMP monitor could be reached, and no safe way to escalate
     ├── PidMismatchError      the pid given is not the monitor's QEMU; nothing was sent
     ├── ShutdownFailed        the allowed rungs are used up and QEMU still runs
     │                         (or its state is unknown); carries ``.result``
     ├── DescriptorsExhausted  this process ran out of open files: the VM was not touched
     ├── LaunchError           QEMU started by ``launch()`` exited before it was ready
     ├── QemuExited            QEMU started by ``launch()`` exited on its own before its stop
     ├── InternalError         a bug in qmpshutdown (``shutdown_many()`` keeps the others going)
     ├── CommandError          QEMU answered a command with an error  ┐ the Monitor seam's
     └── MonitorClosedError    the connection ended before the reply  ┘ contract (climb())

The last two are what a :class:`~qmpshutdown.Monitor` raises to the ladder,
which handles them; they reach a caller only through its own Monitor.

Errors of qemu.qmp and of the operating system are mapped to these in one place
(``qmpshutdown._monitor`` and ``qmpshutdown._process``) and chained with
``raise ... from err``, so the original cause stays visible in tracebacks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._result import ShutdownResult


class Error(Exception):
    """Root of every error qmpshutdown raises on purpose."""


class ConnectError(Error):
    """No QMP monitor could be reached and there was no safe way to escalate.

    Raised for a missing socket, a refused connection, a permission error, a
    peer that is not a QMP server, or a greeting or negotiation that failed or
    timed out while QEMU's pid was unknown (so no signal could be sent).
    """


class PidMismatchError(Error):
    """The pid the caller gave is not the QEMU behind the monitor.

    Raised before anything is sent to the monitor: the library never signals a
    process it cannot tie to the monitor it was given.
    """


class ShutdownFailed(Error):
    """The allowed rungs are used up and QEMU is still running or unknown.

    :ivar result: the :class:`~qmpshutdown.ShutdownResult` of the attempt, with
        ``stage`` set to None, every step tried and every event seen.
    """

    def __init__(self, message: str, result: ShutdownResult) -> None:
        super().__init__(message)
        self.result = result


class DescriptorsExhausted(Error):
    """This process ran out of open files, again and again: the VM was not touched.

    :func:`~qmpshutdown.shutdown_many` waits for other ladders to end and tries
    again first; this comes only when no ladder ended for a while. Raise the
    open-file limit (``ulimit -n``) or pass ``limit=``.
    """


class QemuExited(Error):
    """The QEMU started by :func:`~qmpshutdown.launch` exited on its own before it was stopped.

    :ivar returncode: QEMU's exit status.
    """

    def __init__(self, message: str, returncode: int | None = None) -> None:
        super().__init__(message)
        self.returncode = returncode


class InternalError(Error):
    """A bug in qmpshutdown: an exception it did not mean to raise (chained as the cause).

    :func:`~qmpshutdown.shutdown_many` returns it for the one VM it hit and goes
    on with the others; please report it with its traceback.
    """


class LaunchError(Error):
    """QEMU started by :func:`~qmpshutdown.launch` exited or failed before it was ready.

    :ivar returncode: QEMU's exit status, or None if it did not exit.
    :ivar stderr: what QEMU wrote to its standard error (possibly truncated).
    """

    def __init__(self, message: str, returncode: int | None = None, stderr: str = "") -> None:
        super().__init__(message)
        self.returncode = returncode
        self.stderr = stderr


class CommandError(Error):
    """QEMU answered a command with an error (part of the :class:`~qmpshutdown.Monitor` seam).

    :ivar error_class: QMP's error class, e.g. ``"CommandNotFound"``.
    :ivar desc: QEMU's description of the error.
    """

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"{command}: {error_class}: {desc}")
        self.error_class = error_class
        self.desc = desc


class MonitorClosedError(Error):
    """The connection ended before the reply (part of the :class:`~qmpshutdown.Monitor` seam)."""
