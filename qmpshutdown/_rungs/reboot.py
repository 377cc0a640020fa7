"""A reboot is not a refusal: while the power button is pressed, a guest's reboot ends QEMU.

A guest that reboots instead of powering off went through its whole orderly
shutdown; under QEMU's default (``reboot=reset``) it would boot again and the
ladder would force the new boot. So before the first press the power button
sets QEMU's reboot action to ``shutdown`` (QMP ``set-action``, QEMU 6.0 and
later): the guest's reset then ends QEMU unforced, SHUTDOWN ``guest-reset``,
exactly as under ``-no-reboot``. On the library's own connection the command
goes out with the handshake (:meth:`RebootAsShutdown.first_command`), a round
trip fewer before the press; the power button then only reads its answer (a
ladder that never presses puts it back at its end, as below). QMP cannot read
the actions back, so what to put back comes from QEMU's command line
(``-no-reboot``, ``-action reboot=...``), read through the process seam;
:meth:`RebootAsShutdown.finish` puts it back whenever the ladder ends with QEMU
still running (the caller cancelled, no force allowed, a guest off under
``-no-shutdown``). A command line that already makes a reboot a shutdown costs
nothing: nothing is sent.

Left as it is, with a word in the power button's step: a QEMU older than 6.0
(``set-action`` is CommandNotFound), and a QEMU whose command line cannot be
read (no pid, a caller's own process seam without ``command_line()``): set
without knowing what to put back, a cancelled ladder could leave a QEMU that
reboots as one that shuts down, for good.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import anyio

from .._errors import CommandError, MonitorClosedError
from .._monitor import QMPMonitor
from .._process import command_line_of
from .._qemu import Qemu
from .._qemuargs import reboot_action

logger = logging.getLogger("qmpshutdown")

#: How the power button's step says that a reboot stays a reboot.
KEPT = "reboot action left as it is"
#: The command, and what it sets.
SET = "set-action"
ARGUMENTS = {"reboot": "shutdown"}


class RebootAsShutdown:
    """``set-action reboot=shutdown`` before the first press; put back at the ladder's end."""

    def first_command(self, argv: Sequence[str] | None) -> tuple[str, Mapping[str, str]] | None:
        """The ``set-action`` for the handshake to send, or None when nothing is to be sent
        (the command line unknown, or a reboot is a shutdown already)."""
        if argv is None or reboot_action(argv) == "shutdown":
            return None
        return SET, ARGUMENTS

    async def prepare(self, qemu: Qemu) -> str:
        """Make a reboot a shutdown (one ``set-action``, or nothing when it is one already).

        :return: a word for the step when the action is left as it is for a reason the
            record should show (an old QEMU, an unknown command line), else "".
        """
        argv = command_line_of(qemu.process)
        if argv is None:
            return f"{KEPT} (QEMU's command line is unknown)"
        was = reboot_action(argv)
        if was == "shutdown":
            return ""  # -no-reboot, or -action reboot=shutdown: nothing to send
        # Put back at the end even when unanswered (a timeout, a caller who cancelled now):
        # QEMU may still apply it.
        qemu.reboot_action = was
        try:
            sent = _sent_with_handshake(qemu)
            if sent is None:
                await qemu.command(SET, ARGUMENTS)
            elif isinstance(sent, Exception):
                raise sent
        except CommandError as err:
            qemu.reboot_action = None  # QEMU said no: nothing changed
            if err.error_class == "CommandNotFound":
                return f"{KEPT} (QEMU older than 6.0: no set-action)"
            return f"{KEPT} (set-action failed: {err.desc})"
        except MonitorClosedError as err:
            return f"{KEPT} (set-action failed: {err})"
        except TimeoutError:
            return "no reply to set-action: a reboot may stay a reboot"
        return ""

    async def finish(self, qemu: Qemu) -> None:
        """Put the command line's reboot action back when QEMU still runs (shielded, bounded)."""
        sent = _sent_with_handshake(qemu)  # and no press came to take its answer
        if sent is not None and not isinstance(sent, CommandError):  # (an error: not set)
            argv = command_line_of(qemu.process)
            qemu.reboot_action = None if argv is None else reboot_action(argv)
        was = qemu.reboot_action
        if was is None or qemu.monitor is None or qemu.monitor.is_closed():
            return
        if qemu.gone or qemu.watch.exit_begun or (
            qemu.process is not None and qemu.process.has_exited()
        ):
            return  # QEMU is gone or on its way: nothing to put back, no command into its exit
        qemu.reboot_action = None
        with anyio.CancelScope(shield=True):
            try:
                await qemu.command("set-action", {"reboot": was})  # bounded: command_timeout
            except (CommandError, MonitorClosedError, TimeoutError) as err:
                why = str(err) or "no reply"
                qemu.recorder.say(f"could not put the reboot action back (reboot={was}): {why}")
                return
        qemu.recorder.say(f"put the reboot action back (reboot={was})")


def _sent_with_handshake(qemu: Qemu) -> object:
    """The answer to the ``set-action`` the library's handshake sent (once), or None."""
    monitor = qemu.monitor
    return monitor.take_arrival(SET) if isinstance(monitor, QMPMonitor) else None


#: The one instance the power button and the ladder's end share (its state is on the Qemu).
REBOOT_AS_SHUTDOWN = RebootAsShutdown()
