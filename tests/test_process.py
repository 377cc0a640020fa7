"""The process seam: a pidfd pins the process, signals go through it, its exit is a readable fd."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import anyio
import pytest

from qmpshutdown import PidMismatchError, Process
from qmpshutdown._process import PidfdProcess, executable, is_qemu_executable, peer_pid


@pytest.fixture
def child():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def pinned(proc: subprocess.Popen[bytes]) -> PidfdProcess:
    return PidfdProcess(proc.pid, os.pidfd_open(proc.pid))


def test_a_pidfd_process_is_a_process(child) -> None:
    process = pinned(child)
    try:
        assert isinstance(process, Process)
        assert process.pid == child.pid and not process.has_exited()
    finally:
        process.close()
        process.close()  # idempotent


@pytest.mark.asyncio
async def test_signals_go_through_the_pidfd_and_the_exit_wakes_the_waiter(child) -> None:
    process = pinned(child)
    try:
        process.send_signal(signal.SIGSTOP)
        with anyio.fail_after(5):
            while not process.is_stopped():
                await anyio.sleep(0.01)
        process.send_signal(signal.SIGCONT)
        process.send_signal(signal.SIGTERM)
        with anyio.fail_after(5):
            await process.wait_exited()
        assert process.has_exited() and not process.is_stopped()
        process.send_signal(signal.SIGTERM)  # exited already: not an error
        assert child.wait(timeout=5) == -signal.SIGTERM
        process.send_signal(signal.SIGKILL)  # reaped too: still not an error
    finally:
        process.close()


def test_open_qemu_refuses_what_is_not_qemu(child) -> None:
    with pytest.raises(PidMismatchError, match="not QEMU"):
        PidfdProcess.open_qemu(child.pid)
    with pytest.raises(PidMismatchError, match="this very process"):
        PidfdProcess.open_qemu(os.getpid())
    child.kill()
    child.wait(timeout=10)
    with pytest.raises(PidMismatchError, match="no process"):
        PidfdProcess.open_qemu(child.pid)
    assert child.poll() is not None


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/usr/bin/qemu-system-x86_64", True),
        ("/opt/qemu-10/bin/qemu-system-aarch64", True),
        ("/usr/libexec/qemu-kvm", True),
        ("/usr/bin/python3", False),
        ("/usr/bin/qemu-img", False),
    ],
)
def test_is_qemu_executable(path: str, expected: bool) -> None:
    assert is_qemu_executable(path) is expected


def test_peer_pid_of_a_socketpair_is_our_own_and_tcp_has_none() -> None:
    left, right = socket.socketpair()
    with left, right:
        assert peer_pid(left) == os.getpid()
    with socket.socket() as tcp:
        assert peer_pid(tcp) is None
    assert executable(os.getpid()) == os.path.realpath(sys.executable)
