"""The command's host-wide modes: ``--list``, ``--all`` (what ``discover()`` finds), ``--restore``.

``--all`` stops what it finds through the command's usual fleet path; this
module turns what was found into jobs, the QEMUs left alone into "unreachable"
outcomes (exit 2, untouched), and, after a ``--save-dir`` run, leaves a
manifest beside each saved state for ``--restore``.
"""

from __future__ import annotations

import argparse
import enum
import sys
from collections.abc import Sequence
from json import dumps

import anyio
import attrs

from ._cli_output import EXIT_OK, EXIT_UNREACHED
from ._discover import Found, scan
from ._errors import ConnectError, Error, ShutdownFailed
from ._job import Job
from ._result import ShutdownResult
from ._revive import RESTORED, Restored, restore_dir, write_manifest

HOST_EPILOG = """\
this host's QEMUs (no TARGETs):
  --list           what runs here: pid, name, QMP monitor, agent, and for each
                   QEMU left alone, why (no QMP monitor; managed by libvirt or
                   Proxmox, known by where its monitor lives). Stops nothing.
  --all            stop every QEMU found, as one fleet, with the usual options;
                   those left alone are reported unreachable (exit 2), untouched
  --match GLOB     (repeatable) only QEMUs whose -name or any socket path on
                   their command line matches
  --restore DIR    start again, detached, each VM that --all --save-dir DIR
                   saved, from its state; a restored VM's manifest is retired
                   (renamed *.restored) so a second --restore starts nothing
  Under systemd (NOTIFY_SOCKET set): STATUS= as VMs go, and EXTEND_TIMEOUT_USEC=
  only while a guest is still working (see contrib/systemd/).
"""


class HostAction(str, enum.Enum):
    """Which host-wide mode the command runs in."""

    LIST = "list"
    ALL = "all"
    RESTORE = "restore"


@attrs.frozen
class HostRequest:
    """``--list`` / ``--all`` / ``--restore`` as given."""

    action: HostAction
    match: tuple[str, ...] = ()
    restore_dir: str | None = None


def add_host_options(parser: argparse.ArgumentParser) -> None:
    """Add ``--list``, ``--all``, ``--match`` and ``--restore`` to *parser*."""
    host = parser.add_argument_group("this host's QEMUs (instead of TARGETs)")
    modes = host.add_mutually_exclusive_group()
    modes.add_argument("--list", action="store_true", help="list the QEMUs running here")
    modes.add_argument("--all", action="store_true", help="stop every QEMU running here")
    modes.add_argument("--restore", metavar="DIR", help="start the VMs saved in DIR again")
    matches = "with --list/--all: only QEMUs whose name or a socket path matches"
    host.add_argument("--match", metavar="GLOB", action="append", default=[], help=matches)


def host_request(parser: argparse.ArgumentParser, args: argparse.Namespace) -> HostRequest | None:
    """The host-wide mode asked for, checked against the other options (None: none)."""
    action = next((a for a in HostAction if getattr(args, a.value)), None)
    if action is None:
        if args.match:
            parser.error("--match goes with --list or --all")
        return None
    option = "--restore" if action is HostAction.RESTORE else f"--{action.value}"
    if [t for t in args.targets if t != "\0then"] or "\0then" in args.targets:
        parser.error(f"{option} finds the VMs itself: no TARGETs (or --then)")
    for clash in ("fleet", "pid", "agent"):
        if getattr(args, clash) is not None:
            parser.error(f"--{clash} cannot be used with {option}")
    if action is HostAction.RESTORE and args.match:
        parser.error("--match goes with --list or --all")
    if any(not glob for glob in args.match):
        parser.error("--match: a glob must not be empty")
    return HostRequest(action, tuple(args.match), args.restore)


# ---- --list ----------------------------------------------------------------------------


def list_vms(request: HostRequest, *, json: bool) -> int:
    """Print what runs here, the QEMUs left alone with why; exit 0 (it stops nothing)."""
    found = scan(request.match or None)
    for vm in found:
        if json:
            print(dumps(vm.to_dict()), flush=True)
        elif vm.why is None:
            agent = f"  agent={vm.agent}" if vm.agent else ""
            print(f"{vm.pid}  {vm.name}  {vm.monitor}{agent}")
        else:
            print(f"{vm.pid}  {vm.name}  left alone: {vm.why}")
    if not found and not json:
        print("no QEMU found" + (" that matches" if request.match else ""), file=sys.stderr)
    return EXIT_OK


# ---- --all -----------------------------------------------------------------------------


@attrs.frozen
class HostFleet:
    """What ``--all`` found: the jobs to stop, and every QEMU in order (left-alone ones too)."""

    found: tuple[Found, ...]

    @property
    def stoppable(self) -> tuple[Found, ...]:
        return tuple(vm for vm in self.found if vm.why is None)

    @property
    def jobs(self) -> tuple[Job, ...]:
        """One job per QEMU to stop (pid, agent and name from its command line)."""
        return tuple(vm.job() for vm in self.stoppable)

    def outcomes(
        self, stopped: Sequence[ShutdownResult | Error]
    ) -> tuple[list[Found], list[ShutdownResult | Error]]:
        """Every QEMU found with its outcome: the stopped ones, then those left alone."""
        left = [vm for vm in self.found if vm.why is not None]
        errors: list[ShutdownResult | Error] = [
            ConnectError(f"{vm.name}: left alone (pid {vm.pid}): {vm.why}") for vm in left
        ]
        return [*self.stoppable, *left], [*stopped, *errors]

    def keep_manifests(self, stopped: Sequence[ShutdownResult | Error]) -> list[str]:
        """Write a manifest beside each state file the save rung wrote; return their paths."""
        written = []
        for vm, outcome in zip(self.stoppable, stopped, strict=True):
            result = outcome.result if isinstance(outcome, ShutdownFailed) else outcome
            if isinstance(result, ShutdownResult) and result.saved_state is not None:
                try:
                    written.append(write_manifest(vm, result.saved_state))
                except OSError as err:
                    print(f"error: {vm.name}: cannot write the manifest beside "
                          f"{result.saved_state}: {err}", file=sys.stderr)  # fmt: skip
        return written


def find_fleet(request: HostRequest) -> HostFleet:
    """The QEMUs ``--all`` is about (matched by ``--match``)."""
    fleet = HostFleet(scan(request.match or None))
    if not fleet.found:
        print("no QEMU found" + (" that matches" if request.match else ""), file=sys.stderr)
    return fleet


# ---- --restore -------------------------------------------------------------------------


def restore_vms(request: HostRequest, *, json: bool) -> int:
    """Start each VM saved in the directory again; exit 0 when all run, else 2."""
    assert request.restore_dir is not None
    rows = anyio.run(restore_dir, request.restore_dir, backend="asyncio")
    for row in rows:
        if json:
            print(dumps(row.to_dict()), flush=True)
        else:
            print(_restored_line(row), file=sys.stderr)
    if not rows and not json:
        print(f"nothing to restore in {request.restore_dir}", file=sys.stderr)
    return EXIT_OK if all(row.outcome == RESTORED for row in rows) else EXIT_UNREACHED


def _restored_line(row: Restored) -> str:
    if row.outcome == RESTORED:
        return f"{row.name}  restored: pid {row.pid} runs from {row.state}"
    return f"error: {row.name}: {row.outcome}: {row.error}"
