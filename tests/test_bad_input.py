"""A hostile world: bad input, and peers that are not QEMU.

Every bad input gets a typed :class:`qmpshutdown.Error` (``ValueError`` or
``TypeError`` for an argument that makes no sense) within its bound, nothing is
signalled, and every fake peer (``tests/support/peers.py``, each in its own process) is
still alive and unsignalled afterwards. The cases are ``CASES``, from which
docs/robustness.md is rendered.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import pickle
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import attrs
import pytest

import qmpshutdown
from qmpshutdown import ConnectError, PidMismatchError, ShutdownFailed
from support import peers
from support.policies import PEERS
from support.robustness import Case

pytestmark = pytest.mark.asyncio

#: Small timeouts: a hostile peer costs at most a second per wait.
POLICY = PEERS
#: Slack on top of the policy's own bound (scheduling on 2 busy cores).
MARGIN = 1.0
CONNECT_LIMIT = POLICY.connect_timeout + MARGIN
LADDER_LIMIT = POLICY.bound + MARGIN
#: Arguments are checked before anything is opened.
ARGUMENT_LIMIT = 0.5
#: The outer bound on any call in this file: a hang fails the test, it never stalls it.
OUTER = POLICY.bound + 20
PEERS_SCRIPT = Path(__file__).parent / "support" / "peers.py"
#: The peer would accept this late (a busy QEMU accepts in its main loop).
LATE_ACCEPT = 0.3
#: What a skipped signal rung says for a unix peer that is not QEMU, and for TCP.
NOT_QEMU = "is not QEMU"
PID_UNKNOWN = "pid is unknown"


# ---- the cases -------------------------------------------------------------------


def bad_argument(name: str, handling: str, expect: type[Exception], **params: Any) -> Case:
    return Case(
        "bad input",
        name,
        handling,
        expect,
        ARGUMENT_LIMIT,
        "checked before any I/O",
        {"kind": "argument", **params},
    )


def bad_address(name: str, handling: str, setup: str, match: str) -> Case:
    return Case(
        "bad input",
        name,
        handling,
        ConnectError,
        CONNECT_LIMIT,
        "connect_timeout",
        {"kind": "address", "setup": setup, "match": match},
    )


def bad_peer(name: str, handling: str, behaviour: str, match: str, *, tcp: bool = False) -> Case:
    """A peer on which the handshake fails: ConnectError, as no signal may be sent."""
    return Case(
        "peer that is not QEMU",
        name,
        handling + ("; no pid, no signal" if tcp else "; not QEMU, no signal"),
        ConnectError,
        CONNECT_LIMIT,
        "connect_timeout",
        {"kind": "peer", "behaviour": behaviour, "tcp": tcp, "match": match},
    )


def misbehaving_peer(
    name: str,
    handling: str,
    behaviour: str,
    steps: tuple[str, str],
    cause: str,
    *,
    tcp: bool = False,
    **params: Any,
) -> Case:
    """A peer that negotiates, then misbehaves: the ladder runs, sends no signal, fails."""
    return Case(
        "peer that is not QEMU",
        name,
        handling,
        ShutdownFailed,
        LADDER_LIMIT,
        "policy.bound",
        {
            "kind": "peer",
            "behaviour": behaviour,
            "tcp": tcp,
            # powerdown and quit outcomes ("a|b": either); terminate and kill are skipped.
            "steps": steps,
            "cause": cause,
            "no_signal": PID_UNKNOWN if tcp else NOT_QEMU,
            **params,
        },
    )


def decoy(name: str, handling: str, pid: str, *, tcp: bool, match: str, **params: Any) -> Case:
    return Case(
        "peer that is not QEMU",
        name,
        handling,
        PidMismatchError,
        CONNECT_LIMIT,
        "connect_timeout",
        {"kind": "decoy", "pid": pid, "tcp": tcp, "match": match, **params},
    )


def liar(
    name: str, handling: str, mode: str, expect: type[Exception], match: str | None
) -> Case:
    """A listener that forked, kept the socket in a child and exec'd a real QEMU (liar.py)."""
    limit, bound = (CONNECT_LIMIT, "connect_timeout")
    if expect is ShutdownFailed:
        limit, bound = (LADDER_LIMIT, "policy.bound")
    return Case(
        "peer that is not QEMU",
        name,
        handling,
        expect,
        limit,
        bound,
        {"kind": "liar", "mode": mode, "match": match},
    )


def peer_port(port: int) -> Callable[[tuple[str, int]], tuple[str, int]]:
    """A target on the peer's host, at *port*."""
    return lambda address: (address[0], port)


def same(address: tuple[str, int]) -> tuple[str, int]:
    return address


CASES: list[Case] = [
    # -- arguments that make no sense: refused before anything is opened
    bad_argument("pid 0", "refused: a pid is a positive int", ValueError, pid=0),
    bad_argument("pid -1", "refused: a pid is a positive int", ValueError, pid=-1),
    bad_argument("pid True", "refused: a bool is not a pid", ValueError, pid=True),
    bad_argument("pid '12'", "refused: a str is not a pid", ValueError, pid="12"),
    bad_argument("pid 2^31", "refused: no pid_t is that large", ValueError, pid=2**31),
    bad_argument(
        "port 0", "refused: no monitor listens on port 0", ValueError, target=peer_port(0)
    ),
    bad_argument("port -1", "refused: not a TCP port", ValueError, target=peer_port(-1)),
    bad_argument(
        "port 65536 + n",
        "refused: not a TCP port (the resolver would wrap it to port n: another monitor)",
        ValueError,
        target="wrapped",
    ),
    bad_argument("target 42", "refused: not a path, address or client", TypeError, target=42),
    bad_argument(
        "target bytes", "refused: a path is a str or PathLike", TypeError, target=b"/run/q"
    ),
    bad_argument("target ''", "refused: an empty path", TypeError, target=""),
    bad_argument(
        "target (host,)", "refused: a TCP target is (host, port)", TypeError, target=("h",)
    ),
    bad_argument(
        "port '4444'", "refused: a port is an int", TypeError, target=("127.0.0.1", "4444")
    ),
    # -- addresses where no monitor can be reached
    bad_address("no such path", "connect fails: ENOENT", "missing", "No such file"),
    bad_address("regular file", "connect fails: ECONNREFUSED", "file", "refused"),
    bad_address("directory", "connect fails: ECONNREFUSED", "directory", "refused"),
    bad_address("stale socket", "no listener: ECONNREFUSED", "stale", "refused"),
    bad_address("path too long", "refused by the kernel (108 bytes)", "too-long", "too long"),
    Case(
        "bad input",
        "no permission",
        "connect fails: EACCES (the call runs as user nobody)",
        ConnectError,
        CONNECT_LIMIT,
        "connect_timeout",
        {"kind": "unprivileged", "match": "Permission denied"},
    ),
    bad_address(
        "closed TCP port", "connect fails: ECONNREFUSED", "closed-port", r"127\.0\.0\.1:\d+"
    ),
    bad_address(
        "unresolvable host", "name lookup fails, bounded", "unresolvable", "cannot resolve"
    ),
    # -- peers on which the handshake fails
    bad_peer("garbage bytes", "greeting not understood", "garbage", "not a QMP monitor"),
    bad_peer("HTTP banner", "greeting not understood", "http", "not a QMP monitor"),
    bad_peer("HTTP banner (TCP)", "greeting not understood", "http", "not a QMP monitor", tcp=True),
    bad_peer("silent", "no greeting within connect_timeout", "silent", "no QMP greeting"),
    bad_peer(
        "silent (TCP)",
        "no greeting within connect_timeout",
        "silent",
        "no QMP greeting",
        tcp=True,
    ),
    bad_peer("closes at once", "EOF before the greeting", "close", "hung up"),
    bad_peer("closes mid-greeting", "half a greeting is not JSON", "half-greeting", "not a QMP"),
    bad_peer(
        "no reply to capabilities",
        "negotiation times out",
        "deaf-negotiation",
        "no QMP greeting",
    ),
    bad_peer(
        "capabilities refused",
        "negotiation fails",
        "refuse-capabilities",
        "not a QMP monitor",
    ),
    bad_peer(
        "16 MiB greeting",
        "line over the 10 MiB line limit (qemu.qmp's): not a QMP monitor",
        "long-greeting",
        "limit",
    ),
    # query-status goes out with the capabilities: its reply is the handshake's last word
    bad_peer(
        "16 MiB reply",
        "first reply over the 10 MiB line limit: not a QMP monitor",
        "long-reply",
        "limit",
    ),
    bad_peer(
        "malformed reply",
        "first reply not JSON: not a QMP monitor",
        "malformed-reply",
        "not a QMP monitor",
    ),
    bad_peer(
        "malformed reply (TCP)",
        "first reply not JSON: not a QMP monitor",
        "malformed-reply",
        "not a QMP monitor",
        tcp=True,
    ),
    # -- peers that negotiate, then misbehave: the ladder runs without signals
    misbehaving_peer(
        "wrong reply ids",
        "replies dropped; each command times out; no signal",
        "wrong-ids",
        ("failed", "failed"),
        "monitor-unresponsive",
        commands=["qmp_capabilities", "query-status", "quit"],
    ),
    misbehaving_peer(
        "wrong reply ids (TCP)",
        "replies dropped; each command times out; no pid, no signal",
        "wrong-ids",
        ("failed", "failed"),
        "monitor-unresponsive",
        tcp=True,
    ),
    misbehaving_peer(
        "events before greeting",
        "kept for the record, then the greeting (QEMU 7.2 loading a state does this): an "
        "impostor after them, so press, quit, then no signal",
        "events-first",
        ("timeout", "timeout"),
        "ignored-power-button",
        commands=["qmp_capabilities", "query-status", "system_powerdown", "quit"],
        events=["STOP", "RESUME"],
    ),
    misbehaving_peer(
        "QMP impostor",
        "answers like QEMU but never stops: press, quit, then no signal",
        "impostor",
        ("timeout", "timeout"),
        "ignored-power-button",
        commands=["qmp_capabilities", "query-status", "system_powerdown", "quit"],
    ),
    # -- a pid that is not the peer's QEMU: refused before any command
    decoy(
        "decoy pid",
        "refused: not the socket's peer (SO_PEERCRED)",
        "decoy",
        tcp=False,
        match="but the socket's peer is pid",
    ),
    decoy(
        "decoy pid (TCP)",
        "refused: does not hold the connection (/proc)",
        "decoy",
        tcp=True,
        match="does not hold this monitor connection",
    ),
    # -- SO_PEERCRED names a real QEMU that never held the socket: that QEMU is left alone
    liar(
        "listener exec'd a QEMU, never accepts",
        "the pid's QEMU does not hold the socket (sock_diag, /proc/PID/fd): no signal",
        "backlog",
        ConnectError,
        "does not hold the monitor socket",
    ),
    liar(
        "listener exec'd a QEMU, accepts silently",
        "the pid's QEMU does not hold the socket (sock_diag, /proc/PID/fd): no signal",
        "silent",
        ConnectError,
        "does not hold the monitor socket",
    ),
    liar(
        "listener exec'd a QEMU, answers QMP",
        "press and quit go to the impostor; the QEMU does not hold the socket: no signal",
        "impostor",
        ShutdownFailed,
        None,  # the steps say it: see the test
    ),
    decoy("peer's own pid", "refused: not QEMU (/proc/PID/exe)", "peer", tcp=False, match=NOT_QEMU),
    decoy(
        "peer's own pid, late accept (TCP)",
        "refused: not QEMU, though the peer accepted late",
        "peer",
        tcp=True,
        match=NOT_QEMU,
        accept_delay=LATE_ACCEPT,
    ),
]


def cases(kind: str) -> list[Case]:
    return [case for case in CASES if case.params["kind"] == kind]


def parametrize(kind: str) -> Any:
    chosen = cases(kind)
    return pytest.mark.parametrize("case", chosen, ids=[case.id for case in chosen])


# ---- fake peers, each in its own process -----------------------------------------


@attrs.define(eq=False)
class Peer:
    """A server from tests/support/peers.py, started in its own process."""

    behaviour: str
    tcp: bool
    workdir: Path
    popen: subprocess.Popen[bytes]
    address: str | tuple[str, int] = ""

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def label(self) -> str:
        return f"{self.behaviour} ({'TCP' if self.tcp else 'unix'})"

    def log(self) -> list[str]:
        try:
            return (self.workdir / "log").read_text().splitlines()
        except FileNotFoundError:
            return []

    def accepts(self) -> int:
        return self.log().count("accept")

    def commands(self) -> list[str]:
        return [line.split(" ", 1)[1] for line in self.log() if line.startswith("command ")]

    def stderr(self) -> str:
        with contextlib.suppress(FileNotFoundError):
            return (self.workdir / "stderr").read_text(errors="replace")[-2000:]
        return ""

    async def ready(self, timeout: float = 10.0) -> None:
        """Wait until it listens (the socket or port file appears only then); bounded."""
        marker = self.workdir / ("port" if self.tcp else "qmp.sock")
        with anyio.fail_after(timeout):
            while not marker.exists():
                if self.popen.poll() is not None:
                    raise RuntimeError(f"peer {self.label} exited early:\n{self.stderr()}")
                await anyio.sleep(0.01)
        self.address = ("127.0.0.1", int(marker.read_text())) if self.tcp else str(marker)

    def problems(self) -> list[str]:
        """What shows it was harmed: it died, was stopped, or received any signal."""
        found = []
        status = self.popen.poll()
        if status is not None:
            how = f"signal {signal.Signals(-status).name}" if status < 0 else f"status {status}"
            found.append(f"{self.label} is no longer running ({how}):\n{self.stderr()}")
        elif _state(self.pid) in ("T", "t"):
            found.append(f"{self.label} was stopped")
        signals = [line for line in self.log() if line.startswith("signal ")]
        if signals:
            found.append(f"{self.label} received {signals}")
        return found

    def stop(self) -> None:
        """Kill and reap it (bounded), and remove its files; idempotent."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=10)
        shutil.rmtree(self.workdir, ignore_errors=True)


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0].decode()
    except (OSError, IndexError):
        return "?"


def start_peer(behaviour: str, *, tcp: bool = False, accept_delay: float = 0.0) -> Peer:
    """Start a peer (call :meth:`Peer.ready` next, and :meth:`Peer.stop` in any case)."""
    # A short path: unix socket paths are limited to 108 bytes.
    workdir = Path(tempfile.mkdtemp(prefix="qsd-peer-"))
    workdir.chmod(0o755)  # so that a user without rights reaches the socket's own mode
    argv = [sys.executable, str(PEERS_SCRIPT), behaviour]
    argv += ["--tcp", str(workdir / "port")] if tcp else [str(workdir / "qmp.sock")]
    argv += ["--log", str(workdir / "log"), "--accept-delay", str(accept_delay)]
    with open(workdir / "stderr", "wb") as stderr:
        # A new session: a ^C in the terminal reaches pytest, not the peers.
        popen = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
            start_new_session=True,
        )  # fmt: skip
    return Peer(behaviour, tcp, workdir, popen)


@contextlib.asynccontextmanager
async def running_peer(
    behaviour: str, *, tcp: bool = False, accept_delay: float = 0.0
) -> AsyncIterator[Peer]:
    """A listening peer; on leaving, assert it is still alive and was never signalled."""
    peer = start_peer(behaviour, tcp=tcp, accept_delay=accept_delay)
    try:
        await peer.ready()
        yield peer
        problems = peer.problems()
    finally:
        peer.stop()
    assert not problems, "\n".join(problems)


@contextlib.contextmanager
def decoy_process() -> Iterator[subprocess.Popen[bytes]]:
    """A live process that is neither QEMU nor the peer; killed and reaped on leaving."""
    popen = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        yield popen
    finally:
        if popen.poll() is None:
            popen.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            popen.wait(timeout=10)


# ---- calling the library ---------------------------------------------------------


async def must_raise(target: Any, pid: Any = None) -> None:
    """Call shutdown(), bounded; returning instead of raising is an AssertionError."""
    with anyio.fail_after(OUTER):
        result = await qmpshutdown.shutdown(target, POLICY, pid=pid)
    steps = [(s.stage.value, s.outcome.value, s.detail) for s in result.steps]
    raise AssertionError(f"shutdown() returned instead of raising: {result.summary()}; {steps}")


def signal_rungs(result: qmpshutdown.ShutdownResult) -> list[qmpshutdown.Step]:
    return [s for s in result.steps if s.stage.value in ("terminate", "kill")]


# ---- bad input -------------------------------------------------------------------


@parametrize("argument")
async def test_bad_argument_is_refused_before_any_io(case: Case) -> None:
    async with running_peer("impostor", tcp=True) as peer:
        assert isinstance(peer.address, tuple)
        host, port = peer.address
        target = case.params.get("target", same)
        if target == "wrapped":
            target = (host, port + 65536)  # getaddrinfo() takes it modulo 65536: the peer's port
        elif callable(target):
            target = target(peer.address)
        started = time.monotonic()
        with pytest.raises(case.expect):
            await must_raise(target, case.params.get("pid"))
        elapsed = time.monotonic() - started
        assert peer.accepts() == 0, "the peer was connected to"
    assert elapsed <= case.limit


@contextlib.contextmanager
def address(setup: str, scratch: Path) -> Iterator[str | tuple[str, int]]:
    """Make the bad address *setup* names under *scratch*."""
    if setup == "missing":
        yield str(scratch / "no-such.sock")
    elif setup == "file":
        (scratch / "file").write_text("not a socket\n")
        yield str(scratch / "file")
    elif setup == "directory":
        (scratch / "dir").mkdir()
        yield str(scratch / "dir")
    elif setup == "stale":
        # What a crashed QEMU leaves behind: the socket file, nobody listening.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.bind(str(scratch / "stale.sock"))
        yield str(scratch / "stale.sock")
    elif setup == "too-long":
        yield str(scratch / ("x" * 120))
    elif setup == "closed-port":
        # Bound but not listening: refused, and no one else can take the port meanwhile.
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            yield ("127.0.0.1", sock.getsockname()[1])
    elif setup == "unresolvable":
        yield ("no-such-host.invalid", 4444)  # RFC 2606: never resolves
    else:
        raise AssertionError(f"unknown setup {setup!r}")


@parametrize("address")
async def test_unreachable_address_is_a_connect_error(case: Case, tmp_path: Path) -> None:
    with address(case.params["setup"], tmp_path) as target:
        started = time.monotonic()
        with pytest.raises(case.expect, match=case.params["match"]):
            await must_raise(target)
        elapsed = time.monotonic() - started
    assert elapsed <= case.limit


#: Run in a child process: drop to an unprivileged user, then call the library.
UNPRIVILEGED_CALL = """
import base64, json, os, pickle, sys, time
import anyio, qmpshutdown
path, uid, gid, policy = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
policy = qmpshutdown.ShutdownPolicy(**policy)
anyio.run(anyio.sleep, 0, backend="asyncio")  # import everything while it is readable
try:
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
except OSError as err:
    print(json.dumps({"skip": f"cannot drop privileges: {err}"}))
    sys.exit(0)
error = None
started = time.monotonic()
try:
    qmpshutdown.shutdown_sync(path, policy)
except Exception as err:
    error = err
elapsed = time.monotonic() - started
pickled = base64.b64encode(pickle.dumps(error)).decode()
print(json.dumps({"euid": os.geteuid(), "elapsed": elapsed, "error": pickled}))
"""


@parametrize("unprivileged")
async def test_socket_the_caller_may_not_open(case: Case) -> None:
    if os.geteuid() != 0:
        pytest.skip(f"running as uid {os.geteuid()}: only root can drop to another user here")
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("there is no user 'nobody' to run the call as")
    async with running_peer("silent") as peer:
        assert isinstance(peer.address, str)
        os.chmod(peer.address, 0o600)  # root's socket: others may not connect
        timeouts = {f: getattr(POLICY, f) for f in ("connect_timeout", "command_timeout")}
        argv = [sys.executable, "-c", UNPRIVILEGED_CALL, peer.address]
        argv += [str(nobody.pw_uid), str(nobody.pw_gid), json.dumps(timeouts)]
        child = await anyio.to_thread.run_sync(
            lambda: subprocess.run(argv, capture_output=True, text=True, timeout=30, cwd="/")
        )
        assert peer.accepts() == 0
    try:
        report = json.loads(child.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        pytest.fail(f"the unprivileged call crashed:\n{child.stdout}\n{child.stderr}")
    if "skip" in report:
        pytest.skip(report["skip"])
    assert report["euid"] == nobody.pw_uid
    error = pickle.loads(base64.b64decode(report["error"]))
    with pytest.raises(case.expect, match=case.params["match"]):
        if error is None:
            raise AssertionError("shutdown_sync() returned instead of raising")
        raise error  # what the call raised in the child
    assert report["elapsed"] <= case.limit


# ---- peers that are not QEMU -----------------------------------------------------


@parametrize("peer")
async def test_peer_that_is_not_qemu(case: Case) -> None:
    params = case.params
    async with running_peer(params["behaviour"], tcp=params["tcp"]) as peer:
        started = time.monotonic()
        with pytest.raises(case.expect, match=params.get("match")) as caught:
            await must_raise(peer.address)
        elapsed = time.monotonic() - started
        assert peer.accepts() >= 1
        commands = peer.commands()
    assert elapsed <= case.limit
    if "commands" in params:
        assert commands == params["commands"]
    if case.expect is not ShutdownFailed:
        return
    result = caught.value.result
    assert result.stage is None
    assert result.pid is None
    if "events" in params:  # sent before the greeting: first in the record
        assert [e.event for e in result.events[: len(params["events"])]] == params["events"]
    assert result.cause is not None and result.cause.value == params["cause"]
    outcomes = [(s.stage.value, s.outcome.value) for s in result.steps]
    powerdown, quit = params["steps"]
    assert len(outcomes) == 4, outcomes
    assert outcomes[0][0] == "powerdown" and outcomes[0][1] in powerdown.split("|"), outcomes
    assert outcomes[1][0] == "quit" and outcomes[1][1] in quit.split("|"), outcomes
    assert outcomes[2:] == [("terminate", "skipped"), ("kill", "skipped")], outcomes
    for step in signal_rungs(result):
        assert params["no_signal"] in step.detail


@parametrize("decoy")
async def test_pid_that_is_not_the_peers_qemu_is_refused(case: Case) -> None:
    params = case.params
    delay = params.get("accept_delay", 0.0)
    async with running_peer("impostor", tcp=params["tcp"], accept_delay=delay) as peer:
        with decoy_process() as other:
            pid = other.pid if params["pid"] == "decoy" else peer.pid
            started = time.monotonic()
            with pytest.raises(case.expect, match=params["match"]) as caught:
                await must_raise(peer.address, pid)
            elapsed = time.monotonic() - started
            assert str(pid) in str(caught.value)
            assert other.poll() is None, "the decoy was killed"
            assert _state(other.pid) not in ("T", "t"), "the decoy was stopped"
        # Nothing but (at most) the handshake reached the peer.
        assert set(peer.commands()) <= {"qmp_capabilities"}, peer.commands()
    assert elapsed <= case.limit


@pytest.mark.parametrize(
    ("setup", "tcp", "says"),
    [
        # The pid is known (SO_PEERCRED): "no pid to signal" would be false.
        ("garbage", False, NOT_QEMU),
        ("silent", False, NOT_QEMU),
        ("garbage", True, "no pid to signal|pid is unknown"),
        # The peer's error, not a bare "AssertionError" from inside qemu.qmp.
        ("refuse-capabilities", False, "qmp_capabilities|negotiat"),
        # asyncio's own text, "Connect call failed", does not say why.
        ("closed-port", True, "refused"),
    ],
    ids=["unix-not-qemu", "unix-no-greeting", "tcp-no-pid", "caps-refused", "tcp-refused"],
)
async def test_connect_error_says_why(setup: str, tcp: bool, says: str, tmp_path: Path) -> None:
    async with contextlib.AsyncExitStack() as stack:
        if setup == "closed-port":
            target = stack.enter_context(address(setup, tmp_path))
        else:
            target = (await stack.enter_async_context(running_peer(setup, tcp=tcp))).address
        with pytest.raises(ConnectError, match=says):
            await must_raise(target)


async def test_no_raw_exception_escapes_from_any_peer() -> None:
    """Every peer behaviour, on unix and TCP, all at once: always a qmpshutdown.Error."""
    started_peers: list[Peer] = []
    outcomes: dict[str, tuple[object, float]] = {}

    async def call(peer: Peer) -> None:
        started = time.monotonic()
        try:
            with anyio.fail_after(OUTER):
                outcome: object = await qmpshutdown.shutdown(peer.address, POLICY)
        except Exception as err:  # anything but cancellation: judged below
            outcome = err
        outcomes[peer.label] = (outcome, time.monotonic() - started)

    try:
        for behaviour in sorted(peers.BEHAVIOURS):
            for tcp in (False, True):
                started_peers.append(start_peer(behaviour, tcp=tcp))
        for peer in started_peers:
            await peer.ready()
        async with anyio.create_task_group() as tg:
            for peer in started_peers:
                tg.start_soon(call, peer)
        problems = [problem for peer in started_peers for problem in peer.problems()]
    finally:
        for peer in started_peers:
            peer.stop()
    assert not problems, "\n".join(problems)
    wrong = {
        label: f"{type(outcome).__name__}: {outcome} after {elapsed:.2f} s"
        for label, (outcome, elapsed) in sorted(outcomes.items())
        if not isinstance(outcome, qmpshutdown.Error) or elapsed > LADDER_LIMIT
    }
    assert not wrong, "\n".join(f"{label}: {what}" for label, what in wrong.items())
    assert len(outcomes) == len(started_peers)


async def test_every_case_is_run_and_named_once() -> None:
    names = [case.name for case in CASES]
    assert len(set(names)) == len(names)
    kinds = {"argument", "address", "unprivileged", "peer", "decoy", "liar"}
    assert {case.params["kind"] for case in CASES} == kinds
    for case in CASES:
        assert case.area in ("bad input", "peer that is not QEMU")
        assert isinstance(case.expect, type) and issubclass(case.expect, Exception)
        assert case.limit is not None and case.bound
    # Every behaviour of tests/support/peers.py is a case of its own.
    behaviours = {case.params["behaviour"] for case in cases("peer")}
    assert behaviours == set(peers.BEHAVIOURS)
