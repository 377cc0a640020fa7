"""_exitwake: which QEMU a SIGTERM may wake from a stalled exit; its command line's action.

The wait itself runs in the ladder's tests (tests/test_ladder.py, "stalled exit").
"""

from __future__ import annotations

import attrs
import pytest

from qmpshutdown import ShutdownPolicy
from qmpshutdown._exitwake import waker
from qmpshutdown._qemuargs import shutdown_action
from support.fakes import FakeProcess


@pytest.mark.parametrize(
    ("args", "action"),
    [
        ((), "poweroff"),
        (("-no-shutdown",), "pause"),
        (("--no-shutdown",), "pause"),
        (("-action", "shutdown=pause"), "pause"),
        (("-action", "reboot=shutdown,shutdown=pause"), "pause"),
        (("-no-shutdown", "-action", "shutdown=poweroff"), "poweroff"),  # the later wins
        (("-action", "reboot=shutdown"), "poweroff"),
        (("-name", "-no-shutdown-vm", "-action"), "poweroff"),
    ],
)
def test_shutdown_action_from_the_command_line(args: tuple[str, ...], action: str) -> None:
    assert shutdown_action(("qemu-system-x86_64", *args)) == action


class _NoCommandLine:
    """A caller's own process seam, without the optional ``command_line()``."""

    pid = 4242


def test_waker_only_where_sigterm_can_end_nothing_more() -> None:
    policy = ShutdownPolicy()
    plain = FakeProcess()
    assert waker(policy, plain, True) is plain
    assert waker(policy, plain, False) is None  # stopped
    assert waker(policy, None, True) is None
    assert waker(attrs.evolve(policy, stages=("powerdown", "quit", "kill")), plain, True) is None
    assert waker(policy, FakeProcess(argv=("qemu", "-no-shutdown")), True) is None
    assert waker(policy, FakeProcess(argv=None), True) is None  # unreadable
    assert waker(policy, _NoCommandLine(), True) is None  # type: ignore[arg-type]
