"""The systemd notify protocol over a real datagram socket."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from qmpshutdown import Progress, ProgressKind
from qmpshutdown._notify import Notifier, extension_for
from qmpshutdown._policy import DEFAULT_POLICY


def update(kind: ProgressKind, target: str = "vm1", busy: bool | None = None) -> Progress:
    return Progress(target=target, elapsed=1.0, stage=None, message="m", kind=kind, busy=busy)


def test_busy_readings_extend_idle_ones_do_not(tmp_path: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(tmp_path / "notify"))
        notifier = Notifier.from_environment(2, 7.5, {"NOTIFY_SOCKET": str(tmp_path / "notify")})
        assert notifier is not None
        notifier(update(ProgressKind.SAMPLE, busy=False))
        notifier(update(ProgressKind.SAMPLE, "vm2", busy=True))
        notifier(update(ProgressKind.GONE, "vm2"))
        notifier.close()
        listener.settimeout(1)
        assert listener.recv(4096) == (
            b"STATUS=vm2 is still working (0 of 2 off)\nEXTEND_TIMEOUT_USEC=7500000\n"
        )
        assert listener.recv(4096) == b"STATUS=vm2 is off (1 of 2 off)\n"


def test_abstract_namespace_and_no_socket() -> None:
    name = f"qmpshutdown-test-{os.urandom(4).hex()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind("\0" + name)
        notifier = Notifier.from_environment(1, 1.0, {"NOTIFY_SOCKET": "@" + name})
        assert notifier is not None
        notifier.status("stopping 1 VMs")
        notifier.close()
        listener.settimeout(1)
        assert listener.recv(4096) == b"STATUS=stopping 1 VMs\n"
    assert Notifier.from_environment(1, 1.0, {}) is None
    assert Notifier.from_environment(1, 1.0, {"NOTIFY_SOCKET": "relative"}) is None


def test_a_missing_socket_never_breaks_a_stop(tmp_path: Path) -> None:
    notifier = Notifier(str(tmp_path / "gone"), total=1, extend_by=1.0)
    notifier.status("x")
    notifier.status("y")
    assert notifier.failed
    notifier.close()


def test_extension_covers_the_idle_cutoff_and_three_readings() -> None:
    policy = DEFAULT_POLICY
    assert extension_for(policy) == policy.idle_cutoff + 3 * policy.sample_interval + 10.0
