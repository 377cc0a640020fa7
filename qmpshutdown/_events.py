"""QMP events as the library keeps them: bounded listeners for qemu.qmp, and the record.

qemu.qmp's default listener keeps every event forever; these keep what a ladder (or a
caller's client over a VM that lives for weeks) needs, and no more.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping
from typing import Any

from qemu.qmp import EventListener

from ._result import EventRecord

logger = logging.getLogger("qmpshutdown._monitor")

#: How many events a caller's client (``launch()``'s ``vm.monitor``) keeps, pending and past.
EVENTS_KEPT = 1000

#: Takes one event as it is read (:meth:`Monitor.on_event`).
EventCallback = Callable[[EventRecord], None]


class EventQueue(EventListener):
    """A listener that queues events without keeping a history (the default keeps all), or
    hands each to a callback as qemu.qmp's reader reads it (no task, no queue).
    """

    callback: EventCallback | None = None

    async def put(self, event: Any) -> None:
        self.take(event)

    def take(self, event: Any) -> None:
        """Queue *event* or hand it to the callback, as :meth:`put` does, without awaiting."""
        if not self.accept(event):
            return
        if self.callback is None:
            self._queue.put_nowait(event)  # unbounded: never waits
            return
        try:
            self.callback(event_record(event))
        except Exception:  # the reader must go on: one bad event is not the connection's end
            logger.exception("an event callback failed on %s", event.get("event"))


class RecentEvents(EventListener):
    """qemu.qmp's default listener, keeping only the latest events (it keeps all, forever).

    A caller's client over a VM that lives for weeks must not grow without
    bound: the oldest pending event is dropped when *limit* are waiting.
    """

    def __init__(self, limit: int = EVENTS_KEPT) -> None:
        super().__init__()
        self.limit = limit

    async def put(self, event: Any) -> None:
        if not self.accept(event):
            return
        if self._queue.qsize() >= self.limit:
            self._queue.get_nowait()
        self._queue.put_nowait(event)
        self._history.append(event)
        del self._history[: -self.limit]


def event_record(msg: Mapping[str, Any]) -> EventRecord:
    """Turn a QMP event message into an :class:`EventRecord`."""
    stamp = msg.get("timestamp")
    timestamp = 0.0
    if isinstance(stamp, Mapping):
        with contextlib.suppress(TypeError, ValueError):
            timestamp = float(stamp.get("seconds", 0)) + float(stamp.get("microseconds", 0)) / 1e6
    data = msg.get("data")
    return EventRecord(str(msg.get("event")), timestamp, data if isinstance(data, Mapping) else {})
