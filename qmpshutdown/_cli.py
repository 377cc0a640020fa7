"""The ``qmpshutdown`` command: stop QEMU VMs from a shell, and say how it went."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Sequence
from typing import Any, NoReturn

import anyio
import attrs

from ._cli_output import (
    EPILOG,
    EXIT_INTERRUPTED,
    EXIT_RUNNING,
    EXIT_UNREACHED,
    exit_status,
    logging_to_stderr,
    print_progress,
    report,
)
from ._errors import Error
from ._fleet import check_deadline, shutdown_many
from ._fleetfile import FleetFileError, load_fleet
from ._host import (
    HOST_EPILOG,
    HostAction,
    HostRequest,
    add_host_options,
    find_fleet,
    host_request,
    list_vms,
    restore_vms,
)
from ._job import Job
from ._notify import Notifier, extension_for
from ._policy import DEFAULT_POLICY, PATIENCES, ShutdownPolicy, with_save_rung
from ._progress import Progress
from ._result import ShutdownResult
from ._version import __version__

_DEFAULT = DEFAULT_POLICY

#: (option, the ShutdownPolicy field it sets, help); the policy validates every value.
_SECONDS_OPTIONS = (
    ("--timeout", "powerdown_timeout", "seconds the guest gets to power off after the first press"),
    ("--repress", "repress_interval", "press again every S seconds while waiting"),
    ("--quit-timeout", "quit_timeout", "seconds QEMU gets to exit after 'quit'"),
    ("--term-timeout", "terminate_timeout", "seconds after SIGTERM before SIGKILL"),
    ("--kill-timeout", "kill_timeout", "seconds to wait for the exit after SIGKILL"),
    ("--connect-timeout", "connect_timeout", "seconds for connect, greeting and capabilities"),
    ("--command-timeout", "command_timeout", "seconds for any single QMP command"),
    ("--stages", "stages", "comma-separated rungs allowed"),
    ("--agent-timeout", "agent_timeout", "seconds the guest gets to power off after the agent"),
    ("--diagnose-timeout", "diagnose_timeout", "the longest asking the guest why may take"),
)
#: (option, field, the value it sets, help), each exclusive with the option of its field.
_FLAG_OPTIONS = (
    ("--no-repress", "repress_interval", None, "press the power button once only"),
    ("--no-force", "stages", ("powerdown",), "same as --stages powerdown"),
    ("--no-wake", "wake_suspended", False, "do not wake an S3-suspended guest to press"),
    ("--resume-paused", "resume_paused", True, "resume a paused guest to press its button"),
    ("--no-freeze", "freeze_before_force", False, "do not freeze the guest before force"),
    ("--no-diagnose", "diagnose", False, "do not ask the guest (through --agent) why it stays"),
)
#: Patience that reads the guest: (option, field, type, help); the cap before the patience,
#: so that ``--timeout 900 --max-timeout 1200 --patience adaptive`` validates in order.
_PATIENCE_OPTIONS = (
    ("--max-timeout", "max_powerdown_timeout", float,
     "adaptive: the cap on waiting for the guest, from the first press"),
    ("--idle-cutoff", "idle_cutoff", float,
     "adaptive: escalate once the guest has been idle this long after a press"),
    ("--patience", "patience", str,
     "fixed: wait --timeout; adaptive: read the guest's CPU and disk, wait on while it works "
     "(up to --max-timeout), escalate once it is idle for --idle-cutoff"),
)  # fmt: skip


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """Exit 2 with one line (argparse's usage block is many lines)."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


@attrs.frozen
class Invocation:
    """What the command line asks for, parsed and validated.

    :ivar targets: the targets as given.
    :ivar addresses: each target as :func:`~qmpshutdown.shutdown` takes it.
    """

    targets: tuple[str, ...]
    addresses: tuple[str | tuple[str, int], ...]
    policy: ShutdownPolicy
    pid: int | None
    json: bool
    agent: str | None = attrs.field(default=None, kw_only=True)  #: the guest agent's socket
    verbosity: int  #: -1 with -q, 1 with -v, else 0
    #: one per target, with its group (``--then``) or its fleet file entry
    jobs: tuple[Job, ...] = ()
    deadline: float | None = None
    save_dir: str | None = None  #: --save-dir: where the save rung keeps the state
    evidence_dir: str | None = None  #: where to save a forced guest's screen (--evidence-dir)
    host: HostRequest | None = None  #: --list, --all or --restore (then no TARGETs)
    names: tuple[str, ...] = ()  #: --all: each VM's name, as progress lines say it


def _positive_pid(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"a pid is a positive integer, not {text!r}")
    return int(text)


def _deadline(text: str) -> float:
    try:
        seconds = check_deadline(float(text))
    except ValueError:
        seconds = None
    if seconds is None:
        raise argparse.ArgumentTypeError(f"a deadline is a number of seconds > 0, not {text!r}")
    return seconds


#: What ``--then`` becomes before parsing, so that it keeps its place among the targets.
_THEN = "\0then"


def _rungs(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(","))


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of ``qmpshutdown``'s command line."""
    parser = _Parser(
        prog="qmpshutdown",
        description="Stop QEMU VMs over QMP: the ACPI power button first, then quit,\n"
        "SIGTERM and SIGKILL only as needed. QEMU is really gone when this returns.",
        epilog=EPILOG + "\n" + HOST_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("targets", nargs="*", metavar="TARGET", help="PATH, HOST:PORT, [ADDR]:PORT")
    # Policy options are absent from the namespace unless given: the policy keeps its defaults.
    policy = parser.add_argument_group("policy (defaults in parentheses)")
    flags = {field: (option, value, text) for option, field, value, text in _FLAG_OPTIONS}
    for option, field, text in _SECONDS_OPTIONS:
        default = getattr(_DEFAULT, field)
        kind, shown = (_rungs, ",".join(default)) if field == "stages" else (float, f"{default:g}")
        group = policy.add_mutually_exclusive_group() if field in flags else policy
        metavar = "LIST" if field == "stages" else "S"
        group.add_argument(option, dest=field, type=kind, metavar=metavar,
                           default=argparse.SUPPRESS, help=f"{text} ({shown})")  # fmt: skip
        if field in flags:
            flag, value, text = flags.pop(field)
            group.add_argument(flag, dest=field, action="store_const", const=value,
                               default=argparse.SUPPRESS, help=text)  # fmt: skip
    for field, (flag, value, text) in flags.items():
        policy.add_argument(flag, dest=field, action="store_const", const=value,
                            default=argparse.SUPPRESS, help=text)  # fmt: skip
    for option, field, kind_, text in _PATIENCE_OPTIONS:
        default = getattr(_DEFAULT, field)
        shown = default if isinstance(default, str) else f"{default:g}"
        extra: dict[str, Any] = {"choices": PATIENCES} if field == "patience" else {}
        metavar_ = "S" if kind_ is float else None
        policy.add_argument(option, dest=field, type=kind_, metavar=metavar_, **extra,
                            default=argparse.SUPPRESS, help=f"{text} ({shown})")  # fmt: skip
    saving = parser.add_argument_group("saving")
    saving.add_argument(
        "--save-dir",
        metavar="DIR",
        help="keep a guest that will not go in a state file in DIR before quit "
        "(adds the save rung unless --stages is given)",
    )
    parser.add_argument("--pid", type=_positive_pid, help="QEMU's pid (one target only)")
    fleet = parser.add_argument_group("fleets")
    fleet.add_argument("--deadline", type=_deadline, metavar="S",
                       help="every VM done (gracefully or forced) within S seconds")  # fmt: skip
    then = "between targets: those after it start once those before are done"
    fleet.add_argument("--then", action="store_true", default=argparse.SUPPRESS, help=then)
    vms = "the VMs (target, name, pid, group, policy) from a JSON file"
    fleet.add_argument("--fleet", metavar="FILE", help=vms)
    parser.add_argument("--agent", metavar="PATH",
                        help="the guest agent's chardev socket (one target only)")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="one JSON object per target on stdout")
    parser.add_argument(
        "--evidence-dir", metavar="DIR",
        help="save a PNG of each guest's screen here when it must be forced (QEMU writes it)",
    )  # fmt: skip
    chatter = parser.add_mutually_exclusive_group()
    chatter.add_argument("-q", "--quiet", action="store_true", help="no progress, only errors")
    chatter.add_argument("-v", "--verbose", action="store_true", help="debug logging, qemu.qmp too")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    add_host_options(parser)
    return parser


def parse_target(text: str) -> str | tuple[str, int]:
    """Turn a TARGET as typed into a unix socket path or a ``(host, port)`` tuple.

    :raises ValueError: an empty target, a bad port, or an IPv6 address without brackets.
    """
    if not text:
        raise ValueError("a target must not be empty")
    if "/" in text or os.path.exists(text):
        return text
    host, colon, port = text.rpartition(":")
    if not colon or not (port.isascii() and port.isdigit()):
        return text  # a socket path in the current directory
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"write an IPv6 address in brackets: [ADDR]:PORT, not {text!r}")
    if not host:
        raise ValueError(f"no host in {text!r}")
    if not 0 < int(port) < 65536:
        raise ValueError(f"port {port} of {text!r} is out of range")
    return host, int(port)


def parse_command_line(argv: Sequence[str] | None = None) -> Invocation:
    """Parse *argv* (default ``sys.argv[1:]``); exit 2 with one line on bad usage."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_intermixed_args([_THEN if arg == "--then" else arg for arg in argv])
    given = vars(args)
    policy = _DEFAULT
    # A flag's constant is always valid: an error names the option that takes a value.
    named = {f: o for o, f, _, _ in _FLAG_OPTIONS} | {f: o for o, f, _ in _SECONDS_OPTIONS}
    named |= {f: o for o, f, _, _ in _PATIENCE_OPTIONS}
    for field, option in named.items():
        if field in given:  # one at a time, so that an error names its option
            try:
                policy = attrs.evolve(policy, **{field: given[field]})
            except ValueError as err:
                parser.error(f"{option}: {err}")
    if args.save_dir is not None:
        if not os.path.isdir(args.save_dir):
            parser.error(f"--save-dir: {args.save_dir!r} is not a directory")
        if "stages" not in given:
            policy = with_save_rung(policy)
    given_targets = [t for t in args.targets if t != _THEN]
    if args.agent is not None and len(given_targets) > 1:
        parser.error(f"--agent names one guest, but {len(given_targets)} targets were given")
    if args.agent == "":
        parser.error("--agent: a socket path must not be empty")
    host = host_request(parser, args)
    if host is not None:
        return Invocation(
            targets=(), addresses=(), policy=policy, pid=None, json=args.json, host=host,
            verbosity=-1 if args.quiet else 1 if args.verbose else 0, deadline=args.deadline,
            save_dir=args.save_dir, evidence_dir=args.evidence_dir,
        )  # fmt: skip
    if args.fleet is not None:
        return _fleet_invocation(parser, args, policy)
    targets = [target for target in args.targets if target != _THEN]
    if not targets:
        parser.error("the following arguments are required: TARGET (or --fleet FILE)")
    if args.pid is not None and len(targets) > 1:
        parser.error(f"--pid names one QEMU, but {len(targets)} targets were given")
    groups = " ".join("|" if t == _THEN else "t" for t in args.targets).split("|")
    if any(not group.strip() for group in groups):
        parser.error("--then goes between targets: a group of targets on each side")
    addresses, jobs, group = [], [], 0
    for target in args.targets:
        if target == _THEN:
            group += 1
            continue
        try:
            addresses.append(parse_target(target))
        except ValueError as err:
            parser.error(str(err))
        jobs.append(Job(addresses[-1], pid=args.pid, group=group, agent=args.agent,
                        save_dir=args.save_dir, evidence_dir=args.evidence_dir))  # fmt: skip
    return Invocation(
        targets=tuple(targets),
        addresses=tuple(addresses),
        policy=policy,
        pid=args.pid,
        json=args.json,
        verbosity=-1 if args.quiet else 1 if args.verbose else 0,
        jobs=tuple(jobs),
        deadline=args.deadline,
        save_dir=args.save_dir,
        evidence_dir=args.evidence_dir,
        agent=args.agent,
    )


def _fleet_invocation(
    parser: argparse.ArgumentParser, args: argparse.Namespace, policy: ShutdownPolicy
) -> Invocation:
    if args.targets:
        what = "--then" if _THEN in args.targets else "TARGETs"
        parser.error(f"--fleet FILE names the VMs: {what} cannot be given too")
    if args.pid is not None:
        parser.error("--pid cannot be used with --fleet: give each VM its pid in the file")
    try:
        entries = load_fleet(args.fleet, policy, parse_target)
    except FleetFileError as err:
        parser.error(str(err))
    return Invocation(
        targets=tuple(label for label, _ in entries),
        addresses=tuple(job.target for _, job in entries),  # type: ignore[misc]
        policy=policy,
        pid=None,
        json=args.json,
        verbosity=-1 if args.quiet else 1 if args.verbose else 0,
        jobs=tuple(job for _, job in entries),
        save_dir=args.save_dir,
        deadline=args.deadline,
        evidence_dir=args.evidence_dir,
    )


async def _stop_all(invocation: Invocation) -> list[ShutdownResult | Error]:
    # With -v the log says it all; with --json or -q nothing but errors goes to stderr.
    quiet = invocation.json or invocation.verbosity != 0
    extend_by = extension_for(invocation.policy)
    notifier = Notifier.from_environment(len(invocation.jobs), extend_by)
    shown = None if quiet else print_progress

    def on_progress(update: Progress) -> None:
        if shown is not None:
            shown(update)
        if notifier is not None:
            notifier(update)

    if notifier is not None:
        notifier.status(f"stopping {len(invocation.jobs)} VMs")
    try:
        return await shutdown_many(
            invocation.jobs, invocation.policy, on_progress=on_progress,
            deadline=invocation.deadline, save_dir=invocation.save_dir,
            evidence_dir=invocation.evidence_dir,
        )  # fmt: skip
    finally:
        if notifier is not None:
            notifier.status(f"done: {len(notifier.gone)} of {len(invocation.jobs)} VMs off")
            notifier.close()


def main(argv: list[str] | None = None) -> int:
    """Run ``qmpshutdown``: stop every target and return the exit status.

    :param argv: the arguments after the program name (default ``sys.argv[1:]``).
    :return: 0 all powered off gracefully, 1 some needed force, 2 bad usage or
        unreachable, 3 still running or unknown, 130 interrupted.
    """
    try:
        invocation = parse_command_line(argv)
    except SystemExit as exit:  # --help, --version, or a usage error already printed
        return exit.code if isinstance(exit.code, int) else EXIT_UNREACHED
    verbose = invocation.verbosity > 0
    host, fleet = invocation.host, None
    with logging_to_stderr(invocation.verbosity):
        if host is not None and host.action is HostAction.LIST:
            return list_vms(host, json=invocation.json)
        if host is not None and host.action is HostAction.RESTORE:
            return restore_vms(host, json=invocation.json)
        if host is not None:  # --all: the VMs found here, those left alone reported unreached
            fleet = find_fleet(host)
            invocation = attrs.evolve(invocation, jobs=fleet.jobs)
        try:
            outcomes = anyio.run(_stop_all, invocation, backend="asyncio")
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        except Exception as err:
            if verbose:
                traceback.print_exc()
            print(f"internal error: {type(err).__name__}: {err}", file=sys.stderr)
            return EXIT_RUNNING
        targets, names = invocation.targets, None
        if fleet is not None:
            fleet.keep_manifests(outcomes)
            found, outcomes = fleet.outcomes(outcomes)
            targets, names = tuple(vm.monitor or "" for vm in found), [vm.name for vm in found]
        report(targets, outcomes, json=invocation.json, verbosity=invocation.verbosity, names=names)
    return max((exit_status(outcome) for outcome in outcomes), default=0)
