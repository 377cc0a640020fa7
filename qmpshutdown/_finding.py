"""What the guest itself said when asked why it will not go: a :class:`Finding`.

A value, like the result it goes into (``ShutdownResult.diagnosis``). The
diagnose step (:mod:`._rungs.diagnose`) asks the guest through its agent; the
questions and how their answers are read live in :mod:`._questions`.
"""

from __future__ import annotations

from typing import Any

import attrs

#: A block inhibitor on shutdown or the power key is held (Linux, logind).
INHIBITOR = "inhibitor"
#: The power button is set to do something other than power off (logind, Windows).
POWER_KEY = "power-key"
#: The system is already shutting down and these units are still stopping (systemd).
STOP_JOB = "stop-job"
#: Windows wants a restart to finish installing something.
PENDING_REBOOT = "pending-reboot"
#: Windows is installing updates (TiWorker.exe or TrustedInstaller.exe runs).
UPDATING = "updating"
#: Windows does not shut down from the button without a logged-on user.
LOGON_REQUIRED = "logon-required"
#: Windows asks why it is shut down (the Shutdown Event Tracker).
SHUTDOWN_REASON_PROMPT = "shutdown-reason-prompt"
#: The agent stopped answering while it was asked (a guest shutting down stops its agent).
AGENT_SILENT = "agent-silent"

#: Every kind of finding the library reports.
KINDS: tuple[str, ...] = (
    INHIBITOR, POWER_KEY, STOP_JOB, PENDING_REBOOT, UPDATING, LOGON_REQUIRED,
    SHUTDOWN_REASON_PROMPT, AGENT_SILENT,
)  # fmt: skip


@attrs.frozen
class Finding:
    """One thing the guest said (through its agent) that keeps it from powering off.

    :ivar kind: what it is: ``inhibitor``, ``power-key``, ``stop-job``,
        ``pending-reboot``, ``updating``, ``logon-required``,
        ``shutdown-reason-prompt`` or ``agent-silent``.
    :ivar detail: one human line: who, why, since when, where it was set.
    :ivar source: what was asked, e.g. the command line run in the guest.
    """

    kind: str
    detail: str
    source: str

    def to_dict(self) -> dict[str, Any]:
        """The finding as a JSON-ready dict (``kind``, ``detail``, ``source``)."""
        return {"kind": self.kind, "detail": self.detail, "source": self.source}

    def __str__(self) -> str:
        return f"{self.kind}: {self.detail}"
