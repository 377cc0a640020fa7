"""Restore: start a guest again from the state file the ``save`` rung wrote.

``launch(argv, restore=PATH)`` starts QEMU with the caller's command line plus
``-incoming defer``; this module opens the file, hands it to QEMU as a
descriptor over the ladder's monitor (SCM_RIGHTS, ``getfd``: no path on a
command line, no shell) and runs ``migrate-incoming`` with ``fd:NAME``,
waiting for the MIGRATION event that says it completed. QEMU then runs the
guest from where it stopped. The monitor is closed again afterwards, so the
ladder finds it free for the teardown.
"""

from __future__ import annotations

import logging
import os

from ._connect import open_client
from ._errors import CommandError, LaunchError, MonitorClosedError
from ._fdpass import FdPassingUnsupported, pass_fd
from ._monitor import QMPMonitor, client_socket

logger = logging.getLogger("qmpshutdown")

#: The option that makes QEMU wait for its state (restore by hand: ``-incoming 'exec:cat FILE'``).
INCOMING_ARGS = ("-incoming", "defer")


def open_state(path: str | os.PathLike[str], name: str) -> int:
    """Open the state file for reading; LaunchError when it cannot be."""
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as err:
        path = os.fspath(path)
        raise LaunchError(f"{name}: cannot open the saved state {path!r}: {err}") from err


async def load_state(socket_path: str, fd: int, limit: float, name: str) -> str:
    """Have the QEMU behind *socket_path* (started with ``-incoming defer``) load *fd*.

    Unbounded here: ``launch()`` bounds it by its ``startup_timeout`` and
    races it against QEMU's exit (QEMU exits when the state does not load).

    :raises LaunchError: QEMU refused the state, or the load failed.
    :return: the runstate once loaded (``running``).
    """
    client = await open_client(socket_path, limit, f"{name}-restore")
    monitor = QMPMonitor(client, client_socket(client), owned=True)
    fdname = f"qmpshutdown-restore-{os.urandom(4).hex()}"
    try:
        capability = {"capability": "events", "state": True}
        await monitor.execute("migrate-set-capabilities", {"capabilities": [capability]})
        await pass_fd(monitor, fd, fdname)
        await monitor.execute("migrate-incoming", {"uri": f"fd:{fdname}"})
        while True:
            event = await monitor.next_event()
            status = event.data.get("status") if event.event == "MIGRATION" else None
            if status == "completed":
                break
            if status in ("failed", "cancelled"):
                raise LaunchError(f"{name}: the saved state did not load (migration {status})")
        reply = await monitor.execute("query-status")
        runstate = str(reply.get("status")) if isinstance(reply, dict) else "unknown"
        logger.info("%s: restored from its saved state (runstate %s)", name, runstate)
        return runstate
    except (CommandError, MonitorClosedError, FdPassingUnsupported) as err:
        raise LaunchError(f"{name}: the saved state did not load: {err}") from err
    finally:
        await monitor.close()
