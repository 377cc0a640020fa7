"""``discover()``, ``--list`` and ``--all --match`` against QEMUs started as users start them.

Plain ``Popen`` (and ``-daemonize -pidfile``) with each monitor syntax, the agent
chardev, ``-name`` in both forms, a human monitor only, a libvirt-looking one.
Every test matches only its own QEMUs (a glob on its own tmp dir or a unique
name): other QEMUs of this host are not ours to list or stop. Each QEMU a test
starts is killed and reaped by that test.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import anyio
import pytest
from test_cli import qmpshutdown as run_cli

import qmpshutdown
from qmpshutdown._discover import scan
from support.guests import QEMU_BINARY, GuestFactory, accel_args, images_dir
from support.policies import CLI_FAST, CLI_PRESSED
from support.records import as_pressed_line, as_pressed_record

pytestmark = [pytest.mark.qemu]

FAST, PRESSED = CLI_FAST, CLI_PRESSED
AGENT = [
    "-device", "virtio-serial-pci,id=vser0",
    "-device", "virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0",
]  # fmt: skip


def bare(*args: str, stopped: bool = True) -> list[str]:
    """A QEMU that needs no guest: stopped vCPUs (-S; else the firmware finds nothing to boot)."""
    return [QEMU_BINARY, *accel_args(), "-machine", "q35", "-m", "64", "-nodefaults",
            "-no-user-config", "-display", "none", *(["-S"] if stopped else []), *args]  # fmt: skip


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Started:
    """QEMUs a test started itself (children or daemons), killed and reaped at the end."""

    def __init__(self) -> None:
        self.popens: list[subprocess.Popen[bytes]] = []
        self.daemons: list[int] = []
        self.files: list[IO[bytes]] = []

    def popen(self, argv: list[str], cwd: Path) -> int:
        cwd.mkdir(parents=True, exist_ok=True)
        self.files.append(open(cwd / "stderr", "wb"))  # noqa: SIM115 -- closed in cleanup()
        self.popens.append(subprocess.Popen(
            argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=self.files[-1], start_new_session=True,
        ))  # fmt: skip
        return self.popens[-1].pid

    def daemonized(self, argv: list[str], cwd: Path, pidfile: Path) -> int:
        cwd.mkdir(parents=True, exist_ok=True)
        subprocess.run([*argv, "-daemonize", "-pidfile", str(pidfile)], cwd=cwd, check=True,
                       stdin=subprocess.DEVNULL, timeout=30)  # fmt: skip
        pid = int(pidfile.read_text())
        self.daemons.append(pid)
        return pid

    def cleanup(self) -> None:
        for popen in self.popens:
            with contextlib.suppress(ProcessLookupError):
                popen.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(timeout=10)
        for pid in self.daemons:
            reap_by_pid(pid)
        for file in self.files:
            file.close()


def reap_by_pid(pid: int, timeout: float = 10.0) -> None:
    """SIGKILL a QEMU that is not our child (a daemon, a detached restore) and see it gone."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        select.select([pidfd], [], [], timeout)
    finally:
        os.close(pidfd)


def exited(pid: int) -> bool:
    """True when *pid* is gone or a zombie (a detached QEMU's new parent reaps it)."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            return file.read().rpartition(")")[2].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


@pytest.fixture
def started() -> Iterator[Started]:
    own = Started()
    try:
        yield own
    finally:
        own.cleanup()


def accepts(path: Path) -> bool:
    # Not support.guests.listening(): /proc/net/unix names a socket as it was bound (a
    # relative path stays relative) and splits a path at its spaces.
    with socket.socket(socket.AF_UNIX) as sock:
        return sock.connect_ex(str(path)) == 0


def wait_listening(*paths: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not all(accepts(path) for path in paths):
        assert time.monotonic() < deadline, f"no listening sockets at {paths}"
        time.sleep(0.05)


def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        assert time.monotonic() < deadline, f"nothing listens on port {port}"
        time.sleep(0.05)


def unique_tag(tmp_path: Path) -> str:
    """A name part only this test's QEMUs have: never one left by another run of it."""
    return f"{tmp_path.name}-{secrets.token_hex(4)}"


def test_discover_finds_each_qemu_with_its_target_pid_agent_and_name(
    tmp_path: Path, started: Started
) -> None:
    tag = unique_tag(tmp_path)
    rel, tcp, odd, hmp, virt = (tmp_path / d for d in ("rel", "tcp", "o d", "hmp", "virt"))
    # relative paths (against its cwd), -qmp unix, -name guest=..., an agent chardev
    alpha = started.popen(bare(
        "-name", f"guest=alpha-{tag},debug-threads=on", "-qmp", "unix:qmp.sock,server=on,wait=off",
        "-chardev", "socket,id=qga0,path=qga.sock,server=on,wait=off", *AGENT,
    ), rel)  # fmt: skip
    # -qmp over TCP in the old spelling, -name NAME
    port = free_port()
    beta = started.popen(
        bare("-name", f"beta-{tag}", "-qmp", f"tcp:127.0.0.1:{port},server,nowait"), tcp
    )
    # -qmp-pretty: found, but left alone (qemu.qmp reads one message per line)
    pretty = tmp_path / "pretty"
    zeta = started.popen(bare("-qmp-pretty", "unix:p.sock,server=on,wait=off"), pretty)
    # -chardev + -mon mode=control at a path with a space, quotes and a comma; -daemonize
    strange = odd / 'it\'s "a",vm.sock'
    gamma = started.daemonized(bare(
        "-chardev", f"socket,id=mon0,path={str(strange).replace(',', ',,')},server=on,wait=off",
        "-mon", "chardev=mon0,mode=control",
    ), odd, odd / "qemu.pid")  # fmt: skip
    # a human monitor only
    delta = started.popen(
        bare("-name", f"delta-{tag}", "-monitor", "unix:hmp.sock,server=on,wait=off"), hmp
    )
    # a monitor where libvirt keeps its own (a tmp root stands in for /run/libvirt/)
    managed = virt / "run" / "libvirt" / "q" / "m.sock"  # within 108 bytes
    managed.parent.mkdir(parents=True)
    epsilon = started.popen(bare("-name", "guest=web,debug-threads=on",
                                 "-qmp", f"unix:{managed},server=on,wait=off"), virt)  # fmt: skip
    wait_listening(rel / "qmp.sock", rel / "qga.sock", hmp / "hmp.sock", managed, strange)
    wait_listening(pretty / "p.sock")
    wait_port(port)

    mine = [f"{tmp_path}/*", f"*-{tag}"]
    roots = (("libvirt", f"{virt}/run/libvirt/*"),)
    found = {vm.pid: vm for vm in scan(mine, managers=roots)}
    assert sorted(found) == sorted([alpha, beta, gamma, delta, epsilon, zeta])
    rows = {pid: (vm.name, vm.target, vm.agent, vm.why) for pid, vm in found.items()}
    assert rows[alpha] == (f"alpha-{tag}", str(rel / "qmp.sock"), str(rel / "qga.sock"), None)
    assert rows[beta] == (f"beta-{tag}", ("127.0.0.1", port), None, None)
    assert rows[gamma] == (str(strange), str(strange), None, None)
    assert rows[delta] == (
        f"delta-{tag}",
        None,
        None,
        "only a human monitor (HMP) at hmp.sock: it needs a QMP monitor (-qmp)",
    )
    assert rows[epsilon][:3] == ("web", str(managed), None)
    assert rows[zeta][:3] == (f"qemu-{zeta}", None, None)
    assert rows[zeta][3].startswith("its QMP monitor is pretty-printed (-qmp-pretty")
    assert rows[epsilon][3].startswith(f"managed by libvirt (its monitor is {managed})")

    jobs = {job.pid: job for job in qmpshutdown.discover(mine)}
    assert sorted(jobs) == sorted([alpha, beta, gamma, epsilon])  # the real roots: not managed
    assert jobs[alpha] == qmpshutdown.Job(
        str(rel / "qmp.sock"), pid=alpha, agent=str(rel / "qga.sock"), name=f"alpha-{tag}"
    )
    assert jobs[beta] == qmpshutdown.Job(("127.0.0.1", port), pid=beta, name=f"beta-{tag}")
    assert [job.pid for job in qmpshutdown.discover(f"alpha-{tag}")] == [alpha]
    assert [job.pid for job in qmpshutdown.discover(f"{odd}/*")] == [gamma]

    listed = subprocess.run(
        [sys.executable, "-m", "qmpshutdown", "--list", "--json", *(f"--match={m}" for m in mine)],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    by_pid = {row["pid"]: row for row in map(json.loads, listed.stdout.splitlines())}
    assert sorted(by_pid) == sorted([alpha, beta, gamma, delta, epsilon, zeta])
    assert by_pid[beta] == {"pid": beta, "name": f"beta-{tag}", "target": f"127.0.0.1:{port}",
                            "agent": None}  # fmt: skip
    assert by_pid[delta]["target"] is None and "human monitor" in by_pid[delta]["why"]
    text = subprocess.run(
        [sys.executable, "-m", "qmpshutdown", "--list", "--match", f"alpha-{tag}"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert text.stdout == f"{alpha}  alpha-{tag}  {rel / 'qmp.sock'}  agent={rel / 'qga.sock'}\n"
    for pid in (alpha, beta, gamma, delta, epsilon, zeta):  # --list stops nothing
        os.kill(pid, 0)

    # --all stops exactly the matched ones: over TCP (its pid from /proc) and at the odd path.
    stop = subprocess.run(
        [sys.executable, "-m", "qmpshutdown", "--all", "--json", "--stages", "quit",
         "--match", f"{odd}/*", "--match", f"beta-{tag}"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert stop.returncode == 1, stop.stdout + stop.stderr  # quit is force
    stopped = {row["pid"]: row for row in map(json.loads, stop.stdout.splitlines())}
    assert sorted(stopped) == sorted([beta, gamma])
    assert stopped[beta]["target"] == f"127.0.0.1:{port}"
    assert [stopped[p]["reason"] for p in (beta, gamma)] == ["host-qmp-quit"] * 2
    assert started.popens[1].wait(timeout=10) == 0  # beta
    deadline = time.monotonic() + 10
    while not exited(gamma):
        assert time.monotonic() < deadline, "the daemonized QEMU did not exit"
        time.sleep(0.05)
    for pid in (alpha, delta, epsilon, zeta):  # the others run on
        assert not exited(pid)


@pytest.mark.asyncio
async def test_all_with_match_stops_exactly_the_matched_ones(
    guests: GuestFactory, tmp_path: Path, started: Started
) -> None:
    first, second = await guests.boot_many("cooperative", "cooperative")
    human = started.popen(bare("-monitor", "unix:hmp.sock,server=on,wait=off"), tmp_path / "hmp")
    wait_listening(tmp_path / "hmp" / "hmp.sock")

    # Only cooperative guests are stopped: a long press step and a long wait for QEMU's exit
    # after the guest's SHUTDOWN cost nothing (they end at the power-off and the exit), and
    # loaded hosts have taken over 2 s and some 19 s for them (CI).
    run = await run_cli("--all", "--match", f"{first.workdir}/*", *PRESSED, timeout=90)
    assert run.status == 0, run.err
    last = as_pressed_line(run.err.splitlines()[-1], run.err, first.qmp_path)
    assert last.startswith(f"{first.qmp_path}  powerdown graceful "), run.err
    assert await first.wait_exit(10) == 0
    assert second.alive()

    run = await run_cli("--all", "--json", "--match", f"{tmp_path}/*", *PRESSED, timeout=90)
    assert run.status == 2, run.err  # the human monitor's QEMU: unreachable, untouched
    rows = [as_pressed_record(json.loads(line)) for line in run.out.splitlines()]
    assert [(r["name"], r["target"], r.get("stage")) for r in rows] == [
        (str(second.qmp_path), str(second.qmp_path), "powerdown"),
        (f"qemu-{human}", None, None),
    ], run.out + run.err
    assert rows[0]["pid"] == second.pid and rows[0]["graceful"] is True
    assert rows[1]["error"].startswith(f"qemu-{human}: left alone (pid {human}): "
                                       "only a human monitor (HMP)")  # fmt: skip
    assert await second.wait_exit(10) == 0
    os.kill(human, 0)  # still running


@pytest.mark.asyncio
async def test_systemd_notify_extends_only_for_a_guest_that_works(
    guests: GuestFactory, tmp_path: Path
) -> None:
    busy, idle = await guests.boot_many({"mode": "updating", "arg": 5}, "ignores")
    notify = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify))
    datagrams: list[str] = []

    async def drain() -> None:  # as systemd does: the socket's queue holds only a few
        while True:
            await anyio.wait_readable(listener)
            datagrams.append(listener.recv(4096).decode())

    argv = [
        sys.executable,
        "-m",
        "qmpshutdown",
        "--all",
        "--match",
        f"{tmp_path}/*",
        "--patience",
        "adaptive",
        "--timeout",
        "2",
        "--max-timeout",
        "20",
        "--idle-cutoff",
        "2",
        "--repress",
        "1",
        "--stages",
        "powerdown,quit",
        "--json",
    ]
    env = {**os.environ, "NOTIFY_SOCKET": str(notify)}
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(drain)
            with anyio.fail_after(60):
                proc = await anyio.run_process(argv, env=env, check=False, stdin=subprocess.DEVNULL)
            await anyio.sleep(0.2)
            tg.cancel_scope.cancel()
    finally:
        listener.close()
    assert proc.returncode == 1, proc.stderr.decode()  # the idle one was forced (quit)
    rows = {row["pid"]: row for row in map(json.loads, proc.stdout.decode().splitlines())}
    assert (rows[busy.pid]["stage"], rows[idle.pid]["stage"]) == ("powerdown", "quit")
    assert datagrams[0] == "STATUS=stopping 2 VMs\n"
    assert datagrams[-1] == "STATUS=done: 2 of 2 VMs off\n"
    extended = [d for d in datagrams if "EXTEND_TIMEOUT_USEC=" in d]
    assert len(extended) >= 2, datagrams
    for datagram in extended:
        status, extend = datagram.splitlines()
        assert status.startswith(f"STATUS={busy.qmp_path} is still working (")
        assert extend == "EXTEND_TIMEOUT_USEC=15000000"  # idle cut-off 2 + 3 readings + 10
    assert not any(str(idle.qmp_path) in d and "working" in d for d in datagrams)
    assert any(d.startswith(f"STATUS={idle.qmp_path} is off (") for d in datagrams)


_TICK = re.compile(r"QMPSHUTDOWN-GUEST-TICK n=(\d+)")


@pytest.mark.asyncio
async def test_all_save_dir_then_restore_goes_on_counting_and_a_second_restore_starts_nothing(
    guests: GuestFactory, tmp_path: Path
) -> None:
    guest = await guests.boot("counts")
    await guest.wait_for_serial("QMPSHUTDOWN-GUEST-TICK n=3\n", 20)
    states = tmp_path / "states"
    states.mkdir()
    run = await run_cli("--all", "--json", "--match", f"{guest.workdir}/*", "--save-dir", states,
                        "--timeout", "1", "--no-repress")  # fmt: skip
    assert run.status == 1, run.err  # saved, then quit: forced
    (row,) = run.records()
    assert (row["stage"], row["pid"]) == ("save", guest.pid)
    state = Path(row["saved_state"])
    assert await guest.wait_exit(10) == 0
    before = max(int(n) for n in _TICK.findall(guest.serial_text()))
    manifest = Path(f"{state}.manifest.json")
    assert stat.S_IMODE(manifest.stat().st_mode) == 0o600
    saved = json.loads(manifest.read_text())
    # The command line that runs (a QMPSHUTDOWN_QEMU wrapper execs QEMU with -L options).
    assert saved["argv"][-(len(guest.argv) - 1) :] == guest.argv[1:]
    assert (saved["cwd"], saved["name"]) == (str(guest.workdir), str(guest.qmp_path))
    assert saved["state"] == state.name

    run = await run_cli("--restore", states, "--json")
    assert run.status == 0, run.err
    (restored,) = run.records()
    pid = restored["pid"]
    try:
        assert restored["outcome"] == "restored" and restored["name"] == str(guest.qmp_path)
        os.kill(pid, 0)  # it outlived the command
        with anyio.fail_after(20):
            while not _TICK.search(guest.serial_text()):
                await anyio.sleep(0.1)
        after = guest.serial_text()  # QEMU opened the serial file anew: only what came since
        assert "QMPSHUTDOWN-GUEST-READY" not in after and "Linux version" not in after
        assert before < min(int(n) for n in _TICK.findall(after)) <= before + 3
        assert not manifest.exists() and Path(f"{manifest}.restored").exists()

        again = await run_cli("--restore", states, "--json")
        assert (again.status, again.out) == (0, "")  # nothing left to start
        os.kill(pid, 0)
    finally:
        reap_by_pid(pid)


@pytest.mark.asyncio
async def test_restore_reports_a_disk_in_use_and_a_command_line_that_no_longer_starts(
    tmp_path: Path, started: Started
) -> None:
    disk = tmp_path / "disk.qcow2"
    await anyio.run_process(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "1M"])
    drive = ["-drive", f"file={disk},format=qcow2,if=none,id=d0"]
    kernel = tmp_path / "vmlinuz"
    shutil.copyfile(images_dir() / "vmlinuz", kernel)  # it starts with it, not once it is gone
    # Running (no -S): a VM restored paused keeps its images inactive, unlocked, until `cont`.
    tag = unique_tag(tmp_path)
    for name, extra in (("locked", drive), ("gone", ["-kernel", str(kernel)])):
        started.popen(bare("-name", f"{name}-{tag}", *extra, "-qmp",
                           "unix:qmp.sock,server=on,wait=off", stopped=False),
                      tmp_path / name)  # fmt: skip
    wait_listening(tmp_path / "locked" / "qmp.sock", tmp_path / "gone" / "qmp.sock")
    states = tmp_path / "states"
    states.mkdir()
    run = await run_cli("--all", "--json", "--match", f"*-{tag}", "--save-dir", states,
                        "--stages", "save,quit,kill")  # fmt: skip
    assert run.status == 1, run.err
    assert [row["stage"] for row in run.records()] == ["save", "save"]
    kernel.unlink()
    holder = ["-qmp", "unix:qmp.sock,server=on,wait=off"]
    started.popen(bare(*drive, *holder), tmp_path / "holder")  # another QEMU uses the disk now
    wait_listening(tmp_path / "holder" / "qmp.sock")

    for _ in range(2):  # reported each time, never retried in a loop
        run = await run_cli("--restore", states, "--json")
        lingering = [row["pid"] for row in run.records() if not exited(row["pid"])]
        for pid in lingering:
            reap_by_pid(pid)  # ours: never left running, even when the assert below fails
        assert lingering == []
        assert run.status == 2, run.err
        rows = {row["name"]: row for row in run.records()}
        gone, locked = rows[f"gone-{tag}"], rows[f"locked-{tag}"]
        assert gone["outcome"] == "did-not-start", gone
        assert "vmlinuz" in gone["error"]
        assert locked["outcome"] == "did-not-load", locked
        assert "lock" in locked["error"], locked
    assert len(list(states.glob("*.manifest.json"))) == 2  # kept, for after the fix
