"""The ``qmpshutdown`` command run against real test guests (parsing: tests/test_cli.py).

Real runs start the command as a subprocess (``python -m qmpshutdown``), so they
check what a shell sees: the exit status, stdout and stderr.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys

import anyio
import pytest
from test_cli import qmpshutdown

from qmpshutdown import ShutdownResult
from support.policies import CLI_FAST, CLI_MIXED, CLI_PRESSED
from support.records import as_pressed_line, as_pressed_record

#: The keys of ShutdownResult.to_dict(), in its order.
RESULT_KEYS = list(
    ShutdownResult(
        stage=None, graceful=False, reason=None, presses=0, runstate=None, cause=None,
        pid=None, elapsed=0.0, events=(), steps=(),
    ).to_dict()
)  # fmt: skip


FAST, PRESSED = CLI_FAST, CLI_PRESSED


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def progress(err: str, target: object, what: str) -> list[str]:
    """The progress lines for *target* saying *what*, e.g. ``T  +1.00s  sent quit``."""
    pattern = rf"{re.escape(str(target))}  \+\d+\.\d\ds  {re.escape(what)}"
    return [line for line in err.splitlines() if re.fullmatch(pattern, line)]


@pytest.mark.asyncio
async def test_cooperative_guest_is_exit_0_and_a_missing_neighbour_makes_it_2(guests, tmp_path):
    alone, beside = await guests.boot_many("cooperative", "cooperative")
    # One press by construction (--no-repress): a loaded host can keep a cooperative guest
    # past --repress 1.
    run = await qmpshutdown(*PRESSED, alone.qmp_path)
    assert run.status == 0, run.err
    assert run.out == ""
    assert len(progress(run.err, alone.qmp_path, "pressed the power button")) == 1
    assert as_pressed_line(run.err.splitlines()[-1], run.err, alone.qmp_path).startswith(
        f"{alone.qmp_path}  powerdown graceful reason=guest-shutdown presses=1 "
    )
    assert await alone.wait_exit(5) == 0

    missing = tmp_path / "missing.sock"
    run = await qmpshutdown(*PRESSED, beside.qmp_path, missing)
    assert run.status == 2, run.err
    summary, error = run.err.splitlines()[-2:]
    summary = as_pressed_line(summary, run.err, beside.qmp_path)
    assert summary.startswith(f"{beside.qmp_path}  powerdown graceful "), run.err
    assert error == f"error: {missing}: No such file or directory"
    assert await beside.wait_exit(5) == 0


@pytest.mark.asyncio
async def test_ignoring_guest_is_forced_exit_1_with_progress_on_stderr(guests):
    guest = await guests.boot("ignores")
    run = await qmpshutdown(*FAST, guest.qmp_path)
    print(run.err)
    assert run.status == 1, run.err
    assert run.out == ""
    lines = run.err.splitlines()
    first = progress(run.err, guest.qmp_path, "pressed the power button")
    again = progress(run.err, guest.qmp_path, "pressed the power button again (press 2)")
    quit_ = progress(run.err, guest.qmp_path, "sent quit")
    assert len(first) == len(again) == len(quit_) == 1, run.err
    assert lines.index(first[0]) < lines.index(again[0]) < lines.index(quit_[0])
    assert lines[-1].startswith(f"{guest.qmp_path}  quit forced reason=host-qmp-quit presses=")
    assert lines[-1].endswith(" cause=ignored-power-button")
    assert "Traceback" not in run.err and "qemu.qmp" not in run.err
    assert await guest.wait_exit(5) == 0


@pytest.mark.asyncio
async def test_several_targets_print_json_in_the_order_given_and_the_worst_wins(guests):
    cooperative, ignoring = await guests.boot_many("cooperative", "ignores")
    # The ignoring guest goes first, though the cooperative one finishes first.
    run = await qmpshutdown(
        "--json", *CLI_MIXED, ignoring.qmp_path, cooperative.qmp_path, timeout=90
    )
    assert run.status == 1, run.err
    assert run.err == ""
    forced, graceful = run.records()
    graceful = as_pressed_record(graceful)
    assert list(forced) == list(graceful) == ["target", *RESULT_KEYS]
    assert (forced["target"], graceful["target"]) == (
        str(ignoring.qmp_path),
        str(cooperative.qmp_path),
    )
    assert (forced["stage"], forced["graceful"], forced["reason"], forced["cause"]) == (
        "quit", False, "host-qmp-quit", "ignored-power-button"
    )  # fmt: skip
    assert (forced["pid"], forced["presses"]) == (ignoring.pid, 2)
    # The CLI's default ladder: no --agent, so the agent rung is skipped (recorded).
    assert [(s["stage"], s["outcome"]) for s in forced["steps"]] == [
        ("powerdown", "timeout"), ("agent", "skipped"), ("quit", "done")
    ]  # fmt: skip
    assert (forced["guest_os"], forced["guest_users"]) == (None, None)
    assert (graceful["stage"], graceful["graceful"], graceful["reason"]) == (
        "powerdown", True, "guest-shutdown"
    )  # fmt: skip
    assert graceful["presses"] >= 1  # 2 if a loaded host kept it past the re-press (seen)
    assert await ignoring.wait_exit(5) == 0
    assert await cooperative.wait_exit(5) == 0


@pytest.mark.asyncio
async def test_host_port_reaches_a_tcp_monitor(guests):
    port = free_port()
    guest = await guests.boot(
        "cooperative", extra_args=["-qmp", f"tcp:127.0.0.1:{port},server=on,wait=off"]
    )
    run = await qmpshutdown("--json", *PRESSED, f"127.0.0.1:{port}")
    assert run.status == 0, run.err
    [record] = run.records()
    assert (record["target"], record["stage"], record["graceful"]) == (
        f"127.0.0.1:{port}", "powerdown", True
    )  # fmt: skip
    assert record["pid"] is None  # over TCP without --pid, QEMU's pid is unknown
    assert await guest.wait_exit(5) == 0


@pytest.mark.asyncio
async def test_guest_left_running_is_exit_3_wrong_pid_2_and_ctrl_c_130(guests, tmp_path):
    guest = await guests.boot("ignores")
    sock, missing = guest.qmp_path, tmp_path / "missing.sock"

    run = await qmpshutdown(*FAST, "--pid", os.getpid(), sock)
    assert run.status == 2, run.err
    assert len(run.err.splitlines()) == 1
    assert run.err.startswith(f"error: {sock}: pid {os.getpid()} given, but the socket's peer")
    assert guest.alive()

    run = await qmpshutdown("--json", *FAST, "--no-force", "--timeout", "1", sock)
    assert run.status == 3, run.err
    [record] = run.records()
    assert list(record) == ["target", "error", *RESULT_KEYS]
    assert (record["target"], record["stage"], record["graceful"], record["cause"]) == (
        str(sock), None, False, "ignored-power-button"
    )  # fmt: skip
    assert "still running" in str(record["error"])
    assert [(s["stage"], s["outcome"]) for s in record["steps"]] == [("powerdown", "timeout")]
    assert guest.alive()

    run = await qmpshutdown(*FAST, "--no-force", "--timeout", "1", missing, sock)
    assert run.status == 3, run.err  # 3 (still running) wins over 2 (unreachable)
    assert f"error: {missing}: No such file or directory" in run.err.splitlines()
    lines = run.err.splitlines()
    assert any(line.startswith(f"{sock}  still running failed ") for line in lines)
    assert any(line.startswith(f"error: {sock}: QEMU is still running") for line in lines)
    assert guest.alive()

    # Ctrl-C in the middle of the wait for the power-off: the command cleans up and exits 130.
    argv = [sys.executable, "-m", "qmpshutdown", "--timeout", "30", "--no-force", str(sock)]
    async with await anyio.open_process(argv, stdin=subprocess.DEVNULL) as proc:
        assert proc.stderr is not None
        err = b""
        with anyio.fail_after(15):
            while b"pressed the power button" not in err:
                err += await proc.stderr.receive()
            proc.send_signal(signal.SIGINT)
            async for chunk in proc.stderr:
                err += chunk
            assert await proc.wait() == 130
    assert err.decode().splitlines()[-1] == "interrupted"
    assert "Traceback" not in err.decode()
    assert guest.alive()


@pytest.mark.asyncio
async def test_evidence_dir_gives_the_screenshot_on_the_progress_line_and_in_json(guests, tmp_path):
    plain, as_json = await guests.boot_many(
        {"mode": "ignores", "display": True}, {"mode": "ignores", "display": True}
    )
    run = await qmpshutdown(*FAST, "--evidence-dir", tmp_path, plain.qmp_path)
    assert run.status == 1, run.err
    pattern = rf"{re.escape(str(plain.qmp_path))}  \+\d+\.\d\ds  screenshot done: saved (.+)"
    (saved,) = [m[1] for m in map(re.compile(pattern).fullmatch, run.err.splitlines()) if m]
    assert os.path.dirname(saved) == str(tmp_path) and os.path.getsize(saved) > 0
    run = await qmpshutdown("--json", *FAST, "--evidence-dir", tmp_path, as_json.qmp_path)
    assert run.status == 1, run.err
    (record,) = run.records()
    assert record["screenshot"] is not None and record["screenshot"] != saved
    assert os.path.dirname(record["screenshot"]) == str(tmp_path)
    assert [s["stage"] for s in record["steps"]] == ["powerdown", "agent", "screenshot", "quit"]
    assert record["steps"][2]["path"] == record["screenshot"]


@pytest.mark.asyncio
async def test_agent_reaches_the_agent_rung_and_stops_a_guest_that_ignores_the_button(guests):
    # Before 0.2 the CLI built its jobs without --agent: the rung was skipped, the guest forced.
    guest = await guests.boot("ignores", agent=True)
    run = await qmpshutdown("--json", *FAST, "--agent", guest.agent_path, guest.qmp_path)
    assert run.status == 0, run.err
    (record,) = run.records()
    assert (record["stage"], record["graceful"], record["reason"], record["cause"]) == (
        "agent", True, "guest-shutdown", "ignored-power-button"
    )  # fmt: skip
    assert [(s["stage"], s["outcome"]) for s in record["steps"]] == [
        ("powerdown", "timeout"), ("diagnose", "failed"), ("agent", "done")
    ]  # fmt: skip  (asked why first: this busybox guest has no busctl)
    assert record["diagnosis"] == []
    assert record["guest_users"] == []  # the agent answered: nobody is logged in
    assert await guest.wait_exit(5) == 0
