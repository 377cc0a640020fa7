"""Every QEMU on this host, found from its own command line: ``discover()``.

Each process whose executable is a QEMU system emulator is read from
``/proc/PID/cmdline`` (relative paths against ``/proc/PID/cwd``) and its QMP
monitor found among the ways QEMU is given one:

- ``-qmp`` with ``unix:PATH,server=on,...`` or ``tcp:HOST:PORT,server=on,...``;
- ``-chardev socket,id=ID,path=PATH|host=H,port=P,server=on`` with
  ``-mon chardev=ID,mode=control``.

``-monitor`` and a ``-mon`` without ``mode=control`` are human monitors (HMP),
not QMP. ``-qmp-pretty`` (and ``pretty=on``) is found but left alone: its
replies span lines, and qemu.qmp reads one message per line. The guest agent
is the unix socket chardev that backs a ``virtserialport`` named
``org.qemu.guest_agent.0``. A QEMU whose monitor lives where a manager keeps
its own (libvirt, Proxmox) is left alone, with why.

Knowingly not covered: monitors given by descriptor (``fd=``, ``-add-fd``) or
in a ``-readconfig`` file, abstract unix sockets, and QEMUs in another mount
namespace (a container or chroot: their paths are not ours); each is reported
with why.
"""

from __future__ import annotations

import fnmatch
import logging
import os
from collections.abc import Iterable, Sequence
from typing import Any

import attrs

from ._job import Job
from ._process import is_qemu_executable
from ._qemuargs import Address, Chardev, format_address, parse_command_line

logger = logging.getLogger(__name__)

#: Where managers keep their QEMUs' monitors: (manager, glob of the monitor's path).
#: A QEMU whose QMP socket matches one is left alone: driving it behind its manager's
#: back desynchronises the manager. (libvirt system and session mode; Proxmox VE.)
MANAGER_ROOTS: tuple[tuple[str, str], ...] = (
    ("libvirt", "/var/lib/libvirt/qemu/*"),
    ("libvirt", "/run/libvirt/*"),
    ("libvirt", "/var/run/libvirt/*"),
    ("libvirt", "/run/user/*/libvirt/*"),
    ("libvirt", "*/.config/libvirt/qemu/*"),
    ("Proxmox", "/var/run/qemu-server/*"),
    ("Proxmox", "/run/qemu-server/*"),
)


@attrs.frozen(kw_only=True)
class Found:
    """One QEMU process of this host, as its command line describes it.

    :ivar why: why it is left alone (None: it is to be stopped).
    """

    pid: int
    name: str
    target: Address | None
    agent: str | None = None
    why: str | None = None
    argv: tuple[str, ...] = ()
    cwd: str | None = None
    sockets: tuple[str, ...] = ()  #: every unix socket path of its command line (absolute)

    @property
    def monitor(self) -> str | None:
        """The monitor as a string (``PATH`` or ``HOST:PORT``), or None."""
        return None if self.target is None else format_address(self.target)

    def job(self) -> Job:
        """The :class:`Job` that stops it (pid pinned, agent and name set)."""
        assert self.target is not None, "only a QEMU with a reachable monitor has a job"
        return Job(self.target, pid=self.pid, agent=self.agent, name=self.name)

    def matches(self, patterns: Sequence[str]) -> bool:
        """True when a glob matches its name, its monitor or any socket on its command line."""
        names = [self.name, *self.sockets, *([self.monitor] if self.monitor else [])]
        return any(fnmatch.fnmatchcase(n, p) for p in patterns for n in names)

    def to_dict(self) -> dict[str, Any]:
        """``--list --json``'s row: pid, name, target, agent, and why when left alone."""
        row: dict[str, Any] = {"pid": self.pid, "name": self.name, "target": self.monitor,
                               "agent": self.agent}  # fmt: skip
        if self.why is not None:
            row["why"] = self.why
        return row


def _connectable(host: str) -> str:
    # QEMU listening on every address (no host, 0.0.0.0, ::) is reached on loopback.
    return {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)


# ---- one process ----------------------------------------------------------------------


def _absolute(path: str, cwd: str | None) -> str | None:
    if os.path.isabs(path):
        return os.path.normpath(path)
    return None if cwd is None else os.path.normpath(os.path.join(cwd, path))


def _where(dev: Chardev) -> str:
    return dev.path or format_address((dev.host or "", dev.port or 0))


def manager_of(path: str, roots: Iterable[tuple[str, str]] = MANAGER_ROOTS) -> str | None:
    """The manager (``libvirt``, ``Proxmox``) whose place *path* is in, or None."""
    for manager, pattern in roots:
        if fnmatch.fnmatchcase(path, pattern):
            return manager
    return None


def describe(
    pid: int,
    argv: Sequence[str],
    cwd: str | None,
    *,
    managers: Iterable[tuple[str, str]] = MANAGER_ROOTS,
) -> Found:
    """What one QEMU process is, from its command line and working directory (no I/O)."""
    line = parse_command_line(argv)
    sockets = tuple(
        dict.fromkeys(
            path
            for dev in line.chardevs
            if dev.path is not None and (path := _absolute(dev.path, cwd)) is not None
        )
    )
    target: Address | None = None
    why: str | None = None
    for dev in line.qmp:
        if dev.why is not None:
            why = why or f"its QMP monitor is {dev.why}: it cannot be reached"
        elif dev.path is not None:
            absolute = _absolute(dev.path, cwd)
            if absolute is None:
                why = why or f"its QMP socket {dev.path!r} is relative and its cwd unreadable"
            elif target is None or not isinstance(target, str):
                target = absolute  # a unix socket before TCP: its peer's pid is checked
        elif dev.port is not None and target is None:
            target = (_connectable(dev.host or ""), dev.port)
    if target is None and why is None:
        hmp = next((_where(d) for d in line.human if d.path or d.port), None)
        if hmp is not None:
            why = f"only a human monitor (HMP) at {hmp}: it needs a QMP monitor (-qmp)"
        elif line.readconfig:
            why = "no QMP monitor on its command line (-readconfig files are not read)"
        else:
            why = "no QMP monitor on its command line"
    if target is not None:
        why = None  # one reachable monitor is enough
    if isinstance(target, str) and (manager := manager_of(target, managers)) is not None:
        why = (f"managed by {manager} (its monitor is {target}): stop it through "
               f"{manager}, not behind its back")  # fmt: skip
    agent = None
    if line.agent is not None and line.agent.path is not None and line.agent.why is None:
        agent = _absolute(line.agent.path, cwd)
    monitor = None if target is None else format_address(target)
    name = line.name or monitor or f"qemu-{pid}"
    return Found(pid=pid, name=name, target=target, agent=agent, why=why, argv=tuple(argv),
                 cwd=cwd, sockets=sockets)  # fmt: skip


# ---- the host ------------------------------------------------------------------------


def read_process(pid: int, proc: str = "/proc") -> tuple[list[str], str | None] | None:
    """A QEMU process's argv and cwd; None when it is no QEMU (or gone, or unreadable).

    :raises PermissionError: its command line cannot be read.
    """
    base = f"{proc}/{pid}"
    try:
        with open(f"{base}/cmdline", "rb") as file:
            raw = file.read()
    except (FileNotFoundError, ProcessLookupError):
        return None  # it exited while we looked: nothing to stop
    argv = [os.fsdecode(arg) for arg in raw.split(b"\0")[:-1]] if raw else []
    if not argv:
        return None  # a kernel thread, or a zombie
    try:
        exe = os.readlink(f"{base}/exe").removesuffix(" (deleted)")
    except OSError:
        exe = argv[0]  # another user's process: its argv[0] is what there is
    if not is_qemu_executable(exe):
        return None
    try:
        cwd: str | None = os.readlink(f"{base}/cwd")
    except OSError:
        cwd = None
    return argv, cwd


def scan(
    match: Sequence[str] | None = None,
    *,
    proc: str = "/proc",
    managers: Iterable[tuple[str, str]] = MANAGER_ROOTS,
) -> tuple[Found, ...]:
    """Every QEMU process of this host, the left-alone ones too, by pid.

    :param match: globs; a QEMU is kept when one matches its name or a socket path.
    :param proc: where ``/proc`` is (a test or benchmark passes a tree of its own).
    :param managers: (manager, glob) pairs of monitors that belong to a manager.
    """
    patterns = _patterns(match)
    managers = tuple(managers)
    own = os.getpid()
    mine = _root_id(f"{proc}/self/root")
    found = []
    for entry in os.listdir(proc):
        if not entry.isdigit() or int(entry) == own:
            continue
        pid = int(entry)
        try:
            read = read_process(pid, proc)
        except OSError as err:
            logger.info("pid %d: cannot read its command line: %s", pid, err)
            continue
        if read is None:
            continue
        qemu = describe(pid, read[0], read[1], managers=managers)
        theirs = _root_id(f"{proc}/{pid}/root")
        if theirs is not None and mine is not None and theirs != mine:
            qemu = attrs.evolve(qemu, why="it runs in another root (a container or chroot): "
                                "its socket paths are not ours")  # fmt: skip
        if patterns is None or qemu.matches(patterns):
            found.append(qemu)
    return tuple(sorted(found, key=lambda q: q.pid))


def _root_id(path: str) -> tuple[int, int] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def _patterns(match: str | Sequence[str] | None) -> tuple[str, ...] | None:
    if match is None:
        return None
    patterns = (match,) if isinstance(match, str) else tuple(match)
    if not all(isinstance(p, str) and p for p in patterns):
        raise TypeError(f"match must be a glob or a list of globs, not {match!r}")
    return patterns


def discover(match: str | Sequence[str] | None = None) -> tuple[Job, ...]:
    """One :class:`Job` per QEMU of this host that has a reachable QMP monitor.

    Read from each QEMU's own command line (``/proc/PID/cmdline``, relative paths
    against ``/proc/PID/cwd``): ``target`` is its QMP monitor (a unix socket
    before TCP), ``pid`` its pid (so every signal stays pinned and checked),
    ``agent`` the unix socket backing its ``org.qemu.guest_agent.0`` port, and
    ``name`` its ``-name`` (else the monitor). QEMUs with no QMP monitor, or
    whose monitor belongs to a manager (libvirt, Proxmox), are left out (the
    ``qmpshutdown --list`` command says why). Nothing is connected to.

    :param match: a glob or globs; a QEMU is kept when one matches its name or
        any socket path on its command line. None keeps every one.
    :raises TypeError: *match* is not a glob or a list of globs.
    :return: the jobs, by pid.
    """
    return tuple(qemu.job() for qemu in scan(_patterns(match)) if qemu.why is None)
