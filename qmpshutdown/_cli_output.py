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
from ._policy import RUNGS
from ._progress import Progress, ProgressKind
from ._result import ShutdownResult

EXIT_OK, EXIT_FORCED, EXIT_UNREACHED, EXIT_RUNNING = 0, 1, 2, 3
EXIT_INTERRUPTED = 130

#: The end of ``--help``: targets, the ladder, causes, exit statuses, fleets, output.
EPILOG = f"""\
targets:
  PATH             a QMP unix socket (anything containing "/", or an existing file)
  HOST:PORT        a QMP TCP monitor, e.g. 127.0.0.1:4444 (PORT all digits)
  [ADDR]:PORT      an IPv6 TCP monitor, e.g. [::1]:4444
  Several targets are stopped concurrently. Over TCP QEMU's pid is unknown, so
  SIGTERM and SIGKILL are impossible unless --pid is given.

the ladder (--stages picks rungs, in this order): {", ".join(s.value for s in RUNGS)}
  The power button is pressed (again every --repress seconds) until the guest
  powers off or --timeout runs out; with --agent PATH (the guest agent's chardev
  socket) the guest is first asked why it stays (read-only commands through the
  agent's guest-exec, at most --diagnose-timeout; not with --no-diagnose), the
  agent is asked for guest-shutdown next (--agent-timeout), and the
  guest's filesystems are frozen right before any force (not with --no-freeze);
  then 'quit', SIGTERM, SIGKILL, each waited for. Windows' agent closes open
  applications by force on guest-shutdown.

causes (why a guest did not power itself off):
  ignored-power-button   pressed and delivered, but the guest did not react at all
  busy                   the guest was still working (CPU or disk) when it was forced
  stalled                it worked after the press, then idled without powering off
  asleep                 suspended to RAM (S3)
  paused                 paused (or prelaunch, debug, io-error, watchdog)
  panicked               the guest panicked
  migrating              a migration or snapshot is running
  rebooted               the guest rebooted instead of powering off
  monitor-unresponsive   QMP gave no greeting or no reply
  no-logon               Windows (its agent said so) with nobody logged in
  inhibited              an application holds a block inhibitor (the guest said so)
  What the guest itself said comes first: a "guest said:" line per finding.

exit status (with several targets the worst wins: 3 over 2 over 1 over 0):
  0    every target powered off gracefully (or was already off)
  1    all are off, but at least one needed force (quit or a signal)
  2    bad usage, or a target could not be reached at all (or --pid is not its QEMU)
  3    a QEMU is still running, or its state is unknown, after its ladder
  130  interrupted (Ctrl-C)

fleets (the VMs of a group are stopped concurrently):
  --then           between targets starts the next group: every VM of a group
                   is done before the next group starts (web1 web2 --then db)
  --deadline S     every VM done by S seconds from now: the graceful wait is
                   shortened to leave at most 2 s for the forced rungs
  --fleet FILE     the VMs from a JSON file instead of TARGETs:
                   {{"vms": [{{"target": "/run/db.qmp", "name": "db", "group": 1,
                     "pid": 4242, "policy": {{"powerdown_timeout": 120}}}}, ...]}}
                   "policy" holds ShutdownPolicy fields over the options' policy

--json prints one object per target, in the order given:
  {{"target": ..., "stage", "graceful", "reason", "presses", "runstate", "cause",
   "pid", "elapsed_s", "events", "steps", "saved_state", "screenshot",
  "console_tail", "guest_os", "guest_users", "activity", "diagnosis"}}, or
  {{"target", "error"}} when it was not reached; a target still running has
  "error" and the record, with "stage": null.
  Progress and errors then stay off stderr (-v still logs there).

--evidence-dir DIR saves a PNG of a guest's screen (QMP screendump; needs a
  display device) right before the first forced rung, and again if QEMU still
  runs at the end; never on a graceful stop. The progress line
  "screenshot done: saved PATH" and "screenshot" in --json give its path.
  After a save, "saved_state_bytes" gives the state file's size.

saving (--save-dir DIR):
  Adds the 'save' rung before 'quit' (unless --stages says otherwise): a guest
  that did not power off has its whole state (RAM and devices) written to a new
  file in DIR (mode 0600), then QEMU quits. Start it again from there with the
  same command line plus  -incoming 'exec:cat FILE'  (or qmpshutdown.launch(argv,
  restore=FILE)), with the same QEMU version and the disk images untouched.
"""


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
    names: Sequence[str] | None = None,
) -> None:
    """Print each target's outcome: a JSON line each (*json*), else a line on stderr.

    :param names: each VM's name (``--all``): JSON rows get ``"name"`` (and a
        ``"target"`` of null for a VM with no monitor), lines are labelled by it.
    """
    for index, (address, outcome) in enumerate(zip(targets, outcomes, strict=True)):
        target = address if names is None else names[index]
        if json:
            record: dict[str, Any] = {"target": address}
            if names is not None:
                record["target"] = address or None
                record["name"] = names[index]
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
            _said(target, outcome.result)
        if isinstance(outcome, Error):
            print(error_line(target, outcome), file=sys.stderr)
        elif verbosity >= 0:
            print(f"{target}  {outcome.summary()}", file=sys.stderr)
            _said(target, outcome)
        if isinstance(outcome, ShutdownResult) and outcome.saved_state is not None:
            size = _size(outcome.saved_state)
            print(f"{target}  saved state: {outcome.saved_state} ({size} bytes)", file=sys.stderr)


def _said(target: str, result: ShutdownResult) -> None:
    """One line per finding of the guest's own diagnosis: ``TARGET  guest said: KIND: DETAIL``."""
    for finding in result.diagnosis or ():
        print(f"{target}  guest said: {finding}", file=sys.stderr)


def _size(path: str) -> int | None:
    try:
        return os.stat(path).st_size
    except OSError:
        return None
