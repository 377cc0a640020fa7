"""The questions for a Windows guest: reg.exe, tasklist.exe and powercfg.exe (no PowerShell).

Each reads one thing that keeps Windows from powering off at the button: a
restart it wants first (three registry places), an update being installed, a
policy that needs someone logged on, a power button set to something else,
the Shutdown Event Tracker. Their output ends lines with ``\\r\\n``.

``reg.exe query KEY [/v NAME]`` prints a blank line, the key's full name
(``HKEY_LOCAL_MACHINE\\...``), then one line per value: four spaces, the name,
four spaces, the type (``REG_DWORD``), four spaces, the data (a DWORD as
``0x1``, a multi-string's parts joined by a literal ``\\0``). A key or value
that is not there: exit status 1 and ``ERROR: The system was unable to find
the specified registry key or value.``: a plain "no" here. Any other error (a
localized message included) is unreadable: the question failed.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Callable

from .._finding import (
    LOGON_REQUIRED,
    PENDING_REBOOT,
    POWER_KEY,
    SHUTDOWN_REASON_PROMPT,
    UPDATING,
    Finding,
)
from .asked import (
    FIELD_CAP,
    Answer,
    Question,
    Unreadable,
    check_ran,
    check_whole,
    first_line,
    one_line,
    source_of,
)

_CURRENT_VERSION = r"HKLM\SOFTWARE\Microsoft\Windows\CurrentVersion"
REBOOT_REQUIRED_KEY = _CURRENT_VERSION + r"\WindowsUpdate\Auto Update\RebootRequired"
REBOOT_PENDING_KEY = _CURRENT_VERSION + r"\Component Based Servicing\RebootPending"
SESSION_MANAGER_KEY = r"HKLM\SYSTEM\CurrentControlSet\Control\Session Manager"
POLICIES_SYSTEM_KEY = _CURRENT_VERSION + r"\Policies\System"
RELIABILITY_KEY = r"HKLM\SOFTWARE\Policies\Microsoft\Windows NT\Reliability"

REBOOT_REQUIRED_ARGV = ("reg.exe", "query", REBOOT_REQUIRED_KEY)
REBOOT_PENDING_ARGV = ("reg.exe", "query", REBOOT_PENDING_KEY)
FILE_RENAMES_ARGV = ("reg.exe", "query", SESSION_MANAGER_KEY, "/v", "PendingFileRenameOperations")
TASKS_ARGV = ("tasklist.exe", "/fo", "csv", "/nh")
LOGON_ARGV = ("reg.exe", "query", POLICIES_SYSTEM_KEY, "/v", "shutdownwithoutlogon")
BUTTON_ARGV = ("powercfg.exe", "/q", "SCHEME_CURRENT", "SUB_BUTTONS", "PBUTTONACTION")
REASON_ARGV = ("reg.exe", "query", RELIABILITY_KEY, "/v", "ShutdownReasonOn")

#: What reg.exe says (exit status 1) when the key or value is not there.
REG_ABSENT = "unable to find the specified registry key or value"
#: The processes of Windows' servicing stack: while they run, updates are being installed.
UPDATERS = ("tiworker.exe", "trustedinstaller.exe")
#: What each power button action index means (powercfg's ``PBUTTONACTION``); 3 is "Shut down".
BUTTON_ACTIONS = {0: "Do nothing", 1: "Sleep", 2: "Hibernate", 4: "Turn off the display"}
SHUT_DOWN = 3

_VALUE_LINE = re.compile(r"^ {4}(?P<name>.+?) {4}(?P<type>REG_[A-Z0-9_]+)(?: {4}(?P<data>.*))?$")
_AC_INDEX = re.compile(r"^\s*Current AC Power Setting Index:\s*0x(?P<index>[0-9a-fA-F]{1,8})\s*$")


def reg_lines(answer: Answer) -> list[str] | None:
    """reg.exe's output lines, or None when the key or value is not there.

    :raises Unreadable: any other failure, or an output without the key's name.
    """
    said = f"{answer.stdout}\n{answer.stderr}"
    if answer.exitcode == 1 and REG_ABSENT in said.lower():
        return None
    check_ran(answer, "reg.exe")
    check_whole(answer, "reg.exe")
    lines = [line.rstrip("\r") for line in answer.stdout.split("\n")]
    if not any(line.upper().startswith("HKEY_") for line in lines):
        raise Unreadable(f"reg.exe printed no key name: {first_line(answer.stdout)}")
    return lines


def reg_value(lines: list[str], name: str) -> tuple[str, str] | None:
    """The (type, data) of value *name* in reg.exe's *lines*, or None."""
    for line in lines:
        match = _VALUE_LINE.match(line.rstrip())
        if match and match["name"].lower() == name.lower():
            return match["type"], match["data"] or ""
    return None


def reg_dword(answer: Answer, name: str) -> int | None:
    """The REG_DWORD *name* that reg.exe printed, or None when it is not there.

    :raises Unreadable: not a REG_DWORD, or not a number.
    """
    lines = reg_lines(answer)
    if lines is None:
        return None
    found = reg_value(lines, name)
    if found is None:
        raise Unreadable(f"reg.exe printed no {name} value line")
    kind, data = found
    if kind != "REG_DWORD" or not re.fullmatch(r"0x[0-9a-fA-F]{1,8}", data.strip()):
        raise Unreadable(f"{name} is {one_line(kind, FIELD_CAP)} {one_line(data, FIELD_CAP)!r}, "
                         "not a REG_DWORD")  # fmt: skip
    return int(data.strip(), 16)


def _key_exists(argv: tuple[str, ...], why: str) -> Callable[[Answer], tuple[Finding, ...]]:
    key = argv[2]

    def read(answer: Answer) -> tuple[Finding, ...]:
        if reg_lines(answer) is None:
            return ()
        return (Finding(PENDING_REBOOT, one_line(f"{why} ({key} exists)"), source_of(argv)),)

    read.__doc__ = f"A ``pending-reboot`` finding when ``{key}`` exists: {why}."
    return read


read_reboot_required = _key_exists(REBOOT_REQUIRED_ARGV, "Windows Update waits for a restart")
read_reboot_pending = _key_exists(REBOOT_PENDING_ARGV,
                                  "component servicing waits for a restart")  # fmt: skip


def read_file_renames(answer: Answer) -> tuple[Finding, ...]:
    """A ``pending-reboot`` finding when files wait to be replaced at the next restart."""
    lines = reg_lines(answer)
    if lines is None:
        return ()
    found = reg_value(lines, "PendingFileRenameOperations")
    if found is None:
        raise Unreadable("reg.exe printed no PendingFileRenameOperations value line")
    parts = [part for part in found[1].split("\\0") if part.strip()]
    if not parts:
        return ()
    detail = (f"files wait to be renamed or deleted at the next restart: {len(parts)} paths "
              f"in PendingFileRenameOperations, first {one_line(parts[0], FIELD_CAP)}")  # fmt: skip
    return (Finding(PENDING_REBOOT, one_line(detail), source_of(FILE_RENAMES_ARGV)),)


def read_tasks(answer: Answer) -> tuple[Finding, ...]:
    """An ``updating`` finding when TiWorker.exe or TrustedInstaller.exe runs (with pids).

    ``tasklist /fo csv /nh`` prints one quoted row per process: image name,
    PID, session name, session number, memory (``"45,676 K"``).
    """
    check_ran(answer, "tasklist.exe")
    rows = list(csv.reader(answer.stdout.replace("\r", "").splitlines()))
    rows = [row for row in rows if row]
    if answer.truncated and rows:
        rows = rows[:-1]  # the last row may be cut in the middle
    if not rows or any(len(row) != 5 or not row[1].isdigit() for row in rows):
        raise Unreadable(
            f"tasklist.exe did not print CSV process rows: {first_line(answer.stdout)}"
        )
    running = [f"{one_line(row[0], FIELD_CAP)} (pid {row[1]})"
               for row in rows if row[0].lower() in UPDATERS]  # fmt: skip
    if not running:
        check_whole(answer, "tasklist.exe")  # the updater may be in the part that was cut
        return ()
    detail = f"Windows is installing updates: {', '.join(running)} running"
    return (Finding(UPDATING, one_line(detail), source_of(TASKS_ARGV)),)


def read_logon(answer: Answer) -> tuple[Finding, ...]:
    """A ``logon-required`` finding when ``shutdownwithoutlogon`` is 0.

    Not there: no finding (the edition's default applies; who is logged on is
    read by the agent rung).
    """
    if reg_dword(answer, "shutdownwithoutlogon") != 0:
        return ()
    detail = (
        "shutdownwithoutlogon=0: Windows ignores the power button until someone logs on "
        '(policy "Shutdown: Allow system to be shut down without having to log on")'
    )
    return (Finding(LOGON_REQUIRED, one_line(detail), source_of(LOGON_ARGV)),)


def read_button(answer: Answer) -> tuple[Finding, ...]:
    """A ``power-key`` finding when the power button's AC action is not "Shut down"."""
    check_ran(answer, "powercfg.exe")
    lines = answer.stdout.replace("\r", "").splitlines()
    indexes = [match["index"] for line in lines if (match := _AC_INDEX.match(line))]
    if len(indexes) != 1:
        raise Unreadable("powercfg.exe printed no single 'Current AC Power Setting Index' line")
    index = int(indexes[0], 16)
    if index == SHUT_DOWN:
        return ()
    action = BUTTON_ACTIONS.get(index, "an action powercfg does not name here")
    detail = (f"power button action (AC) of the active power plan is {index} "
              f'"{action}", not 3 "Shut down"')  # fmt: skip
    return (Finding(POWER_KEY, one_line(detail), source_of(BUTTON_ARGV)),)


def read_reason(answer: Answer) -> tuple[Finding, ...]:
    """A ``shutdown-reason-prompt`` finding when the policy ``ShutdownReasonOn`` is 1."""
    if reg_dword(answer, "ShutdownReasonOn") != 1:
        return ()
    detail = (
        "ShutdownReasonOn=1: the Shutdown Event Tracker asks why before Windows "
        'shuts down (policy "Display Shutdown Event Tracker")'
    )
    return (Finding(SHUTDOWN_REASON_PROMPT, one_line(detail), source_of(REASON_ARGV)),)


#: The Windows questions, in the order they are asked.
QUESTIONS: tuple[Question, ...] = (
    Question(REBOOT_REQUIRED_ARGV, read_reboot_required),
    Question(REBOOT_PENDING_ARGV, read_reboot_pending),
    Question(FILE_RENAMES_ARGV, read_file_renames),
    Question(TASKS_ARGV, read_tasks),
    Question(LOGON_ARGV, read_logon),
    Question(BUTTON_ARGV, read_button),
    Question(REASON_ARGV, read_reason),
)
