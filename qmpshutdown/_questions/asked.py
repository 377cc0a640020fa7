"""What is asked of a guest and what it answered: :class:`Question`, :class:`Answer`.

A question is a fixed, read-only command line the diagnose step runs in the
guest through the agent's ``guest-exec`` (``path`` is ``argv[0]``, ``arg`` the
rest: no shell, so nothing is quoted or expanded) and a pure function that
reads the answer into findings. A parser never runs, evaluates or builds a
command from what the guest printed; what it quotes goes through
:func:`one_line` (control characters out, one line, capped).

A parser that cannot read an answer — garbage, a cut-off output, a tool that is
not there, an exit status it does not know — raises :class:`Unreadable` with
why: the diagnose step records the question as failed and never guesses.
"""

from __future__ import annotations

import shlex
import unicodedata
from collections.abc import Callable

import attrs

from .._finding import Finding

#: The most the library keeps of each stream (stdout, stderr) of a question's command.
OUTPUT_CAP = 64 * 1024
#: The longest :attr:`Finding.detail` a parser writes.
DETAIL_CAP = 200
#: The longest piece of guest text (a name, a reason) quoted inside a detail.
FIELD_CAP = 80
#: Exit status of a command the guest could not find (POSIX shells, env, systemd's run).
NOT_FOUND_STATUS = 127


class Unreadable(Exception):
    """The answer is not what the tool prints: the question failed, and this says why."""


@attrs.frozen
class Answer:
    """What a question's command left behind, decoded.

    :ivar exitcode: its exit status, or None when it had none (killed by a signal).
    :ivar stdout: what it printed, decoded (at most :data:`OUTPUT_CAP` bytes kept).
    :ivar stderr: what it printed on stderr, decoded (the same cap).
    :ivar truncated: True when either stream was cut at the cap.
    """

    exitcode: int | None
    stdout: str
    stderr: str
    truncated: bool = False


@attrs.frozen
class Question:
    """One read-only command to run in the guest and how its answer is read.

    :ivar argv: the command line: ``guest-exec``'s ``path`` is ``argv[0]``, ``arg`` the rest.
    :ivar parse: the answer's findings; raises :class:`Unreadable` when it cannot tell.
    """

    argv: tuple[str, ...] = attrs.field()
    parse: Callable[[Answer], tuple[Finding, ...]] = attrs.field(eq=False)

    @argv.validator
    def _check_argv(self, _attribute: object, value: tuple[str, ...]) -> None:
        if (
            not isinstance(value, tuple)
            or not value
            or not all(isinstance(part, str) and part for part in value)
        ):
            raise ValueError(f"a question's argv is a tuple of non-empty strings: {value!r}")

    @property
    def source(self) -> str:
        """The command line as one string, shell-quoted for display (``Finding.source``)."""
        return source_of(self.argv)


def source_of(argv: tuple[str, ...]) -> str:
    """*argv* as one shell-quoted string, for display only (it is never run through a shell)."""
    return shlex.join(argv)


def one_line(text: str, cap: int = DETAIL_CAP) -> str:
    """*text* as one human line: control and format characters out, whitespace folded, capped.

    Guest text may hold terminal escapes, NULs, bidi overrides or a megabyte on
    one line; none of it reaches a record or a terminal as is.
    """
    kept = "".join(
        " " if unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp") else char for char in text
    )
    folded = " ".join(kept.split())
    return folded if len(folded) <= cap else folded[: cap - 1].rstrip() + "…"


def first_line(text: str) -> str:
    """The first non-blank line of *text*, as :func:`one_line` (for an error message)."""
    line = next((line for line in text.splitlines() if line.strip()), "")
    return one_line(line, FIELD_CAP) or "nothing on stderr"


def check_ran(answer: Answer, tool: str) -> None:
    """Raise :class:`Unreadable` unless *tool* ran and exited 0.

    A tool that is not there (exit 127, or any failure: its stderr is quoted,
    e.g. "No such file or directory") is a failed question, never "nothing
    found": the guest did not say there is no inhibitor, it said nothing.
    """
    if answer.exitcode is None:
        raise Unreadable(f"{tool} ended without an exit status (killed by a signal?)")
    if answer.exitcode == NOT_FOUND_STATUS:
        raise Unreadable(f"{tool} is not there in the guest: {first_line(answer.stderr)}")
    if answer.exitcode != 0:
        raise Unreadable(f"{tool} failed with exit status {answer.exitcode}: "
                         f"{first_line(answer.stderr)}")  # fmt: skip


def check_whole(answer: Answer, tool: str) -> None:
    """Raise :class:`Unreadable` when the output was cut at :data:`OUTPUT_CAP`."""
    if answer.truncated:
        raise Unreadable(f"{tool}'s output was cut at {OUTPUT_CAP // 1024} KiB before its end")
