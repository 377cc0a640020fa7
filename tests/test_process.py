"""The process seam: a pidfd pins the process, signals go through it, its exit is a readable fd;
and the socket-holder check (``holds_socket``) on real sockets and processes."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from qmpshutdown import PidMismatchError, Process
from qmpshutdown._process import (
    PidfdProcess,
    executable,
    holds_socket,
    is_qemu_executable,
    peer_pid,
)


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


LIAR_SCRIPT = Path(__file__).parent / "support" / "liar.py"


@contextlib.contextmanager
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A live process that holds no socket of ours; killed and reaped on leaving."""
    popen = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        yield popen
    finally:
        popen.kill()
        popen.wait(timeout=10)


@contextlib.contextmanager
def lying_sleep(mode: str, scratch: Path) -> Iterator[tuple[int, int, str]]:
    """support/liar.py with ``sleep`` as the program: (its pid, the child's pid, socket path)."""
    path, pid_file = str(scratch / "liar.sock"), scratch / "child.pid"
    argv = [sys.executable, str(LIAR_SCRIPT), mode, path, str(pid_file), "--", "sleep", "60"]
    popen = subprocess.Popen(argv, start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while not (pid_file.exists() and (executable(popen.pid) or "").endswith("/sleep")):
            assert popen.poll() is None and time.monotonic() < deadline, "liar.py did not start"
            time.sleep(0.02)
        yield popen.pid, int(pid_file.read_text()), path
    finally:
        popen.kill()  # its child exits on its own once orphaned
        popen.wait(timeout=10)


def connected(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    return sock


def test_socketpair_is_held_by_this_process() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        assert holds_socket(os.getpid(), ours) is True
        with sleeper() as other:
            assert holds_socket(other.pid, ours) is False


def test_listener_before_and_after_accept(tmp_path: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(tmp_path / "s.sock"))
        server.listen(4)
        with connected(str(tmp_path / "s.sock")) as client, sleeper() as other:
            # Not accepted yet: the listener is what serves it.
            assert holds_socket(os.getpid(), client) is True
            assert holds_socket(other.pid, client) is False
            conn, _ = server.accept()
            with conn:
                assert holds_socket(os.getpid(), client) is True
                assert holds_socket(other.pid, client) is False


def test_stale_socket_at_the_same_path_does_not_count(tmp_path: Path) -> None:
    """An unlinked listener once bound at the path is not the one we reach."""
    path = str(tmp_path / "s.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
        stale.bind(path)
        stale.listen(4)
        os.unlink(path)
        with lying_sleep("backlog", tmp_path) as (_liar, _child, liar_path):
            os.rename(liar_path, path)
            with connected(path) as client:
                # This process holds a listener once bound at the path, not this one.
                assert holds_socket(os.getpid(), client) is False


@pytest.mark.parametrize("mode", ["backlog", "silent"])
def test_pid_from_so_peercred_that_does_not_hold_the_socket(mode: str, tmp_path: Path) -> None:
    with lying_sleep(mode, tmp_path) as (liar, child, path), connected(path) as client:
        assert peer_pid(client) == liar  # the kernel names the exec'd program...
        assert holds_socket(liar, client) is False  # ...which does not hold the socket
        assert holds_socket(child, client) is True
        if mode == "silent":  # accepted now, surely: the child's accepted socket is ours
            time.sleep(0.2)
            assert holds_socket(child, client) is True


def test_cannot_tell(tmp_path: Path) -> None:
    server = socket.create_server(("127.0.0.1", 0))
    with server, socket.create_connection(server.getsockname()) as tcp:
        assert holds_socket(os.getpid(), tcp) is None  # not a unix socket
    ours, theirs = socket.socketpair()
    with ours, theirs, sleeper() as gone:
        gone.kill()
        gone.wait(timeout=10)
        assert holds_socket(gone.pid, ours) is None  # no /proc/PID/fd to read
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(tmp_path / "s.sock"))
        server.listen(4)
        client = connected(str(tmp_path / "s.sock"))
    with client:  # the listener closed before accepting: nobody serves it
        assert holds_socket(os.getpid(), client) is None
