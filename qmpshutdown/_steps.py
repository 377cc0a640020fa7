"""The step log: each rung tried, with its times and detail, and one log line per step."""

from __future__ import annotations

import logging

import anyio

from ._policy import Stage
from ._result import Outcome, Step

logger = logging.getLogger("qmpshutdown")


class StepLog:
    """The rungs tried so far; times count from *started* (the anyio clock at the call).

    :param started: the anyio clock when the caller called.
    :param name: how log lines name the VM.
    """

    def __init__(self, started: float, name: str) -> None:
        self.started = started
        self.name = name
        self.steps: list[Step] = []
        self.open: tuple[Stage, float, str] | None = None  # the rung in progress

    def now(self) -> float:
        """Seconds since the call."""
        return anyio.current_time() - self.started

    def begin(self, stage: Stage) -> None:
        """Open the rung *stage*."""
        self.open = (stage, self.now(), "")

    def progress(self, detail: str) -> None:
        """Say what the open rung has done so far (kept if QEMU goes mid-rung)."""
        assert self.open is not None
        self.open = (self.open[0], self.open[1], detail)
        self.log(detail)

    def end(self, outcome: Outcome, detail: str) -> None:
        """Close the open rung now, with *outcome*."""
        assert self.open is not None
        self.close_open(outcome, self.now(), detail)

    def close_open(self, outcome: Outcome, ended: float, detail: str) -> None:
        """Close the open rung as of *ended* (seconds since the call)."""
        assert self.open is not None
        stage, started, _ = self.open
        self.open = None
        self.steps.append(Step(stage, outcome, started, ended, detail))
        self.log("%s %s: %s", stage.value, outcome.value, detail)

    def log(self, msg: str, *args: object) -> None:
        """Log one INFO line, with the target and the elapsed time as extra fields."""
        elapsed = self.now()
        logger.info(
            "%s: [%6.2fs] " + msg,
            self.name,
            elapsed,
            *args,
            extra={"qmpshutdown_target": self.name, "qmpshutdown_elapsed": elapsed},
        )
