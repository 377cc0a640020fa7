"""contrib/systemd/qmpshutdown-guests.service: systemd accepts it, and so does the command."""

from __future__ import annotations

import configparser
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qmpshutdown._cli import parse_command_line

UNIT = Path(__file__).resolve().parent.parent / "contrib" / "systemd" / "qmpshutdown-guests.service"
INSTALLED = "/usr/local/bin/qmpshutdown"


def exec_stop() -> list[str]:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(UNIT)
    return shlex.split(unit["Service"]["ExecStop"])


def test_the_unit_stops_all_with_options_the_command_takes(tmp_path: Path) -> None:
    argv = exec_stop()
    assert argv[0] == INSTALLED
    assert "/var/lib/qmpshutdown" in argv  # its StateDirectory=, made by systemd
    here = [str(tmp_path) if arg == "/var/lib/qmpshutdown" else arg for arg in argv[1:]]
    invocation = parse_command_line(here)
    assert invocation.host is not None and invocation.host.action.value == "all"
    # No fleet deadline: it would cut a working guest off; the stop timeout is stretched
    # (EXTEND_TIMEOUT_USEC=) while one works instead.
    assert invocation.deadline is None and invocation.policy.patience == "adaptive"
    assert invocation.policy.max_powerdown_timeout == 600
    text = UNIT.read_text()
    assert "NotifyAccess=all" in text and "After=local-fs.target remote-fs.target" in text


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_systemd_analyze_verify_passes(tmp_path: Path) -> None:
    # The command where this checkout's venv has it (verify checks that it exists).
    command = str(Path(sys.executable).with_name("qmpshutdown"))
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace(INSTALLED, command))
    run = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                         text=True, timeout=60, check=False)  # fmt: skip
    assert (run.returncode, run.stderr) == (0, ""), run.stderr
