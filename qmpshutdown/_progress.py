"""Live progress: a typed update for each thing the ladder does, as it happens."""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable

import attrs

from ._policy import Stage
from ._result import EventRecord, Step

logger = logging.getLogger(__name__)


class ProgressKind(str, enum.Enum):
    """What a :class:`Progress` update is about."""

    BEGIN = "begin"  #: a step has begun (``stage`` set)
    NOTE = "note"  #: the step in progress did something (a press, ``quit`` sent, …)
    END = "end"  #: a step has ended (``step`` set)
    EVENT = "event"  #: a QMP event arrived (``event`` set)
    GONE = "gone"  #: QEMU was seen gone
    #: a reading of the guest while a graceful rung waits (``busy`` set): is it still working?
    SAMPLE = "sample"

    def __str__(self) -> str:
        return self.value


@attrs.frozen(kw_only=True)
class Progress:
    """One update on a ladder in progress, passed to an ``on_progress`` callable.

    :ivar target: how the VM is named in log lines (a socket path, ``HOST:PORT``,
        or the name given to :func:`~qmpshutdown.launch`).
    :ivar elapsed: seconds since the call.
    :ivar stage: the step in progress (or just ended), None between steps.
    :ivar message: the human line the ``qmpshutdown`` command prints.
    :ivar step: set when a step has just ended: its record.
    :ivar event: set when a QMP event has just arrived.
    :ivar kind: what the update is about (begin, note, end, event, gone, sample).
    :ivar busy: set on a ``sample`` update: whether the guest worked (CPU or disk)
        since the previous reading, by the policy's ``busy_cpu`` and ``busy_io``.
    """

    target: str
    elapsed: float
    stage: Stage | None
    message: str
    step: Step | None = None
    event: EventRecord | None = None
    kind: ProgressKind = ProgressKind.NOTE
    busy: bool | None = None


#: What ``on_progress`` takes: called in order, before the call returns; must be quick.
ProgressCallback = Callable[[Progress], object]


class Reporter:
    """Calls the caller's ``on_progress``; a callback that raises is logged once and ignored.

    :param callback: the caller's callable, or None.
    """

    def __init__(self, callback: ProgressCallback | None) -> None:
        self.callback = callback
        self.failures = 0

    def __call__(self, update: Progress) -> None:
        if self.callback is None:
            return
        try:
            self.callback(update)
        except Exception:
            # The ladder must not break, nor stop reporting, for a display's bug.
            self.failures += 1
            if self.failures == 1:
                logger.exception(
                    "%s: on_progress raised; further errors are ignored", update.target
                )
