"""Stop QEMU virtual machines the right way.

Press the ACPI power button over QMP, watch the POWERDOWN and SHUTDOWN events,
and only when the guest will not go escalate to ``quit``, SIGTERM and SIGKILL —
always ending with QEMU really gone and a record of what happened and why::

    import qmpshutdown

    result = await qmpshutdown.shutdown("/run/vm1/qmp.sock")
    print(result.stage, result.reason, result.cause)
"""

import logging as _logging

from ._errors import ConnectError, Error, LaunchError, PidMismatchError, ShutdownFailed
from ._ladder import climb
from ._launch import VM, launch
from ._many import shutdown_many
from ._monitor import Monitor, QMPMonitor
from ._policy import ShutdownPolicy, Stage
from ._process import PidfdProcess, Process
from ._result import Cause, EventRecord, Outcome, ShutdownResult, Step
from ._shutdown import Target, shutdown, shutdown_sync
from ._version import __version__ as __version__

__all__ = (
    # functions
    "climb",
    "launch",
    "shutdown",
    "shutdown_many",
    "shutdown_sync",
    # classes
    "Cause",
    "EventRecord",
    "Monitor",
    "Outcome",
    "PidfdProcess",
    "Process",
    "QMPMonitor",
    "ShutdownPolicy",
    "ShutdownResult",
    "Stage",
    "Step",
    "Target",
    "VM",
    # exceptions
    "ConnectError",
    "Error",
    "LaunchError",
    "PidMismatchError",
    "ShutdownFailed",
)

_logging.getLogger(__name__).addHandler(_logging.NullHandler())
