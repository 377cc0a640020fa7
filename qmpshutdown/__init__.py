"""Stop QEMU virtual machines the right way.

Press the ACPI power button over QMP, watch the POWERDOWN and SHUTDOWN events,
and only when the guest will not go escalate to ``quit``, SIGTERM and SIGKILL —
always ending with QEMU really gone and a record of what happened and why::

    import qmpshutdown

    result = await qmpshutdown.shutdown("/run/vm1/qmp.sock")
    print(result.stage, result.reason, result.cause)
"""

import importlib as _importlib
import logging as _logging
from typing import TYPE_CHECKING as _TYPE_CHECKING

from ._errors import (
    CommandError,
    ConnectError,
    DescriptorsExhausted,
    Error,
    InternalError,
    LaunchError,
    MonitorClosedError,
    PidMismatchError,
    QemuExited,
    ShutdownFailed,
)
from ._finding import Finding
from ._fleet import shutdown_many
from ._job import Job, Target
from ._ladder import climb
from ._monitor import Monitor
from ._policy import Patience, ShutdownPolicy, Stage
from ._process import Process
from ._progress import Progress, ProgressKind
from ._result import Activity, Cause, EventRecord, Outcome, ShutdownResult, Step
from ._shutdown import shutdown, shutdown_sync
from ._version import __version__ as __version__

if _TYPE_CHECKING:
    from ._discover import discover
    from ._launch import VM, launch
    from ._sync import SyncVM, launch_sync

#: Names imported on first use: ``launch()`` and its harnesses need subprocess, anyio's
#: threads and more, and ``discover()`` a QEMU command-line parser, which a tool that only
#: stops VMs never pays for.
_LAZY = {
    "VM": "._launch",
    "launch": "._launch",
    "SyncVM": "._sync",
    "launch_sync": "._sync",
    "discover": "._discover",  # reads /proc: host tools only
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(_importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


# In order of importance: what stops a VM, what it returns, then the seams for
# callers that reach QEMU their own way (climb() over any Monitor and Process).
__all__ = (
    # functions
    "shutdown",
    "shutdown_sync",
    "shutdown_many",
    "discover",
    "launch",
    "launch_sync",
    "climb",
    # classes
    "ShutdownPolicy",
    "Patience",
    "Job",
    "ShutdownResult",
    "Stage",
    "Cause",
    "Outcome",
    "Step",
    "Activity",
    "Finding",
    "EventRecord",
    "Progress",
    "ProgressKind",
    "Target",
    "VM",
    "SyncVM",
    "Monitor",
    "Process",
    # exceptions
    "Error",
    "ConnectError",
    "PidMismatchError",
    "ShutdownFailed",
    "LaunchError",
    "QemuExited",
    "DescriptorsExhausted",
    "InternalError",
    "CommandError",
    "MonitorClosedError",
)

_logging.getLogger(__name__).addHandler(_logging.NullHandler())
