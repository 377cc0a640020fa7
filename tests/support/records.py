"""Reading the library's records in the real-guest tests.

QEMU's exit after its guest's own SHUTDOWN can stall until a signal ends it: QEMU
10.0 beside 3 CPU burners did so in 1 stop of 16 (SIGTERM then ended it in 0.01
s), and CI saw it on both QEMU versions (once a stall of some 19 s that ended by
itself). The library now wakes such an exit with SIGTERM after half of
``quit_timeout`` (a stop on the press); when that does not end it, its record
says so: the press step failed with "SHUTDOWN came but QEMU neither exited nor
stopped" after ``quit_timeout``, ``quit`` was skipped
(it cannot end an exit already begun) and SIGTERM ended QEMU; ``graceful`` holds,
reason ``guest-shutdown``. The guest went on the press, which is what a test of a
cooperative guest asks; the stall is QEMU's, not the guest's or the library's (its
main thread waits in ``monitor_cleanup()`` for a wake-up it missed: ``docs/why.md``).
"""

from __future__ import annotations

import re
import sys
from typing import Any, TypeVar

import attrs

from qmpshutdown import Outcome, ShutdownResult, Stage
from qmpshutdown._rungs.quit import STALLED_EXIT

T = TypeVar("T")


def stalled_exit(result: ShutdownResult) -> bool:
    """True for the record of a guest that went on the press and a QEMU whose exit stalled."""
    return _stalled(result.to_dict())


def _stalled(record: dict[str, Any]) -> bool:
    """:func:`stalled_exit` for a record as JSON gives it."""
    steps = record.get("steps") or []
    kinds = [(step.get("stage"), step.get("outcome")) for step in steps]
    return (
        record.get("stage") == "terminate" and record.get("graceful") is True
        and record.get("reason") == "guest-shutdown"
        and kinds == [("powerdown", "failed"), ("quit", "skipped"), ("terminate", "done")]
        and steps[1].get("detail") == STALLED_EXIT
        and "SHUTDOWN came but QEMU neither" in (steps[0].get("detail") or "")
    )  # fmt: skip


def as_pressed(result: T) -> T:
    """*result*, or for a stalled exit (:func:`stalled_exit`) the record of a stop on the press.

    The one record rewritten is that exact one, and each rewrite is said on stderr,
    so that a test log counts them. Anything else (an exception, another record)
    comes back as it is.
    """
    if not isinstance(result, ShutdownResult) or not stalled_exit(result):
        return result
    powerdown = result.step(Stage.POWERDOWN)
    assert powerdown is not None
    print(f"support.records: QEMU's exit stalled after the guest's SHUTDOWN: {result.steps}",
          file=sys.stderr)  # fmt: skip
    done = attrs.evolve(powerdown, outcome=Outcome.DONE, cause=None)
    pressed = attrs.evolve(result, stage=Stage.POWERDOWN, cause=None, steps=(done,))
    return pressed  # type: ignore[return-value]


def as_pressed_record(record: dict[str, Any]) -> dict[str, Any]:
    """:func:`as_pressed` for a record as JSON gives it (the CLI's ``--json``, Ansible's)."""
    if not _stalled(record):
        return record
    steps = record["steps"]
    print(f"support.records: QEMU's exit stalled after the guest's SHUTDOWN: {steps}",
          file=sys.stderr)  # fmt: skip
    done = {**steps[0], "outcome": "done", "cause": None}
    return {**record, "stage": "powerdown", "cause": None, "steps": [done]}


def as_pressed_line(line: str, err: str, target: object) -> str:
    """The CLI's summary *line* for *target*, or for a stalled exit the line of a stop on the press.

    The text output has no record to read: a stalled exit is the summary
    ``terminate graceful reason=guest-shutdown`` together with the progress line, in
    *err*, of ``quit`` skipped for :data:`STALLED_EXIT` for that same target.
    """
    skipped = rf"{re.escape(str(target))}  \+\d+\.\d\ds  quit skipped: {re.escape(STALLED_EXIT)}"
    forced = f"{target}  terminate graceful reason=guest-shutdown "
    if not line.startswith(forced) or not any(re.fullmatch(skipped, x) for x in err.splitlines()):
        return line
    print(f"support.records: QEMU's exit stalled after the guest's SHUTDOWN: {line}",
          file=sys.stderr)  # fmt: skip
    return line.replace("  terminate graceful ", "  powerdown graceful ", 1)


def as_pressed_report(report: str, name: str) -> str:
    """The pytest plugin's teardown *report*, with VM *name*'s stalled exit read as a press.

    The report has one summary line per VM and no steps: ``terminate graceful
    reason=guest-shutdown`` can only be a guest that powered off and a QEMU that
    needed SIGTERM to finish its exit (a stalled exit).
    """
    forced = f"{name}: terminate graceful reason=guest-shutdown "
    if forced not in report:
        return report
    print(f"support.records: QEMU's exit stalled after the guest's SHUTDOWN ({name})",
          file=sys.stderr)  # fmt: skip
    return report.replace(forced, f"{name}: powerdown graceful reason=guest-shutdown ", 1)
