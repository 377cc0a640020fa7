"""The questions for a Linux guest with systemd (checked against systemd 252, Debian 12).

Four read-only commands: logind's inhibitors, logind's running ``HandlePowerKey``,
where the logind configuration sets it, and systemd's job queue. ``busctl
--json=short`` prints one line of JSON: ``{"type": SIGNATURE, "data": ...}``
(a method's reply is the list of its out-arguments).

The power key needs two answers (the running value from logind, the file that
sets it from ``systemd-analyze cat-config``); each question reads its own answer
into a :class:`PowerKeySetting`, and :func:`merge` folds them into the one
``power-key`` finding. The diagnose step calls :func:`merge` once with every
finding of every question; no :class:`PowerKeySetting` survives it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

import attrs

from .._finding import INHIBITOR, POWER_KEY, STOP_JOB, Finding
from .asked import (
    FIELD_CAP,
    Answer,
    Question,
    Unreadable,
    check_ran,
    check_whole,
    one_line,
    source_of,
)

_LOGIN1 = ("org.freedesktop.login1", "/org/freedesktop/login1", "org.freedesktop.login1.Manager")
_SYSTEMD1 = ("org.freedesktop.systemd1", "/org/freedesktop/systemd1",
             "org.freedesktop.systemd1.Manager")  # fmt: skip

INHIBITORS_ARGV = ("busctl", "--json=short", "call", *_LOGIN1, "ListInhibitors")
POWER_KEY_ARGV = ("busctl", "--json=short", "get-property", *_LOGIN1, "HandlePowerKey")
LOGIND_CONF_ARGV = ("systemd-analyze", "cat-config", "systemd/logind.conf")
JOBS_ARGV = ("busctl", "--json=short", "call", *_SYSTEMD1, "ListJobs")

#: An inhibitor on one of these (``what`` is a colon-separated list) keeps the button from working.
BLOCKING_WHAT = frozenset({"shutdown", "handle-power-key"})
#: A job for one of these units means systemd is already shutting the guest down.
SHUTDOWN_UNITS = frozenset({
    "shutdown.target", "poweroff.target", "halt.target", "reboot.target", "final.target",
    "systemd-poweroff.service",
})  # fmt: skip
#: Units named in a ``stop-job`` finding before "and N more".
LISTED_UNITS = 5
#: What logind does with the power button for each ``HandlePowerKey=`` but ``poweroff``.
POWER_KEY_MEANS = {
    "ignore": "logind ignores the power button",
    "reboot": "the power button reboots the guest",
    "halt": "the power button halts the guest without powering it off",
    "kexec": "the power button kexecs into another kernel",
    "suspend": "the power button suspends the guest",
    "hibernate": "the power button hibernates the guest",
    "hybrid-sleep": "the power button puts the guest to hybrid sleep",
    "suspend-then-hibernate": "the power button suspends the guest",
    "lock": "the power button only locks the screen",
    "factory-reset": "the power button starts a factory reset",
}
#: The kind of the helper finding that :func:`merge` folds away (never reported).
POWER_KEY_SETTING = "power-key-setting"


@attrs.frozen
class PowerKeySetting(Finding):
    """One reading of ``HandlePowerKey``, to be folded by :func:`merge`; never reported.

    :ivar value: the value read (``ignore``, ``poweroff`` …).
    :ivar path: the file that sets it, or None for logind's running value.
    """

    value: str
    path: str | None


def read_inhibitors(answer: Answer) -> tuple[Finding, ...]:
    """An ``inhibitor`` finding for each block inhibitor on shutdown or the power key.

    Delay inhibitors only hold a shutdown back for ``InhibitDelayMaxSec``: not findings.
    """
    rows = _busctl_data(answer, "ListInhibitors", "a(ssssuu)")
    if not (isinstance(rows, list) and len(rows) == 1 and isinstance(rows[0], list)):
        raise Unreadable("busctl's ListInhibitors reply is not one array of inhibitors")
    found = []
    for row in rows[0]:
        what, who, why, mode, uid, pid = _fields(row, (str, str, str, str, int, int), "inhibitor")
        if mode == "block" and BLOCKING_WHAT & set(what.split(":")):
            detail = (f"{_quote(who)} (pid {pid}, uid {uid}) blocks {_quote(what)}: "
                      f'"{_quote(why)}"')  # fmt: skip
            found.append(Finding(INHIBITOR, one_line(detail), source_of(INHIBITORS_ARGV)))
    return tuple(found)


def read_power_key(answer: Answer) -> tuple[Finding, ...]:
    """logind's running ``HandlePowerKey``, as a :class:`PowerKeySetting` for :func:`merge`."""
    value = _busctl_data(answer, "HandlePowerKey", "s")
    if not isinstance(value, str) or not value:
        raise Unreadable("busctl's HandlePowerKey is not a string")
    return (_setting(value, None, POWER_KEY_ARGV),)


def read_logind_conf(answer: Answer) -> tuple[Finding, ...]:
    """The last ``HandlePowerKey=`` of logind's configuration and its file, for :func:`merge`.

    ``systemd-analyze cat-config`` prints each file (the main one, then its
    drop-ins in the order logind reads them) after a ``# /path`` line; the last
    assignment in a ``[Login]`` section wins. None at all: no helper finding.
    """
    check_ran(answer, "systemd-analyze")
    check_whole(answer, "systemd-analyze")
    path = section = None
    found: tuple[str, str] | None = None
    previous = ""
    for raw in answer.stdout.splitlines():
        line = raw.strip()
        if raw.startswith("# /") and not previous.strip():
            path, section = raw[2:].strip(), None
        elif path is None and line:
            raise Unreadable("systemd-analyze cat-config did not start with a '# /file' line")
        elif line.startswith("[") and line.endswith("]"):
            section = line[1:-1].strip()
        elif line and line[0] not in "#;" and "=" in line and section == "Login":
            key, value = (part.strip() for part in line.split("=", 1))
            if key == "HandlePowerKey":  # an empty value puts the default back
                found = (value or "poweroff", path or "")
        previous = raw
    if path is None:
        raise Unreadable("systemd-analyze cat-config printed no file")
    if found is None:
        return ()
    return (_setting(found[0], found[1], LOGIND_CONF_ARGV),)


def read_jobs(answer: Answer) -> tuple[Finding, ...]:
    """A ``stop-job`` finding when a shutdown is queued: the units still stopping."""
    rows = _busctl_data(answer, "ListJobs", "a(usssoo)")
    if not (isinstance(rows, list) and len(rows) == 1 and isinstance(rows[0], list)):
        raise Unreadable("busctl's ListJobs reply is not one array of jobs")
    jobs = [_fields(row, (int, str, str, str, str, str), "job") for row in rows[0]]
    targets = sorted({unit for _id, unit, *_rest in jobs if unit in SHUTDOWN_UNITS})
    if not targets:
        return ()
    stopping = [unit for _id, unit, kind, state, *_paths in jobs
                if kind == "stop" and state == "running"]  # fmt: skip
    going = f"shutting down ({', '.join(targets)} queued, {len(jobs)} jobs)"
    if stopping:
        detail = f"{going}: still stopping {_some(stopping)}"
    else:
        detail = f"{going}: no stop job running"
    return (Finding(STOP_JOB, one_line(detail), source_of(JOBS_ARGV)),)


def merge(findings: Iterable[Finding]) -> tuple[Finding, ...]:
    """*findings* with the :class:`PowerKeySetting` helpers folded into one ``power-key``.

    logind's running value decides (a file changed since logind started does
    not count); the file says where it was set. No running value (its question
    failed): the file's value, said as such. ``poweroff``: no finding. Every
    other finding passes through in order; the ``power-key`` one takes the
    place of the first helper.
    """
    findings = tuple(findings)
    settings = [f for f in findings if isinstance(f, PowerKeySetting)]
    if not settings:
        return findings
    folded = _power_key(settings)
    merged: list[Finding] = []
    for finding in findings:
        if finding is settings[0] and folded is not None:
            merged.append(folded)
        elif not isinstance(finding, PowerKeySetting):
            merged.append(finding)
    return tuple(merged)


def _power_key(settings: Sequence[PowerKeySetting]) -> Finding | None:
    running = next((s for s in settings if s.path is None), None)
    configured = next((s for s in reversed(settings) if s.path is not None), None)
    value = running.value if running is not None else configured.value if configured else None
    if value is None or value == "poweroff":
        return None
    means = POWER_KEY_MEANS.get(value, "the power button does not power the guest off")
    if running is None and configured is not None:
        where = f"set in {configured.path}; logind's running value was not read"
    elif configured is None:
        where = "no logind.conf file sets it now"
    elif configured.value == value:
        where = f"set in {configured.path}"
    else:
        where = (f"{configured.path} now says {_quote(configured.value)}: "
                 "logind has not re-read its configuration")  # fmt: skip
    detail = f"HandlePowerKey={_quote(value)} ({where}): {means}"
    source = "; ".join(dict.fromkeys(s.source for s in settings))
    return Finding(POWER_KEY, one_line(detail), source)


def _setting(value: str, path: str | None, argv: tuple[str, ...]) -> PowerKeySetting:
    value, shown = one_line(value, FIELD_CAP), None if path is None else one_line(path, FIELD_CAP)
    where = "logind's running value" if shown is None else f"set in {shown}"
    return PowerKeySetting(POWER_KEY_SETTING, f"HandlePowerKey={value} ({where})",
                           source_of(argv), value, shown)  # fmt: skip


def _busctl_data(answer: Answer, what: str, signature: str) -> Any:
    check_ran(answer, "busctl")
    check_whole(answer, "busctl")
    try:
        reply = json.loads(answer.stdout)
    except ValueError as err:
        raise Unreadable(f"busctl's {what} reply is not JSON: {err}") from err
    if not isinstance(reply, dict) or reply.get("type") != signature or "data" not in reply:
        raise Unreadable(f"busctl's {what} reply is not of type {signature}")
    return reply["data"]


def _fields(row: object, types: tuple[type, ...], what: str) -> list[Any]:
    if not (isinstance(row, list) and len(row) == len(types)) or not all(
        isinstance(value, kind) and not isinstance(value, bool)
        for value, kind in zip(row, types, strict=True)
    ):
        raise Unreadable(f"busctl listed a {what} that is not {len(types)} typed fields")
    return row


def _some(units: Sequence[str]) -> str:
    shown = ", ".join(_quote(unit) for unit in units[:LISTED_UNITS])
    more = len(units) - LISTED_UNITS
    return f"{shown} and {more} more" if more > 0 else shown


def _quote(text: str) -> str:
    return one_line(text, FIELD_CAP)


#: Who holds an inhibitor (the question adaptive patience also asks while it waits).
INHIBITORS = Question(INHIBITORS_ARGV, read_inhibitors)
#: The Linux (systemd) questions, in the order they are asked.
QUESTIONS: tuple[Question, ...] = (
    INHIBITORS,
    Question(POWER_KEY_ARGV, read_power_key),
    Question(LOGIND_CONF_ARGV, read_logind_conf),
    Question(JOBS_ARGV, read_jobs),
)
#: Each question's command line, in order.
QUESTIONS_ARGV: tuple[tuple[str, ...], ...] = tuple(q.argv for q in QUESTIONS)
