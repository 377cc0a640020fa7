"""The process seam: QEMU's pid, pinned by a pidfd, signalled and watched without polling."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import os
import select
import signal
import socket
import struct
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import anyio

from ._errors import PidMismatchError

logger = logging.getLogger(__name__)

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
# sock_diag (linux/sock_diag.h, linux/unix_diag.h): ask the kernel who is at the other end.
_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST, _NLM_F_DUMP = 0x1, 0x300
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_UNIX_DIAG_REQ = struct.Struct("=BBHIII2I")  # family, protocol, pad, states, ino, show, cookie
_UNIX_DIAG_MSG = struct.Struct("=BBBBI2I")  # family, type, state, pad, ino, cookie
_RTATTR = struct.Struct("=HH")  # len, type
_UDIAG_SHOW_PEER, _UDIAG_SHOW_ICONS, _UNIX_DIAG_PEER, _UNIX_DIAG_ICONS = 0x4, 0x8, 2, 3
_TCP_LISTEN = 10


@runtime_checkable
class Process(Protocol):
    """What the ladder needs of QEMU's process.

    Optional, not in the Protocol (0.4): ``command_line()``, its argv (a tuple of str) or
    None. Without it the power button leaves QEMU's reboot action as it is."""

    @property
    def pid(self) -> int:
        """The process id."""
        ...

    def send_signal(self, signum: int) -> None:
        """Send *signum*; a process that already exited is not an error."""
        ...

    def has_exited(self) -> bool:
        """Tell, without blocking, whether the process has exited."""
        ...

    def is_stopped(self) -> bool:
        """Tell whether the process is stopped (SIGSTOP, a debugger)."""
        ...

    async def wait_exited(self) -> None:
        """Return once the process has exited (it may still await its reaper)."""
        ...

    def on_exit(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call *callback* once, from the event loop, when the process exits (no task).

        :return: a function that withdraws the callback (idempotent); call it before
            :meth:`close`; no :meth:`wait_exited` while a callback is set. One at a time
            (the pidfd has one reader on the loop): a second replaces the first.

        New in 0.3; without it :func:`~qmpshutdown.climb` works (a task awaits
        :meth:`wait_exited`)."""
        ...

    def close(self) -> None:
        """Release what pins the process; idempotent."""
        ...


def peer_pid(sock: socket.socket) -> int | None:
    """Return the pid of a unix socket's peer (``SO_PEERCRED``), or None if unknown."""
    if sock.family != socket.AF_UNIX:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    except OSError:
        return None
    pid, _uid, _gid = _UCRED.unpack(raw)
    # 0: the peer lives in another pid namespace, so its pid means nothing here.
    return pid if pid > 0 else None


def holds_socket(pid: int, sock: socket.socket) -> bool | None:
    """Tell whether *pid* holds the server end of our unix socket connection *sock*.

    ``SO_PEERCRED`` names whoever called ``listen()``, not who serves the socket
    now: a process can listen, fork a child that keeps the socket, then ``exec``
    a QEMU that never owned it. So find, with sock_diag, the socket at the other
    end of *sock* (accepted: our peer, ``UNIX_DIAG_PEER``; before: the listener
    with our connection queued, ``UNIX_DIAG_ICONS``) and look for its inode among
    ``/proc/PID/fd``: our very connection, not a path (a stale socket cannot fool it).

    :param pid: the process that should hold it (pinned first: a pid may be recycled).
    :param sock: our connected unix socket.
    :return: True or False when it can be told; None when it cannot (not a unix socket,
        no sock_diag for them, the server end closed, ``/proc/PID/fd`` unreadable): then
        :func:`qmpshutdown.shutdown` sends no signal.
    """
    if sock.family != socket.AF_UNIX:
        return None
    try:
        own = os.fstat(sock.fileno()).st_ino
    except OSError:
        return None
    # QEMU may accept() at any moment (the accepted socket is a new fd): list the fds
    # after finding the server end, and look again when it is not among them.
    for _attempt in range(3):
        try:
            server = _server_end(own)
        except OSError:
            return None
        if server is None:
            continue
        holds = holds_inode(pid, server)
        if holds is not False:
            return holds
    return None if server is None else False


def _server_end(own: int) -> int | None:
    """The inode of the socket serving our connection *own*: accepted, or its listener."""
    for _ino, _state, attrs in _unix_diag(ino=own, states=0xFFFFFFFF, show=_UDIAG_SHOW_PEER):
        peer = attrs.get(_UNIX_DIAG_PEER, b"")
        # 0: not accept()ed yet (the embryonic socket has no inode), or closed.
        if len(peer) == 4 and (inode := struct.unpack("=I", peer)[0]):
            return int(inode)
    for ino, _state, attrs in _unix_diag(states=1 << _TCP_LISTEN, show=_UDIAG_SHOW_ICONS):
        icons = attrs.get(_UNIX_DIAG_ICONS, b"")
        if own in struct.unpack(f"={len(icons) // 4}I", icons[: len(icons) // 4 * 4]):
            return ino
    return None


def _unix_diag(
    *, states: int, show: int, ino: int = 0
) -> list[tuple[int, int, dict[int, bytes]]]:
    """Ask sock_diag about unix sockets: one by inode, or (ino 0) all in *states*.

    :raises OSError: sock_diag is not there or refused.
    :return: (inode, state, attributes) per socket.
    """
    cookie = (0xFFFFFFFF, 0xFFFFFFFF)  # INET_DIAG_NOCOOKIE: any socket with this inode
    body = _UNIX_DIAG_REQ.pack(socket.AF_UNIX, 0, 0, states, ino, show, *cookie)
    flags = _NLM_F_REQUEST | (0 if ino else _NLM_F_DUMP)
    rows: list[tuple[int, int, dict[int, bytes]]] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG) as nl:
        nl.settimeout(1.0)  # the kernel answers at once; never hang on it
        nl.sendto(_NLMSGHDR.pack(_NLMSGHDR.size + len(body), _SOCK_DIAG_BY_FAMILY, flags, 1, 0)
                  + body, (0, 0))  # fmt: skip
        while True:
            data = nl.recv(1 << 16)
            offset = 0
            while offset + _NLMSGHDR.size <= len(data):
                length, kind = _NLMSGHDR.unpack_from(data, offset)[:2]
                if length < _NLMSGHDR.size:
                    return rows
                if kind == _NLMSG_DONE:
                    return rows
                if kind == _NLMSG_ERROR:
                    (errno,) = struct.unpack_from("=i", data, offset + _NLMSGHDR.size)
                    if errno == 0:
                        return rows
                    raise OSError(-errno, os.strerror(-errno))
                start = offset + _NLMSGHDR.size
                _, _, state, _, inode, _, _ = _UNIX_DIAG_MSG.unpack_from(data, start)
                attrs: dict[int, bytes] = {}
                at = start + _UNIX_DIAG_MSG.size
                while at + _RTATTR.size <= offset + length:
                    size, attr = _RTATTR.unpack_from(data, at)
                    if size < _RTATTR.size:
                        break
                    attrs[attr] = data[at + _RTATTR.size : at + size]
                    at += (size + 3) & ~3
                rows.append((inode, state, attrs))
                offset += (length + 3) & ~3
            if ino:  # an exact query has one answer, no DONE
                return rows


def executable(pid: int) -> str | None:
    """Return the path of *pid*'s executable, or None if it cannot be read."""
    try:
        path = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None
    return path.removesuffix(" (deleted)")  # the binary was upgraded under a running QEMU


def is_qemu_executable(path: str) -> bool:
    """Tell whether *path* names a QEMU system emulator (``qemu-system-*`` or ``qemu-kvm``)."""
    name = os.path.basename(path)
    return name.startswith("qemu-system-") or name == "qemu-kvm"


def command_line_of(process: Process | None) -> tuple[str, ...] | None:
    """QEMU's argv through the process seam; None without one, or from a caller's
    :class:`Process` that has no ``command_line()`` (it is optional)."""
    read = getattr(process, "command_line", None)
    return None if read is None else read()


class PidfdProcess:
    """A process pinned by a pidfd: signals can never reach a recycled pid.

    The pidfd becomes readable when the process exits, so waiting is one
    ``wait_readable``, with no polling.
    """

    def __init__(self, pid: int, pidfd: int) -> None:
        self._pid = pid
        self._pidfd: int | None = pidfd
        self._argv: tuple[str, ...] | None = None

    @classmethod
    def open_qemu(cls, pid: int) -> PidfdProcess:
        """Pin *pid* and check that it is a live QEMU other than ourselves.

        :raises PidMismatchError: the process is ourselves, not QEMU, gone, or its
            executable cannot be read.
        """
        if pid == os.getpid():
            raise PidMismatchError(f"pid {pid} is this very process, not QEMU")
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError as err:
            raise PidMismatchError(f"no process with pid {pid}") from err
        except OSError as err:
            raise PidMismatchError(f"cannot pin pid {pid}: {err}") from err
        process = cls(pid, pidfd)
        try:
            # Read the executable while the pidfd pins the process, then check it
            # is still alive: had it exited in between, /proc/PID could name another.
            exe = executable(pid)
            if process.has_exited():
                raise PidMismatchError(f"pid {pid} exited while it was being checked")
            if exe is None:
                raise PidMismatchError(f"cannot read the executable of pid {pid}")
            if not is_qemu_executable(exe):
                raise PidMismatchError(f"pid {pid} is not QEMU (its executable is {exe})")
        except BaseException:
            process.close()
            raise
        return process

    @property
    def pid(self) -> int:
        return self._pid

    def _fd(self) -> int:
        if self._pidfd is None:
            raise RuntimeError("the process handle is closed")
        return self._pidfd

    def send_signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):  # exited already: what we wanted
            signal.pidfd_send_signal(self._fd(), signum)

    def has_exited(self) -> bool:
        poller = select.poll()
        poller.register(self._fd(), select.POLLIN)
        return bool(poller.poll(0))

    def is_stopped(self) -> bool:
        try:
            with open(f"/proc/{self._pid}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            return False
        if self.has_exited():  # /proc/PID may already name another process
            return False
        return fields[:1] in ([b"T"], [b"t"])

    async def wait_exited(self) -> None:
        await anyio.wait_readable(self._fd())

    def command_line(self) -> tuple[str, ...] | None:
        """QEMU's argv (``/proc/PID/cmdline``, read once: a pinned QEMU's does not change),
        or None when it cannot be read."""
        if self._argv is None:
            self._argv = self._read_command_line()
        return self._argv

    def _read_command_line(self) -> tuple[str, ...] | None:
        try:
            with open(f"/proc/{self._pid}/cmdline", "rb") as file:
                raw = file.read()
        except OSError:
            return None
        if not raw or self.has_exited():  # /proc/PID may already name another process
            return None
        return tuple(arg.decode(errors="surrogateescape") for arg in raw.rstrip(b"\0").split(b"\0"))

    def on_exit(self, callback: Callable[[], None]) -> Callable[[], None]:
        # The pidfd turns readable at the exit: one reader on the loop, no task waiting.
        loop, fd = asyncio.get_running_loop(), self._fd()

        def exited() -> None:
            loop.remove_reader(fd)  # level-triggered: once is enough
            callback()

        def withdraw() -> None:
            loop.remove_reader(fd)

        loop.add_reader(fd, exited)
        return withdraw

    def close(self) -> None:
        if self._pidfd is not None:
            fd, self._pidfd = self._pidfd, None
            os.close(fd)

    def __repr__(self) -> str:
        return f"<PidfdProcess pid={self._pid}>"


def tcp_peer_is(sock: socket.socket, pid: int) -> bool | None:
    """Tell whether *pid* holds the other end of a loopback TCP connection.

    :return: True or False when it can be told from /proc; None when the peer
        is not on this host or /proc does not say.
    """
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    try:
        local = sock.getsockname()
        remote = sock.getpeername()
    except OSError:
        return None
    if not ipaddress.ip_address(remote[0]).is_loopback:
        return None
    inode = _tcp_inode(local=remote, remote=local, family=sock.family)
    if inode is None:
        return None
    return holds_inode(pid, inode)


def holds_inode(pid: int, inode: int | str) -> bool | None:
    """Tell whether *pid* has the socket *inode* among its descriptors (``/proc/PID/fd``).

    :return: True or False; None when ``/proc/PID/fd`` cannot be read.
    """
    target = f"socket:[{inode}]"
    try:  # newest first: the connection QEMU just accepted is most often its highest fd
        fds = sorted(os.listdir(f"/proc/{pid}/fd"), key=int, reverse=True)
    except (OSError, ValueError):
        return None
    for fd in fds:
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                return True
    return False


def _tcp_inode(*, local: tuple[Any, ...], remote: tuple[Any, ...], family: int) -> str | None:
    """Find the inode of the TCP socket bound to *local* and connected to *remote*."""
    table = "/proc/net/tcp" if family == socket.AF_INET else "/proc/net/tcp6"
    want = (_proc_addr(local, family), _proc_addr(remote, family))
    try:
        with open(table) as rows:
            next(rows)
            for row in rows:
                fields = row.split()
                if (fields[1], fields[2]) == want:
                    # inode 0: QEMU has not accept()ed yet; nothing can be told
                    return fields[9] if fields[9] != "0" else None
    except (OSError, StopIteration, IndexError):
        return None
    return None


def _proc_addr(addr: tuple[Any, ...], family: int) -> str:
    """Format an address the way /proc/net/tcp does (host byte order per 32-bit word)."""
    packed = socket.inet_pton(family, addr[0])
    words = b"".join(packed[i : i + 4][::-1] for i in range(0, len(packed), 4))
    return f"{words.hex().upper()}:{addr[1]:04X}"


def out_of_descriptors(err: BaseException) -> bool:
    """Tell whether *err* (or an error it was raised from) is this process out of open files.

    ``EMFILE`` (our own limit) or ``ENFILE`` (the system's): our shortage, not the VM's.
    """
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.EMFILE, errno.ENFILE):
            return True
        seen = seen.__cause__
    return False
