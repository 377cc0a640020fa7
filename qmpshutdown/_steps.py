"""The recorder: each step with its times and outcome, its log line and its progress updates.

A step is one ``with recorder.step(stage) as step:`` block. What the block
does is noted on the way (:meth:`OpenStep.note`); how it ended is one
:meth:`OpenStep.end`. A block left by cancellation (the "QEMU is gone"
watcher ends the ladder) is closed by *on_cancel*, so the record never holds
a step half-written.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator

import anyio
import attrs

from ._policy import Stage
from ._progress import Progress, ProgressCallback, ProgressKind, Reporter
from ._result import Cause, EventRecord, Outcome, Step

logger = logging.getLogger("qmpshutdown")


@attrs.frozen
class Ended:
    """How a rung (or an action) ended: what its step records."""

    outcome: Outcome
    detail: str
    cause: Cause | None = None
    at: float | None = None  #: when it ended (seconds since the call), if not now
    path: str | None = None  #: a file the step wrote (a screenshot), if any


class OpenStep:
    """The step in progress; closed once, by :meth:`end` or by the recorder."""

    def __init__(self, recorder: Recorder, stage: Stage) -> None:
        self.recorder = recorder
        self.stage = stage
        self.started = recorder.now()
        self.so_far = ""  #: what the step has done so far (kept if QEMU goes mid-step)
        self.path: str | None = None  #: a file the step wrote whole (kept if QEMU goes)
        self.ended: Ended | None = None
        #: set once part of the step failed: if its budget then runs out, it failed for this
        self.failing: Cause | None = None

    def wrote(self, path: str) -> None:
        """Keep *path* as the file this step wrote (its record's ``path``, however it ends)."""
        self.path = path

    def note(self, detail: str, *, say: bool = True) -> None:
        """Keep *detail* as what the step has done so far; log and report it if *say*."""
        self.so_far = detail
        if say:
            self.recorder.say(detail, stage=self.stage)

    def end(self, ended: Ended) -> None:
        """Record how the step ended (the first call counts)."""
        if self.ended is None:
            self.ended = ended


class Recorder:
    """The steps so far; times count from *started* (the anyio clock at the call).

    :param started: the anyio clock when the caller called.
    :param name: how log lines and progress updates name the VM.
    :param on_progress: the caller's progress callable, or None.
    """

    def __init__(self, started: float, name: str, on_progress: ProgressCallback | None) -> None:
        self.started = started
        self.name = name
        self.steps: list[Step] = []
        self.report = Reporter(on_progress)

    def now(self) -> float:
        """Seconds since the call."""
        return anyio.current_time() - self.started

    @contextlib.contextmanager
    def step(self, stage: Stage, on_cancel: Callable[[OpenStep], Ended]) -> Iterator[OpenStep]:
        """Open a step of *stage*; record it when the block ends.

        :param on_cancel: when the block is cancelled, returns how the step ended.
        """
        step = OpenStep(self, stage)
        self._update(f"{stage.value} begins", stage, ProgressKind.BEGIN, log=False)
        try:
            yield step
        except anyio.get_cancelled_exc_class():
            step.end(on_cancel(step))
            raise
        finally:
            ended = step.ended or Ended(Outcome.FAILED, step.so_far or "ended without an outcome")
            self.close(step, ended, self.now() if ended.at is None else ended.at)

    def skip(self, stage: Stage, ended: Ended) -> None:
        """Record a step that could not run at all (it begins and ends at once)."""
        step = OpenStep(self, stage)
        self._update(f"{stage.value} begins", stage, ProgressKind.BEGIN, log=False)
        self.close(step, ended, step.started)

    def close(self, step: OpenStep, ended: Ended, at: float) -> None:
        path = ended.path or step.path
        record = Step(step.stage, ended.outcome, step.started, at, ended.detail, ended.cause, path)
        self.steps.append(record)
        message = f"{step.stage.value} {ended.outcome.value}: {ended.detail}"
        self._update(message, step.stage, ProgressKind.END, step=record)

    def say(self, message: str, *, stage: Stage | None = None) -> None:
        """Log one line and report it."""
        self._update(message, stage, ProgressKind.NOTE)

    def event(self, event: EventRecord) -> None:
        """Report a QMP event (logged at DEBUG only)."""
        self._update(f"event {event.event}", None, ProgressKind.EVENT, event=event, log=False)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("%s: event %s %s", self.name, event.event, dict(event.data))

    def sample(self, busy: bool) -> None:
        """Report a reading of the guest: busy or idle since the last one (not logged)."""
        message = "guest busy" if busy else "guest idle"
        self._update(message, None, ProgressKind.SAMPLE, busy=busy, log=False)

    def gone(self, at: float) -> None:
        """Report that QEMU was seen gone, *at* seconds since the call."""
        self._update("QEMU is gone", None, ProgressKind.GONE, elapsed=at)

    def _update(
        self,
        message: str,
        stage: Stage | None,
        kind: ProgressKind,
        *,
        step: Step | None = None,
        event: EventRecord | None = None,
        elapsed: float | None = None,
        log: bool = True,
        busy: bool | None = None,
    ) -> None:
        if not (self.report.callback is not None or (log and logger.isEnabledFor(logging.INFO))):
            return  # nobody listens: build nothing (the fast path's CPU, benchmarks/phases.py)
        elapsed = self.now() if elapsed is None else elapsed
        if log and logger.isEnabledFor(logging.INFO):
            logger.info(
                "%s: [%6.2fs] %s",
                self.name,
                elapsed,
                message,
                extra={"qmpshutdown_target": self.name, "qmpshutdown_elapsed": elapsed},
            )
        update = Progress(
            target=self.name, elapsed=elapsed, stage=stage, message=message,
            step=step, event=event, kind=kind, busy=busy,
        )  # fmt: skip
        self.report(update)
