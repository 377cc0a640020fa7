"""The ``qmpshutdown`` command: parsing (fast, no QEMU), then real runs against test guests.

Real runs start the command as a subprocess (``python -m qmpshutdown``), so they
check what a shell sees: the exit status, stdout and stderr.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import anyio
import attrs
import pytest

from qmpshutdown import Cause, ShutdownPolicy, Stage, __version__
from qmpshutdown._cli import main, parse_command_line, parse_target
from qmpshutdown._cli_output import _LineFormatter

# ---- parsing, no QEMU -------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("qmp.sock", "qmp.sock"),
        ("/run/vm1/qmp.sock", "/run/vm1/qmp.sock"),
        ("127.0.0.1:4444", ("127.0.0.1", 4444)),
        ("localhost:65535", ("localhost", 65535)),
        ("[::1]:4444", ("::1", 4444)),
        ("[fe80::1%eth0]:1", ("fe80::1%eth0", 1)),
        ("vms/web:4444", "vms/web:4444"),  # a "/" makes it a path, port or not
        ("/run/vm:1/qmp.sock", "/run/vm:1/qmp.sock"),
        ("host:qmp", "host:qmp"),  # not all digits: a path
        ("host:\uff14\uff14", "host:\uff14\uff14"),  # fullwidth digits are not a port
    ],
)
def test_parse_target(text: str, expected: object) -> None:
    assert parse_target(text) == expected


def test_an_existing_file_that_looks_like_host_port_is_a_path(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert parse_target("vm:4444") == ("vm", 4444)
    Path("vm:4444").touch()
    assert parse_target("vm:4444") == "vm:4444"


def test_defaults_are_the_policy_defaults() -> None:
    invocation = parse_command_line(["qmp.sock"])
    assert invocation.policy == ShutdownPolicy()
    assert (invocation.targets, invocation.addresses) == (("qmp.sock",), ("qmp.sock",))
    assert (invocation.pid, invocation.json, invocation.verbosity) == (None, False, 0)


def test_every_option_sets_its_policy_field() -> None:
    invocation = parse_command_line(
        ["--timeout", "7.5", "--repress", "2", "--quit-timeout", "3", "--term-timeout", "4",
         "--kill-timeout", "5", "--connect-timeout", "6", "--command-timeout", "0.5",
         "--stages", "powerdown, terminate,kill", "--no-wake", "--resume-paused",
         "--pid", "1234", "--json", "-v", "[::1]:4444"]
    )  # fmt: skip
    assert invocation.policy == ShutdownPolicy(
        powerdown_timeout=7.5, repress_interval=2.0, quit_timeout=3.0, terminate_timeout=4.0,
        kill_timeout=5.0, connect_timeout=6.0, command_timeout=0.5,
        stages=(Stage.POWERDOWN, Stage.TERMINATE, Stage.KILL),
        wake_suspended=False, resume_paused=True,
    )  # fmt: skip
    assert (invocation.pid, invocation.json, invocation.verbosity) == (1234, True, 1)
    assert invocation.addresses == (("::1", 4444),)


@pytest.mark.parametrize(
    ("argv", "changes"),
    [
        (["--no-repress"], {"repress_interval": None}),
        (["--no-force"], {"stages": (Stage.POWERDOWN,)}),
        (["--stages", "powerdown"], {"stages": (Stage.POWERDOWN,)}),
        (["--stages", "powerdown,quit"], {"stages": (Stage.POWERDOWN, Stage.QUIT)}),
        (["--no-wake"], {"wake_suspended": False}),
        (["--resume-paused"], {"resume_paused": True}),
        (["--timeout=1e-3"], {"powerdown_timeout": 0.001}),
        (["--no-diagnose"], {"diagnose": False}),
        (["--diagnose-timeout", "4"], {"diagnose_timeout": 4.0}),
    ],
)
def test_flags(argv: list[str], changes: dict[str, object]) -> None:
    assert parse_command_line([*argv, "a.sock"]).policy == attrs.evolve(ShutdownPolicy(), **changes)


def test_quiet() -> None:
    assert parse_command_line(["-q", "a", "b"]).verbosity == -1


@pytest.mark.parametrize(
    ("argv", "mentions"),
    [
        (["--timeout", "-1", "a"], "--timeout"),
        (["--timeout=nan", "a"], "--timeout"),
        (["--repress", "0", "a"], "--repress"),
        (["--kill-timeout", "inf", "a"], "--kill-timeout"),
        (["--term-timeout", "1e999", "a"], "--term-timeout"),
        (["--connect-timeout", "-0.5", "a"], "--connect-timeout"),
        (["--command-timeout", "nan", "a"], "--command-timeout"),
        (["--quit-timeout", "abc", "a"], "--quit-timeout"),
        (["--stages", "powerdown,reboot", "a"], "unknown stage 'reboot'"),
        (["--stages", "quit,powerdown", "a"], "ladder's order"),
        (["--stages", "", "a"], "--stages"),
        (["--stages", "quit", "--no-force", "a"], "not allowed with"),
        (["--repress", "1", "--no-repress", "a"], "not allowed with"),
        (["-q", "-v", "a"], "not allowed with"),
        (["--pid", "0", "a"], "--pid"),
        (["--pid", "-5", "a"], "--pid"),
        (["--pid", "x", "a"], "--pid"),
        (["--pid", "12", "a", "b"], "--pid"),
        (["--bogus", "a"], "--bogus"),
        ([], "TARGET"),
        ([""], "empty"),
        (["::1:4444"], "brackets"),
        ([":4444"], "no host"),
        (["[]:4444"], "no host"),
        (["host:0"], "out of range"),
        (["host:65536"], "out of range"),
    ],
)
def test_bad_usage_is_exit_2_with_one_line(capsys, argv: list[str], mentions: str) -> None:
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.splitlines()) == 1, err
    assert err.startswith("qmpshutdown: error: ")
    assert mentions in err
    assert "Traceback" not in err


def test_help_documents_exit_statuses_targets_and_causes(capsys) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    statuses = re.findall(r"^\s+(\d+)\s{2,}\S", out.split("exit status")[1], re.MULTILINE)
    assert statuses[:5] == ["0", "1", "2", "3", "130"]
    for word in ("HOST:PORT", "[ADDR]:PORT", "worst wins", *(c.value for c in Cause)):
        assert word in out
    options = (
        "--timeout", "--repress", "--no-repress", "--quit-timeout", "--term-timeout",
        "--kill-timeout", "--connect-timeout", "--command-timeout", "--stages",
        "--no-force", "--pid", "--no-wake", "--resume-paused", "--json", "-q", "-v",
    )  # fmt: skip
    for option in options:
        assert f"  {option}" in out


def test_python_dash_m_runs_the_command() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "qmpshutdown", "--help"], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0
    assert proc.stdout.startswith("usage: qmpshutdown ")


def test_version_prints_the_package_version(capsys) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"qmpshutdown {__version__}\n"


def test_python_dash_m_version_needs_no_target() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "qmpshutdown", "--version"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert (proc.returncode, proc.stdout, proc.stderr) == (
        0, f"qmpshutdown {__version__}\n", ""
    )  # fmt: skip


def test_progress_lines_drop_the_repeated_prefix_and_tracebacks() -> None:
    # Built the way the ladder logs a step.
    record = logging.LogRecord(
        "qmpshutdown", logging.INFO, __file__, 1, "%s: [%6.2fs] pressed again (press %d)",
        ("vm/qmp.sock", 1.0, 2), None,
    )  # fmt: skip
    record.qmpshutdown_target, record.qmpshutdown_elapsed = "vm/qmp.sock", 1.0
    assert (
        _LineFormatter(tracebacks=False).format(record)
        == "vm/qmp.sock  +1.00s  pressed again (press 2)"
    )
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        failure = logging.LogRecord(
            "qemu.qmp.protocol", logging.ERROR, __file__, 1, "Failed", (), sys.exc_info()
        )
    assert _LineFormatter(tracebacks=False).format(failure) == "error: qemu.qmp.protocol: Failed"
    assert "Traceback" in _LineFormatter(tracebacks=True).format(failure)


def test_in_process_run_leaves_logging_as_it_found_it(capsys, tmp_path) -> None:
    loggers = [logging.getLogger(name) for name in ("qmpshutdown", "qemu.qmp", "asyncio")]
    before = [(log.level, log.propagate, list(log.handlers)) for log in loggers]
    assert main(["--connect-timeout", "2", str(tmp_path / "missing.sock")]) == 2
    assert [(log.level, log.propagate, list(log.handlers)) for log in loggers] == before
    err = capsys.readouterr().err
    assert err.splitlines() == [f"error: {tmp_path / 'missing.sock'}: No such file or directory"]


def test_a_silent_monitor_is_exit_2_without_qemu_qmp_noise(tmp_path) -> None:
    path = tmp_path / "silent.sock"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
        server.listen()  # connections wait in the backlog: no greeting ever comes
        argv = [sys.executable, "-m", "qmpshutdown", "--connect-timeout", "0.5", str(path)]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        quiet = subprocess.run([*argv, "-q"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == quiet.returncode == 2
    assert "qemu.qmp" not in proc.stderr and "Traceback" not in proc.stderr
    error = (
        f"error: {path}: no QMP greeting within 0.5 s; the monitor's peer (pid {os.getpid()}) "
        f"is not QEMU but {os.path.realpath(sys.executable)}"
    )
    assert proc.stderr.splitlines()[-1] == error
    assert quiet.stderr.splitlines() == [error]


# ---- real runs against test guests ------------------------------------------


@attrs.frozen
class Run:
    status: int
    out: str
    err: str

    def records(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.out.splitlines()]


async def qmpshutdown(*args: object, timeout: float = 45.0) -> Run:
    """Run the command to its end (bounded; killed on timeout)."""
    argv = [sys.executable, "-m", "qmpshutdown", *map(str, args)]
    with anyio.fail_after(timeout):
        proc = await anyio.run_process(argv, check=False, stdin=subprocess.DEVNULL)
    return Run(proc.returncode, proc.stdout.decode(), _without_slow_callbacks(proc.stderr.decode()))


#: asyncio's debug mode (CI runs with PYTHONASYNCIODEBUG=1) reports a callback that ran
#: over 0.1 s: on a loaded 2-core host that is the load, not the command's output.
_SLOW_CALLBACK = re.compile(r"warning: asyncio: Executing <.*> took \d+\.\d+ seconds\n?")


def _without_slow_callbacks(err: str) -> str:
    return "".join(
        line for line in err.splitlines(keepends=True) if not _SLOW_CALLBACK.fullmatch(line)
    )


@pytest.mark.asyncio
async def test_missing_socket_is_exit_2_with_one_line(tmp_path):
    missing = tmp_path / "missing.sock"
    run = await qmpshutdown(missing)
    assert (run.status, run.out) == (2, "")
    assert run.err.splitlines() == [f"error: {missing}: No such file or directory"]
    run = await qmpshutdown("--json", missing)
    assert (run.status, run.err) == (2, "")
    assert run.records() == [
        {"target": str(missing), "error": f"{missing}: No such file or directory"}
    ]


def test_save_dir_adds_the_save_rung_before_quit_unless_stages_is_given(tmp_path: Path) -> None:
    invocation = parse_command_line(["--save-dir", str(tmp_path), "qmp.sock"])
    assert invocation.save_dir == str(tmp_path)
    assert [s.value for s in invocation.policy.stages] == [
        "powerdown", "agent", "save", "quit", "terminate", "kill"
    ]  # fmt: skip
    chosen = parse_command_line(["--save-dir", str(tmp_path), "--stages", "save,kill", "x.sock"])
    assert [s.value for s in chosen.policy.stages] == ["save", "kill"]
    kept = parse_command_line(["--save-dir", str(tmp_path), "--stages", "powerdown,quit", "x.sock"])
    assert [s.value for s in kept.policy.stages] == ["powerdown", "quit"]
    assert parse_command_line(["qmp.sock"]).save_dir is None


def test_save_dir_must_be_a_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        parse_command_line(["--save-dir", str(tmp_path / "nope"), "qmp.sock"])
    assert caught.value.code == 2
    assert "--save-dir" in capsys.readouterr().err
def test_evidence_dir_is_parsed():
    assert parse_command_line(["a.sock"]).evidence_dir is None
    assert parse_command_line(["--evidence-dir", "shots", "a.sock"]).evidence_dir == "shots"


def test_agent_options_reach_the_invocation_and_the_policy():
    invocation = parse_command_line(
        ["--agent", "/run/vm/qga.sock", "--no-freeze", "--agent-timeout", "7", "/run/vm/qmp.sock"]
    )
    assert invocation.agent == "/run/vm/qga.sock"
    assert invocation.policy.freeze_before_force is False
    assert invocation.policy.agent_timeout == 7.0
    assert parse_command_line(["/run/vm/qmp.sock"]).agent is None


def test_agent_names_one_target_only(capsys):
    with pytest.raises(SystemExit) as exit:
        parse_command_line(["--agent", "/a", "/one.sock", "/two.sock"])
    assert exit.value.code == 2
    assert "--agent names one guest, but 2 targets were given" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["--all", "x.sock"], "--all finds the VMs itself: no TARGETs (or --then)"),
        (["--list", "--pid", "4"], "--pid cannot be used with --list"),
        (["--all", "--agent", "a"], "--agent cannot be used with --all"),
        (["--restore", "d", "--match", "x"], "--match goes with --list or --all"),
        (["--match", "x", "a.sock"], "--match goes with --list or --all"),
        (["--list", "--all"], "argument --all: not allowed with argument --list"),
        (["--all", "--match", ""], "--match: a glob must not be empty"),
    ],
)
def test_host_modes_refuse_what_does_not_go_with_them(argv: list[str], error: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit:
        parse_command_line(argv)
    assert exit.value.code == 2
    assert capsys.readouterr().err == f"qmpshutdown: error: {error} (see --help)\n"


def test_all_takes_the_usual_options(tmp_path: Path) -> None:
    invocation = parse_command_line(["--all", "--match", "web*", "--match", "/run/vm/*",
                                     "--deadline", "60", "--save-dir", str(tmp_path)])  # fmt: skip
    assert invocation.host is not None
    assert (invocation.host.action.value, invocation.host.match) == ("all", ("web*", "/run/vm/*"))
    assert (invocation.deadline, invocation.save_dir, invocation.jobs) == (60, str(tmp_path), ())


def test_what_the_guest_said_is_a_line_per_finding(capsys) -> None:
    from qmpshutdown import Finding, ShutdownResult
    from qmpshutdown._cli_output import report

    said = Finding("inhibitor", "nightly-backup (pid 412, uid 0) blocks shutdown", "busctl ...")
    result = ShutdownResult(stage="quit", graceful=False, reason="host-qmp-quit", presses=2,
                            runstate="running", cause="inhibited", pid=None, elapsed=1.0,
                            events=(), steps=(), diagnosis=(said,))  # fmt: skip
    report(["vm.sock"], [result], json=False, verbosity=0)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("vm.sock  quit forced") and "cause=inhibited" in lines[0]
    said_line = "vm.sock  guest said: inhibitor: nightly-backup (pid 412, uid 0) blocks shutdown"
    assert lines[1] == said_line
    report(["vm.sock"], [result], json=True, verbosity=0)
    assert json.loads(capsys.readouterr().out)["diagnosis"] == [said.to_dict()]
