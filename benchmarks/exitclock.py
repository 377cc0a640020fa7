"""When a process really exited, as the benchmarks' reference: a pidfd polled in a thread.

The thread needs the GIL to stamp the time, so while the event loop holds it the stamp
comes late: an "exit → known" figure from it is a lower bound.
"""

from __future__ import annotations

import os
import select
import threading
import time


class ExitClock:
    """Stamps the moment a process exits (a pidfd polled in a thread): when QEMU was really gone."""

    def __init__(self, pid: int) -> None:
        self.pidfd = os.pidfd_open(pid)
        self.exited_at: float | None = None
        self._thread = threading.Thread(target=self._wait, daemon=True)
        self._thread.start()

    def _wait(self) -> None:
        poller = select.poll()
        poller.register(self.pidfd, select.POLLIN)
        poller.poll()
        self.exited_at = time.perf_counter()

    def result(self, timeout: float = 5.0) -> float | None:
        self._thread.join(timeout)
        os.close(self.pidfd)
        return self.exited_at
