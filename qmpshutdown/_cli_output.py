"""What the ``qmpshutdown`` command prints: progress, log lines, outcomes, the exit status."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
from collections.abc import Iterator, Sequence
from json import dumps
from typing import Any

from ._errors import ConnectError, Error, InternalError, PidMismatchError, ShutdownFailed
from ._progress import Progress, ProgressKind
from ._result import ShutdownResult

EXIT_OK, EXIT_FORCED, EXIT_UNREACHED, EXIT_RUNNING = 0, 1, 2, 3
EXIT_INTERRUPTED = 130


class _LineFormatter(logging.Formatter):
    """Format the library's step records as ``TARGET  +1.00s  what happened``."""

    def __init__(self, tracebacks: bool) -> None:
        super().__init__()
        self.tracebacks = tracebacks

    def format(self, record: logging.LogRecord) -> str:
        """Return one line (plus the traceback only when asked for with -v)."""
        line = record.getMessage()
        target = getattr(record, "qmpshutdown_target", None)
        elapsed = getattr(record, "qmpshutdown_elapsed", None)
        if isinstance(target, str) and isinstance(elapsed, (int, float)):
            # The message repeats "<target>: [  1.00s] " for plain log files; drop it.
            line = re.sub(rf"^{re.escape(target)}: \[\s*-?[\d.]+s\] ", "", line)
            line = f"{target}  +{elapsed:.2f}s  {line}"
        elif not record.name.startswith("qmpshutdown"):
            line = f"{record.name}: {line}"
        if record.levelno >= logging.WARNING:
            line = f"{record.levelname.lower()}: {line}"
        if self.tracebacks and record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


@contextlib.contextmanager
def logging_to_stderr(verbosity: int) -> Iterator[None]:
    """Send the library's warnings (everything with -v) to stderr, silence qemu.qmp unless -v.

    Progress lines do not come from here but from ``on_progress``; with -v the
    log's own step lines stand in for them. Undone on exit.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LineFormatter(tracebacks=verbosity > 0))
    # qemu.qmp logs ERRORs of its own ("Failed to establish session") for what our
    # one error line says; asyncio's go through our handler so they stay one line.
    levels = {
        "qmpshutdown": logging.DEBUG if verbosity > 0 else logging.WARNING,
        "qemu.qmp": logging.DEBUG if verbosity > 0 else logging.CRITICAL + 1,
        "asyncio": logging.WARNING,
    }
    saved = [(log, log.level, log.propagate) for log in map(logging.getLogger, levels)]
    for log, _, _ in saved:
        log.setLevel(levels[log.name])
        log.propagate = False
        log.addHandler(handler)
    try:
        yield
    finally:
        for log, level, propagate in saved:
            log.removeHandler(handler)
            log.setLevel(level)
            log.propagate = propagate


#: The updates printed as progress lines (a step's begin and QMP events are not).
_SHOWN = frozenset({ProgressKind.NOTE, ProgressKind.END, ProgressKind.GONE})


def print_progress(update: Progress) -> None:
    """Print one progress line on stderr: ``TARGET  +1.00s  what happened``."""
    if update.kind in _SHOWN:
        print(f"{update.target}  +{update.elapsed:.2f}s  {update.message}", file=sys.stderr)


def exit_status(outcome: ShutdownResult | Error) -> int:
    """The command's exit status for one VM's outcome (the worst of all wins)."""
    if isinstance(outcome, ShutdownResult):
        return EXIT_FORCED if outcome.forced else EXIT_OK
    if isinstance(outcome, (ConnectError, PidMismatchError)):
        return EXIT_UNREACHED
    return EXIT_RUNNING  # ShutdownFailed, or a bug: the VM's state is unknown


def error_line(target: str, err: Error) -> str:
    """The one stderr line for a VM that ended in an error."""
    message = str(err)
    if not message.startswith(f"{target}: "):
        message = f"{target}: {message}"
    if isinstance(err, (ConnectError, PidMismatchError, ShutdownFailed)):
        return f"error: {message}"
    if isinstance(err, InternalError):
        return f"internal error: {message}"  # a bug: shutdown_many() wrapped it
    return f"error: {message}"


def report(
    targets: Sequence[str],
    outcomes: Sequence[ShutdownResult | Error],
    *,
    json: bool,
    verbosity: int,
) -> None:
    """Print each target's outcome: a JSON line each (*json*), else a line on stderr."""
    for target, outcome in zip(targets, outcomes, strict=True):
        if json:
            record: dict[str, Any] = {"target": target}
            if isinstance(outcome, Error):
                record["error"] = str(outcome)
            if isinstance(outcome, (ShutdownResult, ShutdownFailed)):
                result = outcome if isinstance(outcome, ShutdownResult) else outcome.result
                record.update(result.to_dict())
                if result.saved_state is not None:
                    record["saved_state_bytes"] = _size(result.saved_state)
            print(dumps(record), flush=True)
            continue
        if isinstance(outcome, ShutdownFailed) and verbosity >= 0:
            print(f"{target}  {outcome.result.summary()}", file=sys.stderr)
        if isinstance(outcome, Error):
            print(error_line(target, outcome), file=sys.stderr)
        elif verbosity >= 0:
            print(f"{target}  {outcome.summary()}", file=sys.stderr)
        if isinstance(outcome, ShutdownResult) and outcome.saved_state is not None:
            size = _size(outcome.saved_state)
            print(f"{target}  saved state: {outcome.saved_state} ({size} bytes)", file=sys.stderr)


def _size(path: str) -> int | None:
    try:
        return os.stat(path).st_size
    except OSError:
        return None
