"""launch()'s evidence: a screenshot and the console's last lines when the teardown forces."""

from __future__ import annotations

from pathlib import Path

import pytest

import qmpshutdown
from qmpshutdown._spawn import console_log_path, given_serial


def test_console_log_takes_the_first_serial_port_or_the_callers_file(tmp_path):
    assert console_log_path(["qemu"], tmp_path) == (tmp_path / "console.log", True)
    given = ["qemu", "-serial", "file:/x/serial.log", "-serial", "stdio"]
    assert console_log_path(given, tmp_path) == (Path("/x/serial.log"), False)
    assert given_serial(["qemu", "-serial=pty"]) == "pty"
    with pytest.raises(ValueError, match="argv has -serial stdio"):
        qmpshutdown.launch(["qemu", "-serial", "stdio"], console_log=True)
    with pytest.raises(TypeError):
        qmpshutdown.launch(["qemu"], console_log="yes")  # type: ignore[arg-type]
