"""Boot the tiny test guests of ``fixtures/qemu-images`` under QEMU.

The guest's behaviour on the ACPI power button is picked per boot (``mode``):

* ``cooperative``   powers off at once on a press;
* ``slow``          powers off ``arg`` seconds after a press (default 5);
* ``needs-presses`` powers off on the ``arg``-th press only (default 2);
* ``ignores``       has no handler: presses do nothing;
* ``asleep``        suspends to RAM (S3) right after READY (``arg``: delay, default 0),
  prints ``QMPSHUTDOWN-GUEST-RESUMED`` when woken, then acts like ``cooperative``;
* ``panics``        kernel panic ``arg`` seconds after READY (default 1), no button handler;
  add ``-device pvpanic`` so QEMU notices;
* ``reboots``       reboots on a press;
* ``updating``      on a press burns a CPU and writes (to the disk if there is one, else to
  tmpfs) for ``arg`` seconds (default 20), ``QMPSHUTDOWN-GUEST-UPDATING t=N`` each second,
  then powers off;
* ``stalls``        on a press works about 1 s, prints ``QMPSHUTDOWN-GUEST-STALLED`` and
  then waits forever (a "save your changes?" prompt);
* ``counts``        after READY prints ``QMPSHUTDOWN-GUEST-TICK n=N`` once a second from a
  counter held in RAM (a shell loop); no button handler, like ``ignores`` (a guest
  restored from a saved state goes on counting instead of starting again).

Options that combine with every mode (``boot()`` / ``guest_argv()`` keywords):

* ``agent=True``    Debian's qemu-ga on a virtserialport ``org.qemu.guest_agent.0``,
  its socket at ``Guest.agent_path`` (``workdir/qga.sock``); :class:`RawAgent` talks to it;
* ``disk=True``     a 16 MiB ext4 qcow2 at ``Guest.disk_path`` (virtio-blk); the guest
  rewrites ``/counter`` and prints ``QMPSHUTDOWN-GUEST-WROTE n=N`` once N is synced;
  :func:`inspect_disk` reads it after QEMU exited (journal state, counter without replay);
* ``display=True``  ``-device VGA``; the guest paints recognisable screens on tty1
  (``screendump`` gives a 720x400 PNG).

Serial lines the guest prints: ``QMPSHUTDOWN-GUEST-READY mode=<mode>`` once the
button handler listens (and, with ``agent``/``disk``, after
``QMPSHUTDOWN-GUEST-AGENT-READY port=/dev/vportNpM`` and
``QMPSHUTDOWN-GUEST-DISK-MOUNTED dev=/dev/vda``),
``QMPSHUTDOWN-GUEST-PRESS n=<count>`` per press seen.

The first guest of a kind is booted; a later one of the same kind is restored
from the state the first saved at READY (:mod:`support.saved`: which guests
qualify, and ``QMPSHUTDOWN_TEST_RESTORE=0``), unless ``boot(restore=False)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import attrs

from support import saved

#: The emulator every guest runs: ``QMPSHUTDOWN_QEMU`` (a name on PATH or a path; it must
#: exec a ``qemu-system-*`` binary), default ``qemu-system-x86_64``. Made absolute: guests run
#: with their workdir as cwd.
_QEMU = os.environ.get("QMPSHUTDOWN_QEMU") or "qemu-system-x86_64"
QEMU_BINARY = os.path.abspath(_QEMU) if os.sep in _QEMU else _QEMU
MODES = (
    "cooperative", "slow", "needs-presses", "ignores", "asleep", "panics", "reboots",
    "updating", "stalls", "counts",
)  # fmt: skip
#: The virtio-serial port name qemu-ga looks for.
AGENT_PORT_NAME = "org.qemu.guest_agent.0"
#: Size of the test disk made by :func:`make_disk`.
DISK_SIZE_MIB = 16
READY_PREFIX = "QMPSHUTDOWN-GUEST-READY"
REPO_ROOT = Path(__file__).resolve().parent.parent.parent
BUILD_SCRIPT = REPO_ROOT / "fixtures" / "qemu-images" / "build.py"
#: Builds the systemd guest (Debian 12, systemd, logind, dbus, udev, qemu-ga) under build/systemd.
SYSTEMD_BUILD_SCRIPT = REPO_ROOT / "fixtures" / "qemu-images" / "build_systemd.py"
#: The systemd guest's scenarios (``qsd.scenario=<name>``, see fixtures/qemu-images/README.md).
SYSTEMD_SCENARIOS = (
    "cooperative", "inhibitor", "power-key-ignored", "stop-job", "exec-blocked", "reboots",
)  # fmt: skip
#: A systemd boot under TCG takes tens of seconds, more on a loaded machine.
SYSTEMD_READY_TIMEOUT = 240.0
#: How to end the inhibitor scenario's block inhibitor from the agent (``guest-exec``).
SYSTEMD_STOP_INHIBITOR = ("/usr/bin/systemctl", "stop", "qsd-inhibitor.service")

#: How often log files are polled, in seconds.
POLL_INTERVAL = 0.03


class ImagesUnavailable(RuntimeError):
    """The guest kernel/initramfs could not be built; the message says why."""


# --------------------------------------------------------------------------- host probes

#: What each build script gave this session: its build directory, or why it failed.
_built: dict[Path, Path | str] = {}
_accel: list[str] | None = None
#: Every QEMU any factory started in this process (for the session-end safety net).
_started: list[subprocess.Popen[bytes]] = []


def _build_once(script: Path, build_dir: Path, names: Sequence[str]) -> Path:
    """Run *script* once per session (a no-op when its stamp is current); its *build_dir*.

    :raises ImagesUnavailable: when it fails, or leaves one of *names* missing (again on
        every later call, without running it again).
    """
    done = _built.get(script)
    if isinstance(done, Path):
        return done
    if isinstance(done, str):
        raise ImagesUnavailable(done)
    try:
        proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                              timeout=900, check=False)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as err:
        _built[script] = f"{script} failed to run: {err}"
        raise ImagesUnavailable(_built[script]) from err
    if proc.returncode != 0:
        _built[script] = (proc.stderr or proc.stdout).strip() or f"exit status {proc.returncode}"
        raise ImagesUnavailable(_built[script])
    for name in names:
        if not (build_dir / name).is_file():
            _built[script] = f"{script} succeeded but left no {build_dir / name}"
            raise ImagesUnavailable(_built[script])
    _built[script] = build_dir
    return build_dir


def images_dir() -> Path:
    """The directory holding ``vmlinuz`` and ``initramfs.img``, built once per session.

    :raises ImagesUnavailable: when build.py fails (its message says what is missing).
    """
    names = ("vmlinuz", "initramfs.img", "initramfs-agent.img")
    return _build_once(BUILD_SCRIPT, BUILD_SCRIPT.parent / "build", names)


def systemd_images_dir() -> Path:
    """The directory holding the systemd guest's ``root.qcow2`` and ``initramfs.img``.

    Built once per session by build_systemd.py (a no-op when its stamp is current).

    :raises ImagesUnavailable: when the build fails (its message says what is missing).
    """
    images_dir()  # the kernel, and the busybox build's error first if that fails
    build_dir = SYSTEMD_BUILD_SCRIPT.parent / "build" / "systemd"
    return _build_once(SYSTEMD_BUILD_SCRIPT, build_dir, ("root.qcow2", "initramfs.img"))


def qemu_available() -> bool:
    """Whether :data:`QEMU_BINARY` is there (on PATH, or the path it names)."""
    return shutil.which(QEMU_BINARY) is not None


def _kvm_works(timeout: float = 4.0) -> bool:
    """Whether KVM really runs our guest kernel here (it printed its banner in ``timeout``).

    ``/dev/kvm`` can exist, open fine and even run the BIOS while the kernel makes
    no progress at all (so it is on this project's CI machines): only running the
    real kernel tells. Under TCG the banner comes in ~0.6 s, under KVM at once.
    """
    if not os.access("/dev/kvm", os.R_OK | os.W_OK) or not qemu_available():
        return False
    images = images_dir()
    with tempfile.TemporaryDirectory(prefix="qsd-kvm-probe-") as scratch:
        serial_log = Path(scratch) / "serial.log"
        proc = subprocess.Popen(
            [QEMU_BINARY, "-accel", "kvm", "-machine", "q35", "-m", "128", "-nodefaults",
             "-no-user-config", "-display", "none", "-no-reboot",
             "-serial", f"file:{serial_log}", "-kernel", str(images / "vmlinuz"),
             "-append", "earlyprintk=serial,ttyS0 console=ttyS0 panic=-1"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                with contextlib.suppress(FileNotFoundError):
                    if "Linux version" in serial_log.read_text(errors="replace"):
                        return True
                if proc.poll() is not None:
                    return False
                time.sleep(0.05)
            return False
        finally:
            proc.kill()
            proc.wait(timeout=10)


def _probe_cache_key() -> str:
    """Identifies this boot of the host and this QEMU and kernel (the probe's inputs)."""
    boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    qemu = shutil.which(QEMU_BINARY) or ""
    stamp = images_dir() / "stamp"
    parts = [
        boot_id,
        qemu,
        str(os.stat(qemu).st_mtime_ns) if qemu else "",
        stamp.read_text().strip() if stamp.is_file() else "",
    ]
    return " ".join(parts)


def accel_args() -> list[str]:
    """``["-accel", "kvm"]`` if KVM really works here, else ``["-accel", "tcg"]``.

    Probed once (the answer is cached in the build dir for this host boot);
    ``QSD_ACCEL=tcg`` or ``QSD_ACCEL=kvm`` in the environment skips the probe.
    """
    global _accel
    if _accel is None:
        forced = os.environ.get("QSD_ACCEL", "")
        if forced in ("kvm", "tcg"):
            _accel = ["-accel", forced]
        else:
            cache = images_dir() / "accel-probe"
            key = _probe_cache_key()
            with contextlib.suppress(OSError):
                cached_key, _, cached = cache.read_text().rpartition(" ")
                if cached_key == key and cached in ("kvm", "tcg"):
                    _accel = ["-accel", cached]
            if _accel is None:
                accel = "kvm" if _kvm_works() else "tcg"
                with contextlib.suppress(OSError):
                    cache.write_text(f"{key} {accel}")
                _accel = ["-accel", accel]
    return list(_accel)


# --------------------------------------------------------------------------- a guest


@attrs.frozen(eq=False)
class Guest:
    """One running (or finished) QEMU started by a :class:`GuestFactory`."""

    mode: str
    pid: int
    qmp_path: Path | None
    serial_log: Path
    workdir: Path
    popen: subprocess.Popen[bytes] = attrs.field(repr=False)
    argv: list[str] = attrs.field(repr=False)
    #: The guest agent's unix socket (``agent=True``), else None.
    agent_path: Path | None = None
    #: The qcow2 ext4 disk (``disk=True``), else None.
    disk_path: Path | None = None

    def serial_text(self) -> str:
        """Everything the guest printed on its serial console so far."""
        try:
            return self.serial_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def serial_lines(self, prefix: str = "QMPSHUTDOWN-GUEST-") -> list[str]:
        """The serial lines starting with ``prefix`` (the guest's own lines), stripped."""
        return [line.strip() for line in self.serial_text().splitlines() if line.startswith(prefix)]

    def stderr_text(self) -> str:
        """What QEMU wrote to its stderr so far."""
        try:
            return (self.workdir / "qemu.stderr").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def alive(self) -> bool:
        """Whether the QEMU process is still running."""
        return self.popen.poll() is None

    def describe(self, lines: int = 25) -> str:
        """The serial tail and QEMU's stderr, for failure messages."""
        tail = "\n".join(self.serial_text().splitlines()[-lines:])
        status = "running" if self.alive() else f"exited with {self.popen.returncode}"
        return (
            f"QEMU pid {self.pid} ({self.mode}) {status}\n"
            f"--- serial tail ---\n{tail}\n--- qemu stderr ---\n{self.stderr_text().strip()}"
        )

    async def wait_for_serial(self, text: str, timeout: float) -> None:
        """Wait until ``text`` appears on the serial console.

        :raises TimeoutError: after ``timeout`` seconds, or as soon as QEMU exited
            without printing it; the message holds the serial tail.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            exited = not self.alive()
            if text in self.serial_text():
                return
            if exited:
                raise TimeoutError(f"QEMU exited before printing {text!r}\n{self.describe()}")
            if loop.time() >= deadline:
                raise TimeoutError(f"{text!r} not on serial after {timeout} s\n{self.describe()}")
            await asyncio.sleep(POLL_INTERVAL)

    async def wait_exit(self, timeout: float) -> int:
        """Wait (without blocking the event loop) for QEMU to exit; return its exit status.

        :raises TimeoutError: if it is still running after ``timeout`` seconds.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (status := self.popen.poll()) is None:
            if loop.time() >= deadline:
                raise TimeoutError(f"QEMU still running after {timeout} s\n{self.describe()}")
            await asyncio.sleep(POLL_INTERVAL)
        return status


#: Every test guest's kernel arguments (after its consoles). ``no_timer_check``: on a crowded
#: host the kernel's boot-time check of the IO-APIC timer can miss its ticks under TCG and
#: panic ("IO-APIC + timer doesn't work!"; seen in CI). ``cryptomgr.notests``: no self-tests
#: of the kernel's crypto algorithms, half a second of TCG at every boot (``initcall_debug``:
#: ``crypto_algapi_init`` 0.49 s, the longest initcall; a cooperative guest's boot to READY,
#: QEMU 7.2, medians of 6 boots each: 5.9 -> 5.0 CPU-s). ``noreplace-smp``: a kernel on
#: one CPU rewrites every ``lock`` prefix of its text (and of each module it loads) to UP
#: code, 0.24 s of TCG per boot (``Freeing SMP alternatives memory`` came 0.21 s late).
KERNEL_ARGS = ("panic=0", "loglevel=4", "no_timer_check", "cryptomgr.notests", "noreplace-smp")
#: The kernel the test guests boot: the ELF build.py takes out of Debian's bzImage, which
#: QEMU starts at its PVH entry: no decompression under TCG. With ``noreplace-smp`` and the
#: initramfs not compressed, a plain guest's boot to READY took 1.33 CPU-s against 1.79 from
#: ``vmlinuz`` (QEMU 7.2, medians of 6 boots each, interleaved, an idle 2-core host; the table
#: in fixtures/qemu-images/README.md). Not for ``asleep``: woken from
#: S3, a kernel booted at its PVH entry booted again (QEMU 7.2: READY a second time) instead of
#: resuming, so that mode boots the bzImage (``vmlinuz``).
KERNEL = "vmlinux"


def kernel_for(mode: str) -> str:
    """The kernel file (in :func:`images_dir`) a guest in *mode* boots: see :data:`KERNEL`."""
    return "vmlinuz" if mode == "asleep" else KERNEL


def guest_argv(
    mode: str,
    *,
    workdir: Path,
    machine: str = "q35",
    arg: int | None = None,
    extra_args: Sequence[str] = (),
    qmp: bool = True,
    memory: int = 256,
    kernel_args: Sequence[str] = (),
    agent: bool = False,
    disk: bool = False,
    display: bool = False,
) -> list[str]:
    """The QEMU command line for a test guest in ``mode`` (QMP socket at workdir/qmp.sock).

    :param agent: a virtserialport for qemu-ga, its chardev a unix socket at workdir/qga.sock.
    :param disk: attach workdir/disk.qcow2 (made by :func:`make_disk`) as virtio-blk.
    :param display: add ``-device VGA``, with the kernel console on tty0 as well as ttyS0.
    """
    if mode not in MODES:
        raise ValueError(f"unknown guest mode {mode!r}; one of {MODES}")
    images = images_dir()
    # ttyS0 last: /dev/console (init's output, the serial lines) stays on the serial port.
    consoles = ["console=tty0", "console=ttyS0"] if display else ["console=ttyS0"]
    append = [*consoles, *KERNEL_ARGS, f"qsd.mode={mode}"]
    if arg is not None:
        append.append(f"qsd.arg={int(arg)}")
    append += [f"qsd.{name}=1" for name, on in (("agent", agent), ("disk", disk),
                                                ("display", display)) if on]  # fmt: skip
    append.extend(kernel_args)
    argv = [
        QEMU_BINARY,
        *accel_args(),
        "-machine", machine,
        "-m", str(memory),
        "-nodefaults",
        "-no-user-config",
        "-display", "none",
        "-serial", f"file:{workdir / 'serial.log'}",
        "-kernel", str(images / kernel_for(mode)),
        # qemu-ga and its libraries make the initramfs 3.6x bigger: only when asked for.
        "-initrd", str(images / ("initramfs-agent.img" if agent else "initramfs.img")),
        "-append", " ".join(append),
    ]  # fmt: skip
    if qmp:
        argv += _qmp_args(workdir)
    if agent:
        argv += _agent_args(workdir)
    if disk:
        argv += [
            "-drive", f"file={workdir / 'disk.qcow2'},format=qcow2,if=none,id=disk0",
            "-device", "virtio-blk-pci,drive=disk0",
        ]  # fmt: skip
    if display:
        argv += ["-device", "VGA"]
    argv.extend(extra_args)
    return argv


def _qmp_args(workdir: Path) -> list[str]:
    """QMP on workdir/qmp.sock (a server that does not wait for its client)."""
    return [
        "-chardev", f"socket,id=qmp,path={workdir / 'qmp.sock'},server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
    ]  # fmt: skip


def _agent_args(workdir: Path) -> list[str]:
    """The guest agent's virtio-serial port, on workdir/qga.sock."""
    return [
        "-chardev", f"socket,id=qga,path={workdir / 'qga.sock'},server=on,wait=off",
        "-device", "virtio-serial-pci,id=vser0",
        "-device", f"virtserialport,bus=vser0.0,chardev=qga,name={AGENT_PORT_NAME}",
    ]  # fmt: skip


def systemd_guest_argv(
    scenario: str,
    *,
    workdir: Path,
    machine: str = "q35",
    extra_args: Sequence[str] = (),
    qmp: bool = True,
    memory: int = 512,
    kernel_args: Sequence[str] = (),
) -> list[str]:
    """The QEMU command line for the systemd guest in ``scenario``.

    The root disk (``build/systemd/root.qcow2``) is attached with ``snapshot=on``: the
    guest's writes go to a temporary overlay and the image is never modified. qemu-ga is
    always there: its socket is workdir/qga.sock.
    """
    if scenario not in SYSTEMD_SCENARIOS:
        raise ValueError(f"unknown systemd guest scenario {scenario!r}; one of {SYSTEMD_SCENARIOS}")
    images = systemd_images_dir()
    kernel = images_dir() / KERNEL
    append = ["console=ttyS0", *KERNEL_ARGS, f"qsd.scenario={scenario}", *kernel_args]
    argv = [
        QEMU_BINARY,
        *accel_args(),
        "-machine", machine,
        "-m", str(memory),
        "-nodefaults",
        "-no-user-config",
        "-display", "none",
        "-serial", f"file:{workdir / 'serial.log'}",
        "-kernel", str(kernel),
        "-initrd", str(images / "initramfs.img"),
        "-append", " ".join(append),
        "-drive", f"file={images / 'root.qcow2'},format=qcow2,if=none,id=root,snapshot=on",
        "-device", "virtio-blk-pci,drive=root",
        *_agent_args(workdir),
    ]  # fmt: skip
    if qmp:
        argv += _qmp_args(workdir)
    argv.extend(extra_args)
    return argv


# --------------------------------------------------------------------------- the factory


class GuestFactory:
    """Starts test guests under ``root`` and kills them all in :meth:`cleanup`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.guests: list[Guest] = []
        self._files: list[IO[bytes]] = []
        self._count = 0

    async def boot(
        self,
        mode: str,
        *,
        machine: str = "q35",
        arg: int | None = None,
        extra_args: Sequence[str] = (),
        qmp: bool = True,
        wait_ready: bool = True,
        ready_timeout: float = 60.0,
        memory: int = 256,
        kernel_args: Sequence[str] = (),
        agent: bool = False,
        disk: bool = False,
        display: bool = False,
        systemd: bool = False,
        restore: bool = True,
    ) -> Guest:
        """Start QEMU with a guest in ``mode``; return once it is ready.

        A guest of a kind booted before (same QEMU, images and command line) is
        restored from the state its first boot saved at READY, unless *restore* is
        False or its options rule it out (see :mod:`support.saved`).

        With ``systemd=True`` the guest is the systemd one and ``mode`` one of
        :data:`SYSTEMD_SCENARIOS` (see :meth:`boot_systemd`; ``arg``, ``agent``, ``disk``
        and ``display`` do not apply, and a ``ready_timeout`` below
        :data:`SYSTEMD_READY_TIMEOUT` is raised to it).

        Waits for the QMP socket, then (if ``wait_ready`` and the guest can run,
        i.e. no ``-S``) for the READY line, which means the button handler listens
        (and the agent and the disk are up, if asked for: see :func:`guest_argv`).

        :raises RuntimeError: if QEMU exits during the boot (the message holds its stderr).
        :raises TimeoutError: if the socket or READY line does not come in time.
        """
        if systemd:
            if arg is not None or agent or disk or display:
                raise ValueError("systemd=True takes no arg, agent, disk or display")
            return await self.boot_systemd(
                mode, machine=machine, extra_args=extra_args, qmp=qmp, wait_ready=wait_ready,
                ready_timeout=max(ready_timeout, SYSTEMD_READY_TIMEOUT),
                memory=max(memory, 512), kernel_args=kernel_args,
            )  # fmt: skip
        self._count += 1
        workdir = self.root / f"guest{self._count}-{mode}"
        workdir.mkdir(parents=True)
        restoring = restore and saved.restorable(
            mode, qmp=qmp, wait_ready=wait_ready, extra_args=extra_args, kernel_args=kernel_args
        )  # fmt: skip
        if disk and not restoring:  # a restored guest gets a copy of its kind's saved disk
            await asyncio.to_thread(make_disk, workdir / "disk.qcow2")
        argv = guest_argv(
            mode, workdir=workdir, machine=machine, arg=arg, extra_args=extra_args,
            qmp=qmp, memory=memory, kernel_args=kernel_args, agent=agent, disk=disk,
            display=display,
        )  # fmt: skip
        if restoring:
            again = {"machine": machine, "arg": arg, "memory": memory, "agent": agent,
                     "disk": disk, "display": display, "ready_timeout": ready_timeout}  # fmt: skip
            return await self._restore(mode, argv, workdir, again)
        return await self._start(
            mode, argv, workdir, qmp=qmp, agent=agent, disk=disk, wait_ready=wait_ready,
            ready_line=f"{READY_PREFIX} mode={mode}", ready_timeout=ready_timeout,
            extra_args=extra_args,
        )  # fmt: skip

    async def _restore(
        self, mode: str, argv: list[str], workdir: Path, again: dict[str, Any]
    ) -> Guest:
        """Start a guest of *argv*'s kind from its saved state (booting its first one if need be).

        :param again: ``boot()``'s keywords for the kind's first boot.
        """
        images = images_dir()
        initrd = "initramfs-agent.img" if again["agent"] else "initramfs.img"
        # A disk's kind is also how make_disk() makes it (its size and its code).
        disk = [f"{DISK_SIZE_MIB} MiB\n{inspect.getsource(make_disk)}"] if again["disk"] else []
        kind = saved.kind_of(argv, workdir, [images / kernel_for(mode), images / initrd], disk)
        firsts: list[GuestFactory] = []

        async def first(directory: Path) -> Guest:
            firsts.append(GuestFactory(directory))
            return await firsts[0].boot(mode, restore=False, **again)

        def end() -> None:
            for factory in firsts:
                factory.cleanup()

        state, serial = await saved.state_of(images / "states", kind, first, end)
        shutil.copyfile(serial, workdir / "serial.log")
        if again["disk"]:
            await asyncio.to_thread(shutil.copyfile, saved.disk_of(state), workdir / "disk.qcow2")
        guest = await self._start(
            mode, saved.restoring_argv(argv, state), workdir, qmp=True, agent=again["agent"],
            disk=again["disk"], wait_ready=False, ready_line="",
            ready_timeout=again["ready_timeout"], extra_args=(),
        )  # fmt: skip
        assert guest.qmp_path is not None
        try:
            await saved.wait_running(guest.qmp_path, again["ready_timeout"], guest.alive)
        except (RuntimeError, TimeoutError, OSError) as err:
            raise RuntimeError(f"restoring {mode} from {state}: {err}\n{guest.describe()}") from err
        return guest

    async def boot_systemd(
        self,
        scenario: str,
        *,
        machine: str = "q35",
        extra_args: Sequence[str] = (),
        qmp: bool = True,
        wait_ready: bool = True,
        ready_timeout: float = SYSTEMD_READY_TIMEOUT,
        memory: int = 512,
        kernel_args: Sequence[str] = (),
    ) -> Guest:
        """Start the systemd guest (Debian 12, systemd, logind, udev, qemu-ga) in ``scenario``.

        Returns once ``QMPSHUTDOWN-GUEST-READY scenario=<scenario>`` is on the serial
        console: qemu-ga holds its port open (its socket is ``Guest.agent_path``), logind
        holds the power button open and the scenario is in place. ``Guest.mode`` is the
        scenario. Killed and reaped by :meth:`cleanup` like every guest.
        """
        self._count += 1
        workdir = self.root / f"guest{self._count}-{scenario}"  # short: unix socket paths
        workdir.mkdir(parents=True)
        argv = systemd_guest_argv(
            scenario, workdir=workdir, machine=machine, extra_args=extra_args, qmp=qmp,
            memory=memory, kernel_args=kernel_args,
        )  # fmt: skip
        return await self._start(
            scenario, argv, workdir, qmp=qmp, agent=True, disk=False, wait_ready=wait_ready,
            ready_line=f"{READY_PREFIX} scenario={scenario}", ready_timeout=ready_timeout,
            extra_args=extra_args,
        )  # fmt: skip

    async def _start(
        self,
        mode: str,
        argv: list[str],
        workdir: Path,
        *,
        qmp: bool,
        agent: bool,
        disk: bool,
        wait_ready: bool,
        ready_line: str,
        ready_timeout: float,
        extra_args: Sequence[str],
    ) -> Guest:
        popen = self._spawn(argv, workdir)
        _started.append(popen)
        guest = Guest(
            mode=mode,
            pid=popen.pid,
            qmp_path=workdir / "qmp.sock" if qmp else None,
            serial_log=workdir / "serial.log",
            workdir=workdir,
            popen=popen,
            argv=argv,
            agent_path=workdir / "qga.sock" if agent else None,
            disk_path=workdir / "disk.qcow2" if disk else None,
        )
        self.guests.append(guest)

        loop = asyncio.get_running_loop()
        deadline = loop.time() + ready_timeout
        # QEMU binds the socket, then listens: a connect in between is refused (seen on a
        # crowded host). Wait for the listening socket, not only for its file.
        while guest.qmp_path is not None and not listening(guest.qmp_path):
            if not guest.alive():
                raise RuntimeError(f"QEMU exited during start-up\n{guest.describe()}")
            if loop.time() >= deadline:
                raise TimeoutError(f"no QMP socket after {ready_timeout} s\n{guest.describe()}")
            await asyncio.sleep(POLL_INTERVAL)
        # -S (or -incoming) keeps the vCPUs stopped: READY cannot come before a `cont`.
        if wait_ready and not {"-S", "-incoming"} & set(extra_args):
            try:
                await guest.wait_for_serial(ready_line, max(0.0, deadline - loop.time()))
            except TimeoutError as err:
                if not guest.alive():
                    raise RuntimeError(f"QEMU exited before READY\n{guest.describe()}") from err
                raise
        return guest

    async def boot_many(self, *specs: str | Mapping[str, Any]) -> list[Guest]:
        """Boot several guests in parallel; each spec is a mode or ``boot()``'s keyword args.

        All boots run to their end; then the first failure, if any, is raised.
        """
        calls = [self.boot(spec) if isinstance(spec, str) else self.boot(**spec) for spec in specs]
        results = await asyncio.gather(*calls, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return [result for result in results if isinstance(result, Guest)]

    def _spawn(self, argv: list[str], workdir: Path) -> subprocess.Popen[bytes]:
        """Start QEMU with its stdout/stderr in workdir (fork+exec: quick, fine in a loop)."""
        stdout = open(workdir / "qemu.stdout", "wb")  # noqa: SIM115 -- closed in cleanup()
        stderr = open(workdir / "qemu.stderr", "wb")  # noqa: SIM115 -- closed in cleanup()
        self._files += [stdout, stderr]
        (workdir / "argv").write_text(" ".join(argv) + "\n")
        # A new session: a ^C in the terminal reaches pytest, not the guests behind its back.
        return subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, cwd=workdir,
            start_new_session=True,
        )  # fmt: skip

    def cleanup(self) -> None:
        """SIGKILL and reap every QEMU this factory started (bounded); idempotent."""
        for guest in self.guests:
            _kill_and_reap(guest.popen)
        for file in self._files:
            file.close()
        self._files.clear()


def _kill_and_reap(popen: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    if popen.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            popen.send_signal(signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        popen.wait(timeout=timeout)


def kill_leftovers() -> list[int]:
    """Kill every QEMU started in this process that still runs; return their pids."""
    leftovers = [popen.pid for popen in _started if popen.poll() is None]
    for popen in _started:
        _kill_and_reap(popen)
    return leftovers


def listening(path: Path) -> bool:
    """True once a unix socket at *path* listens (``/proc/net/unix``: __SO_ACCEPTCON)."""
    if not path.exists():
        return False
    wanted = os.fspath(path)
    try:
        with open("/proc/net/unix") as table:
            next(table)  # the header
            for line in table:
                fields = line.split()
                if len(fields) >= 8 and fields[7] == wanted and int(fields[3], 16) & 0x10000:
                    return True
    except (OSError, ValueError, StopIteration):
        return True  # cannot tell: the file's existence is all there is
    return False


# --------------------------------------------------------------------------- QMP helpers


async def qmp_connect(path: Path | str, limit: float = 5.0) -> Any:
    """A qemu.qmp client connected to *path* (bounded), for a test's own commands."""
    from qemu.qmp import QMPClient

    client = QMPClient("test")
    await asyncio.wait_for(client.connect(str(path)), limit)
    return client


async def qmp_disconnect(client: Any) -> None:
    """Disconnect a test's client, bounded; QEMU having exited under it is fine."""
    with contextlib.suppress(EOFError, OSError, asyncio.TimeoutError):
        await asyncio.wait_for(asyncio.shield(client.disconnect()), 5.0)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# --------------------------------------------------------------------------- the disk


def _tool(
    argv: list[str], what: str, ok: tuple[int, ...] = (0,)
) -> subprocess.CompletedProcess[str]:
    """Run a host tool (bounded); raise RuntimeError with its output unless its status is ok."""
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    except FileNotFoundError as err:
        raise RuntimeError(
            f"{what}: {argv[0]} not found (bash .ci/setup installs qemu-utils and e2fsprogs)"
        ) from err
    if proc.returncode not in ok:
        raise RuntimeError(f"{what}: {' '.join(argv)} exited {proc.returncode}: {proc.stderr}")
    return proc


def make_disk(path: Path, size_mib: int = DISK_SIZE_MIB) -> Path:
    """Make an empty ext4 filesystem (label ``qsd-disk``) as a qcow2 image at ``path``.

    mkfs.ext4 writes a raw file (it cannot write qcow2), then qemu-img converts it.
    The inode tables and journal are initialised now, so the guest's kernel has no
    lazy-init thread writing behind the test's back.
    """
    raw = path.with_suffix(".raw")
    with open(raw, "wb") as file:
        file.truncate(size_mib * 1024 * 1024)
    try:
        _tool(
            ["mkfs.ext4", "-q", "-F", "-L", "qsd-disk",
             "-E", "lazy_itable_init=0,lazy_journal_init=0", str(raw)],
            "making the test disk",
        )  # fmt: skip
        _tool(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(path)],
              "converting the test disk to qcow2")  # fmt: skip
    finally:
        raw.unlink(missing_ok=True)
    return path


@attrs.frozen
class DiskState:
    """What a test disk holds after QEMU exited, read from a raw copy, nothing replayed."""

    #: ext4 says the journal must be replayed (``needs_recovery``: not cleanly unmounted
    #: or frozen).
    needs_recovery: bool
    #: ``e2fsck -fn`` (read-only, no replay) exited 0. It does so for a disk that needs
    #: recovery too (it warns that it skips the replay): read ``needs_recovery`` for that.
    fsck_clean: bool
    #: The integer in ``/counter`` as it sits in place, or None if missing or empty.
    counter: int | None
    #: ``dumpe2fs -h`` output, for failure messages.
    header: str = attrs.field(repr=False)


def inspect_disk(path: Path) -> DiskState:
    """Read a test disk (qcow2) after its QEMU exited: journal state and counter.

    Works on a raw copy (``qemu-img convert -O raw``) so nothing touches the image;
    debugfs reads ``/counter`` without replaying the journal.
    """
    raw = path.with_name(path.stem + "-inspect.raw")
    _tool(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(path), str(raw)],
          "copying the test disk to raw")  # fmt: skip
    try:
        header = _tool(["dumpe2fs", "-h", str(raw)], "reading the ext4 superblock").stdout
        features = re.search(r"^Filesystem features:(.*)$", header, re.MULTILINE)
        needs_recovery = features is not None and "needs_recovery" in features.group(1).split()
        fsck = _tool(["e2fsck", "-fn", str(raw)], "checking the disk", ok=(0, 1, 2, 4, 8, 12))
        cat = _tool(["debugfs", "-R", "cat /counter", str(raw)], "reading /counter")
        text = cat.stdout.strip()
        return DiskState(
            needs_recovery=needs_recovery,
            fsck_clean=fsck.returncode == 0,
            counter=int(text) if text.isdigit() else None,
            header=header,
        )
    finally:
        raw.unlink(missing_ok=True)


# --------------------------------------------------------------------------- the guest agent


class RawAgent:
    """A minimal qemu-ga client over the guest's agent socket (no greeting, no capabilities).

    The agent may hold stale bytes from a previous client: :meth:`connect` resyncs with
    ``guest-sync-delimited``, whose reply comes after a 0xFF byte (everything before it
    is discarded). Every read is bounded.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    @classmethod
    async def connect(cls, path: Path, timeout: float = 10.0) -> RawAgent:
        """Connect and resync.

        :raises TimeoutError: if the agent does not answer ``guest-sync-delimited`` in time
            (a socket whose agent is not running accepts and never answers).
        """
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), timeout)
        agent = cls(reader, writer)
        try:
            token = int.from_bytes(os.urandom(4), "big") >> 1
            agent._send("guest-sync-delimited", {"id": token})
            await asyncio.wait_for(reader.readuntil(b"\xff"), timeout)
            while True:
                reply = await agent._read(timeout)
                if reply.get("return") == token:
                    return agent
        except BaseException:
            writer.close()
            raise

    def _send(self, command: str, arguments: Mapping[str, Any] | None = None) -> None:
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = dict(arguments)
        self._writer.write(json.dumps(request).encode() + b"\n")

    async def _read(self, timeout: float) -> dict[str, Any]:
        line = await asyncio.wait_for(self._reader.readline(), timeout)
        if not line:
            raise EOFError("agent socket closed")
        message: dict[str, Any] = json.loads(line.lstrip(b"\xff"))
        return message

    async def call(self, command: str, timeout: float = 10.0, **arguments: Any) -> dict[str, Any]:
        """Send a command and return the whole reply (``{"return": ...}`` or ``{"error": ...}``)."""
        self._send(command, arguments)
        await asyncio.wait_for(self._writer.drain(), timeout)
        return await self._read(timeout)

    async def execute(self, command: str, timeout: float = 10.0, **arguments: Any) -> Any:
        """Send a command and return its ``return`` value; an error reply raises RuntimeError."""
        reply = await self.call(command, timeout, **arguments)
        if "error" in reply:
            raise RuntimeError(f"{command}: {reply['error']}")
        return reply["return"]

    async def send_no_reply(self, command: str, **arguments: Any) -> None:
        """Send a command that never answers (``guest-shutdown``)."""
        self._send(command, arguments)
        await asyncio.wait_for(self._writer.drain(), 10.0)

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(OSError, asyncio.TimeoutError):
            await asyncio.wait_for(self._writer.wait_closed(), 5.0)


@attrs.frozen
class ExecResult:
    """What ``guest-exec`` (with ``capture-output``) and ``guest-exec-status`` gave back."""

    argv: tuple[str, ...]
    exitcode: int | None
    stdout: str
    stderr: str
    #: The last ``guest-exec-status`` reply's ``return``, as the agent sent it.
    status: dict[str, Any]


async def guest_exec(agent: RawAgent, argv: Sequence[str], timeout: float = 60.0) -> ExecResult:
    """Run ``argv`` in the guest through the agent, wait for it to end, decode its output.

    :raises RuntimeError: if the agent refuses (e.g. ``guest-exec`` disabled).
    :raises TimeoutError: if the command still runs after ``timeout`` seconds.
    """
    import base64

    started = await agent.execute(
        "guest-exec", path=argv[0], arg=list(argv[1:]), **{"capture-output": True}
    )
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        status: dict[str, Any] = await agent.execute("guest-exec-status", pid=started["pid"])
        if status.get("exited"):
            break
        if loop.time() >= deadline:
            raise TimeoutError(f"{list(argv)} still running in the guest after {timeout} s")
        await asyncio.sleep(0.1)

    def text(key: str) -> str:
        return base64.b64decode(status.get(key, "")).decode("utf-8", "replace")

    return ExecResult(tuple(argv), status.get("exitcode"), text("out-data"), text("err-data"),
                      status)  # fmt: skip


# --------------------------------------------------------------------------- PNG


def decode_png(data: bytes) -> tuple[int, int, list[bytes]]:
    """Width, height and unfiltered rows of an 8-bit RGB/RGBA PNG (no interlace)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    offset, idat = 8, b""
    width = height = bpp = 0
    while offset < len(data):
        (length,) = struct.unpack_from(">I", data, offset)
        kind = data[offset + 4 : offset + 8]
        body = data[offset + 8 : offset + 8 + length]
        offset += 12 + length
        if kind == b"IHDR":
            width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert (depth, interlace) == (8, 0) and colour in (2, 6), body
            bpp = 3 if colour == 2 else 4
        elif kind == b"IDAT":
            idat += body
    raw = zlib.decompress(idat)
    stride = width * bpp
    rows: list[bytes] = []
    prior = bytearray(stride)
    for y in range(height):
        start = y * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1 : start + 1 + stride])
        for x in range(stride):
            left = line[x - bpp] if x >= bpp else 0
            up, up_left = prior[x], prior[x - bpp] if x >= bpp else 0
            if kind == 1:
                line[x] = (line[x] + left) & 0xFF
            elif kind == 2:
                line[x] = (line[x] + up) & 0xFF
            elif kind == 3:
                line[x] = (line[x] + (left + up) // 2) & 0xFF
            elif kind == 4:
                p = left + up - up_left
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - up_left)
                pred = left if pa <= pb and pa <= pc else up if pb <= pc else up_left
                line[x] = (line[x] + pred) & 0xFF
        rows.append(bytes(line))
        prior = line
    return width, height, rows
