"""The questions the diagnose step asks a guest that did not go, and how their answers are read.

Pure: no I/O, no anyio; it builds on the values (:mod:`.._finding`) only. The
diagnose step picks the set with :func:`questions_for` (the agent's
``guest-get-osinfo`` ``id``), runs each :class:`Question`'s :attr:`~Question.argv`
through ``guest-exec`` (output capped at :data:`OUTPUT_CAP` a stream), hands the
:class:`Answer` to its :attr:`~Question.parse`, records an :class:`Unreadable`
as a failed question with its reason, and passes all findings through
:func:`merge` once (the power key's two answers become one finding there).

One file per OS: :mod:`.linux` (systemd) and :mod:`.windows`; the shared
types and the text rules are in :mod:`.asked`.
"""

from __future__ import annotations

from .asked import OUTPUT_CAP, Answer, Question, Unreadable, one_line
from .linux import INHIBITORS, PowerKeySetting, merge
from .linux import QUESTIONS as LINUX_QUESTIONS
from .windows import QUESTIONS as WINDOWS_QUESTIONS

__all__ = (
    "LINUX_QUESTIONS", "OUTPUT_CAP", "WINDOWS_QUESTIONS", "Answer", "PowerKeySetting",
    "Question", "Unreadable", "inhibitor_question", "merge", "one_line", "questions_for",
)  # fmt: skip

#: ``guest-get-osinfo``'s ``id`` on Windows (qemu-ga's ``qga/commands-win32.c``).
WINDOWS_ID = "mswindows"


def questions_for(os_id: str | None) -> tuple[Question, ...]:
    """The questions for a guest whose agent said ``id`` *os_id*: Windows', else Linux'.

    :param os_id: ``guest-get-osinfo``'s ``id`` (``mswindows``, ``debian`` …), or None.
    :return: the questions, in the order to ask them.
    """
    return WINDOWS_QUESTIONS if os_id == WINDOWS_ID else LINUX_QUESTIONS


def inhibitor_question(os_id: str | None) -> Question | None:
    """The one question that tells whether a block inhibitor is held (Linux), else None.

    Adaptive patience asks it while the power button's wait goes on; Windows has no
    inhibitor an agent can read (an application blocking shutdown answers only its own
    window's thread).
    """
    return None if os_id == WINDOWS_ID else INHIBITORS
