"""A hostile world on a real QEMU: a listener that lies about it.

The case is in ``CASES`` of tests/test_bad_input.py, with the other hostile cases.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest
from test_bad_input import _state, must_raise, parametrize, signal_rungs

from qmpshutdown import PidMismatchError, ShutdownFailed
from qmpshutdown._process import executable, is_qemu_executable, peer_pid
from support.guests import Guest, guest_argv, qmp_connect, qmp_disconnect
from support.robustness import Case

pytestmark = pytest.mark.asyncio


LIAR_SCRIPT = Path(__file__).parent.parent / "support" / "liar.py"


def start_liar(argv: list[str], workdir: Path) -> subprocess.Popen[bytes]:
    with open(workdir / "qemu.stderr", "wb") as stderr:
        # A new session: a ^C in the terminal reaches pytest, not the QEMU.
        return subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
            cwd=workdir, start_new_session=True,
        )  # fmt: skip


@contextlib.asynccontextmanager
async def lying_listener(mode: str, scratch: Path) -> AsyncIterator[tuple[str, Guest]]:
    """support/liar.py exec'ing a real fixture QEMU: (the liar's socket, that QEMU as a Guest).

    The QEMU has its own monitor at another path; it is killed and reaped on leaving.
    """
    victim_dir = scratch / "victim"
    victim_dir.mkdir()
    path, pid_file = str(scratch / "liar.sock"), scratch / "child.pid"
    argv = guest_argv("ignores", workdir=victim_dir)
    liar_argv = [sys.executable, str(LIAR_SCRIPT), mode, path, str(pid_file), "--", *argv]
    popen = start_liar(liar_argv, victim_dir)
    victim = Guest(
        mode="ignores",
        pid=popen.pid,
        qmp_path=victim_dir / "qmp.sock",
        serial_log=victim_dir / "serial.log",
        workdir=victim_dir,
        popen=popen,
        argv=liar_argv,
    )
    try:
        await victim.wait_for_serial("QMPSHUTDOWN-GUEST-READY", 60)
        with anyio.fail_after(10):
            while not pid_file.exists():
                await anyio.sleep(0.02)
        yield path, victim
    finally:
        if popen.poll() is None:
            popen.kill()  # the liar's child exits on its own once orphaned
        with contextlib.suppress(subprocess.TimeoutExpired):
            popen.wait(timeout=10)


@pytest.mark.qemu
@parametrize("liar")
async def test_qemu_named_by_a_lying_listener_is_never_signalled(
    case: Case, tmp_path: Path
) -> None:
    params = case.params
    async with lying_listener(params["mode"], tmp_path) as (path, victim):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.connect(path)
            # The setup lies as meant: the kernel names the QEMU as the socket's peer.
            assert peer_pid(probe) == victim.pid
            assert is_qemu_executable(executable(victim.pid) or "")
        started = time.monotonic()
        with pytest.raises(case.expect, match=params["match"]) as caught:
            await must_raise(path)
        elapsed = time.monotonic() - started
        # The pid given explicitly (e.g. read from a pidfile the liar wrote): refused too.
        with pytest.raises(PidMismatchError, match="does not hold this monitor connection"):
            await must_raise(path, victim.pid)
        await anyio.sleep(0.5)  # QEMU exits a few ms after SIGTERM: give it the chance
        assert victim.alive(), f"the QEMU that never held the socket was hit\n{victim.describe()}"
        assert _state(victim.pid) not in ("T", "t"), "the QEMU was stopped"
        assert victim.qmp_path is not None
        client = await qmp_connect(victim.qmp_path)
        try:
            with anyio.fail_after(5):
                status = await client.execute("query-status")
        finally:
            await qmp_disconnect(client)
        assert status["status"] == "running", status
    assert elapsed <= case.limit
    if case.expect is ShutdownFailed:
        result = caught.value.result
        assert result.pid is None and result.stage is None
        outcomes = [(s.stage.value, s.outcome.value) for s in result.steps]
        assert outcomes == [
            ("powerdown", "timeout"),
            ("quit", "timeout"),
            ("terminate", "skipped"),
            ("kill", "skipped"),
        ], outcomes
        for step in signal_rungs(result):
            assert "does not hold the monitor socket" in step.detail
