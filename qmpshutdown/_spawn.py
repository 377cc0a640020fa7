"""QEMU's command line for ``launch()``, and starting it so that it dies with its launcher.

``launch()`` adds two QMP monitors on unix sockets in a private dir (one for
the caller, one kept free for the ladder), and on request the serial console's
log file and the guest agent's port and socket.
"""

from __future__ import annotations

import ctypes
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path

from ._errors import LaunchError

_PR_SET_PDEATHSIG = 1
#: The sockets in the private dir: one for the caller's client, one kept free for the ladder.
CALLER_SOCKET, LADDER_SOCKET = "qmp.sock", "ladder.sock"
#: The serial console's log in the private dir (``console_log=True``).
CONSOLE_LOG = "console.log"
#: The guest agent's chardev socket in the private dir (``launch(agent=True)``).
AGENT_SOCKET = "qga.sock"
#: The virtio-serial port name qemu-ga looks for.
AGENT_PORT_NAME = "org.qemu.guest_agent.0"


# Resolved once here: the child between fork and exec must not run ldconfig
# (ctypes.util.find_library does) nor take locks another thread may hold.
_LIBC = ctypes.CDLL(None, use_errno=True)


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Have the kernel SIGKILL QEMU if the process that launched it dies first."""
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def spawn(argv: list[str], stderr_path: Path, name: str) -> subprocess.Popen[bytes]:
    """Start QEMU (subprocess, not anyio.open_process: prctl needs a preexec_fn)."""
    with open(stderr_path, "wb") as stderr:
        try:
            return subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                preexec_fn=_die_with_parent,
            )
        except OSError as err:
            raise LaunchError(f"{name}: cannot start {argv[0]}: {err}") from err


def given_serial(argv: Sequence[str]) -> str | None:
    """The value of the first ``-serial`` option in *argv* (``-serial X`` or ``-serial=X``)."""
    for index, arg in enumerate(argv):
        for option in ("-serial", "--serial"):
            if arg == option and index + 1 < len(argv):
                return argv[index + 1]
            if arg.startswith(option + "="):
                return arg.partition("=")[2]
    return None


def console_log_path(argv: Sequence[str], rundir: Path) -> tuple[Path, bool]:
    """Where ``console_log=True`` finds the serial console, and whether launch adds the port.

    Without a ``-serial`` in *argv*, launch adds ``-serial file:RUNDIR/console.log``
    (the first serial port, ttyS0). When the caller's first ``-serial`` already
    is ``file:PATH``, that file is the log (nothing is added: a second port
    would be ttyS1, where the guest's console is not).

    :raises ValueError: the first ``-serial`` is something else (stdio, a chardev, …).
    """
    given = given_serial(argv)
    if given is None:
        return rundir / CONSOLE_LOG, True
    if given.startswith("file:") and len(given) > len("file:"):
        return Path(given[len("file:") :]), False
    raise ValueError(
        f"console_log=True captures the first serial port, but argv has -serial {given}: "
        "drop it (launch adds -serial file:...) or make it -serial file:PATH"
    )


def command_line(
    argv: Sequence[str], rundir: Path, *, console_log: bool = False, agent: bool = False
) -> list[str]:
    """QEMU's command line: the caller's, plus two QMP monitors on unix sockets in *rundir*.

    :param console_log: add the serial console's log file (see :func:`console_log_path`).
    :param agent: also a virtio-serial device, the guest agent's port and its
        chardev on a unix socket in *rundir*.
    """
    line = [*argv]
    if console_log and console_log_path(argv, rundir)[1]:
        line += ["-serial", f"file:{rundir / CONSOLE_LOG}"]
    if agent:
        line += [
            "-chardev", f"socket,id=qmpshutdown-agent,path={rundir / AGENT_SOCKET},"
            "server=on,wait=off",
            "-device", "virtio-serial-pci,id=qmpshutdown-vser",
            "-device", "virtserialport,bus=qmpshutdown-vser.0,chardev=qmpshutdown-agent,"
            f"name={AGENT_PORT_NAME}",
        ]  # fmt: skip
    for monitor_id, path in (("qmpshutdown-caller", rundir / CALLER_SOCKET),
                             ("qmpshutdown-ladder", rundir / LADDER_SOCKET)):  # fmt: skip
        line += [
            "-chardev", f"socket,id={monitor_id},path={path},server=on,wait=off",
            "-mon", f"chardev={monitor_id},mode=control",
        ]  # fmt: skip
    return line
