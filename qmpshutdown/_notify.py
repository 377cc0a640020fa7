"""systemd's notify protocol: ``STATUS=`` as VMs go, ``EXTEND_TIMEOUT_USEC=`` while one works.

Under systemd (``NOTIFY_SOCKET`` set, e.g. by a unit with ``NotifyAccess=all``)
the command sends one datagram per update to that socket (``@name`` is the
abstract namespace). A :class:`Notifier` is an ``on_progress`` callable: it
reads the ladders' updates, nothing else. A guest's reading that says it is
still working (a ``sample`` update with ``busy``, from the patience sampler)
asks systemd for :attr:`Notifier.extend_by` more seconds; an idle guest asks
for nothing, so the unit's own stop timeout holds for it. A failing socket is
logged once and never breaks a stop.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

from ._policy import ShutdownPolicy
from ._progress import Progress, ProgressKind

logger = logging.getLogger(__name__)

#: Seconds each extension keeps beyond the guest's idle cut-off and three readings:
#: room for the forced rungs once the guest stopped working.
EXTEND_MARGIN = 10.0
#: The longest one datagram may wait for room in the socket's queue, in seconds.
SEND_TIMEOUT = 0.2


def extension_for(policy: ShutdownPolicy) -> float:
    """Seconds one busy reading asks for: to the next readings, the idle cut-off, the rest."""
    return policy.idle_cutoff + 3 * policy.sample_interval + EXTEND_MARGIN


class Notifier:
    """Tells systemd how a stop goes (an ``on_progress`` callable).

    :param address: the notify socket's path, or ``@name`` (abstract namespace).
    :param total: how many VMs are being stopped (for ``STATUS=``).
    :param extend_by: seconds each ``EXTEND_TIMEOUT_USEC=`` asks for.
    """

    def __init__(self, address: str, *, total: int, extend_by: float) -> None:
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self.total = total
        self.extend_by = extend_by
        self.gone: set[str] = set()
        self.failed = False
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        # Blocking as sd_notify() is, but bounded: a stop never waits long on systemd.
        self.sock.settimeout(SEND_TIMEOUT)

    @classmethod
    def from_environment(
        cls, total: int, extend_by: float, environ: Mapping[str, str] = os.environ
    ) -> Notifier | None:
        """A notifier when ``NOTIFY_SOCKET`` is set (a path or ``@name``), else None."""
        address = environ.get("NOTIFY_SOCKET", "")
        if not address.startswith(("/", "@")):
            return None
        return cls(address, total=total, extend_by=extend_by)

    def send(self, **fields: str) -> None:
        """Send ``KEY=value`` lines in one datagram (``STATUS``, ``EXTEND_TIMEOUT_USEC``...)."""
        text = "".join(f"{key}={value}\n" for key, value in fields.items())
        try:
            self.sock.sendto(text.encode(), self.address)
        except OSError as err:
            if not self.failed:
                logger.warning("cannot notify systemd at %r: %s", self.address, err)
            self.failed = True

    def status(self, text: str) -> None:
        """``STATUS=`` (one line: systemd shows it in ``systemctl status``)."""
        self.send(STATUS=text.replace("\n", " "))

    def __call__(self, update: Progress) -> None:
        """Take one progress update of any VM."""
        if update.kind is ProgressKind.GONE:
            self.gone.add(update.target)
            self.status(f"{update.target} is off ({self._count()})")
        elif update.kind is ProgressKind.SAMPLE and update.busy:
            self.send(
                STATUS=f"{update.target} is still working ({self._count()})",
                EXTEND_TIMEOUT_USEC=str(int(self.extend_by * 1_000_000)),
            )
        elif update.kind is ProgressKind.END and update.step is not None:
            self.status(f"{update.target}: {update.message} ({self._count()})")

    def _count(self) -> str:
        return f"{len(self.gone)} of {self.total} off"

    def close(self) -> None:
        """Close the socket."""
        self.sock.close()
