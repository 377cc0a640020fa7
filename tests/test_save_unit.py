"""The save rung's pure parts: the state file's name, saved_state, and its skips."""

from __future__ import annotations

import re

from qmpshutdown import Stage
from qmpshutdown._save import SUFFIX, saved_state, state_file_name


def test_state_file_name_is_safe_and_unique_for_any_target() -> None:
    names = {state_file_name('/run/it\'s "a" vm; rm -rf /$(x)/qmp.sock') for _ in range(50)}
    assert len(names) == 50
    for name in names:
        assert re.fullmatch(r"[A-Za-z0-9._-]+", name), name
        assert "/" not in name and name.endswith(SUFFIX)
    assert state_file_name("...").startswith("qemu-")
    assert len(state_file_name("x" * 1000)) <= 100  # well under NAME_MAX (255)


def test_saved_state_only_when_the_save_rung_ended_the_vm() -> None:
    assert saved_state(Stage.SAVE, "/s/f.qemu-state") == "/s/f.qemu-state"
    assert saved_state(Stage.QUIT, "/s/f.qemu-state") is None
    assert saved_state(Stage.SAVE, None) is None
    assert saved_state(None, "/s/f") is None
