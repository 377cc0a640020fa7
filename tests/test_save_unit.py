"""The save rung's pure parts: the state file's name, saved_state, and its skips."""

from __future__ import annotations

import re

from qmpshutdown import Stage, Step
from qmpshutdown._rungs.save import SUFFIX, state_file_name
from qmpshutdown._verdict import saved_state


def test_state_file_name_is_safe_and_unique_for_any_target() -> None:
    names = {state_file_name('/run/it\'s "a" vm; rm -rf /$(x)/qmp.sock') for _ in range(50)}
    assert len(names) == 50
    for name in names:
        assert re.fullmatch(r"[A-Za-z0-9._-]+", name), name
        assert "/" not in name and name.endswith(SUFFIX)
    assert state_file_name("...").startswith("qemu-")
    assert len(state_file_name("x" * 1000)) <= 100  # well under NAME_MAX (255)


def test_saved_state_only_when_the_save_rung_ended_the_vm() -> None:
    # The state file is the save step's path (derived from the steps, as the screenshot is).
    saved = (Step(Stage.SAVE, "done", 1.0, 2.0, "saved", path="/s/f.qemu-state"),)
    unsaved = (Step(Stage.SAVE, "failed", 1.0, 2.0, "no room"),)
    assert saved_state(Stage.SAVE, saved) == "/s/f.qemu-state"
    assert saved_state(Stage.QUIT, saved) is None
    assert saved_state(Stage.SAVE, unsaved) is None
    assert saved_state(None, saved) is None
