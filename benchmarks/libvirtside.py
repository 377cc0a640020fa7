"""The libvirt column: the same fixture guest as a libvirt domain, stopped the libvirt way.

Domains are named ``qsd-bench-<mode>``, defined once (type ``qemu``, i.e.
TCG, the fixture kernel, initramfs and command line, 256 MiB, serial to a
file, ``on_poweroff`` destroy) and started for every run. :meth:`Libvirt.close`
destroys and undefines every ``qsd-bench-`` domain, also ones an earlier,
crashed run left behind.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import threading
import time
from pathlib import Path
from xml.sax.saxutils import escape

PREFIX = "qsd-bench-"


def _xml(name: str, images: Path, mode: str, serial_log: Path, memory_mib: int) -> str:
    cmdline = f"console=ttyS0 panic=0 loglevel=4 qsd.mode={mode}"
    # The system QEMU, not QMPSHUTDOWN_QEMU: libvirt probes and caches its emulator's
    # capabilities, and a wrapper script that adds -L is not what it expects there.
    emulator = shutil.which("qemu-system-x86_64") or "/usr/bin/qemu-system-x86_64"
    return f"""<domain type='qemu'>
  <name>{escape(name)}</name>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{escape(str(images / "vmlinuz"))}</kernel>
    <initrd>{escape(str(images / "initramfs.img"))}</initrd>
    <cmdline>{escape(cmdline)}</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{escape(emulator)}</emulator>
    <controller type='usb' model='none'/>
    <serial type='file'>
      <source path='{escape(str(serial_log))}'/>
      <target port='0'/>
    </serial>
    <memballoon model='none'/>
  </devices>
</domain>
"""


class Libvirt:
    """A connection to the system libvirtd with a lifecycle-event loop thread."""

    def __init__(self, images: Path, memory_mib: int = 256) -> None:
        import libvirt  # only when the libvirt column is wanted

        self.libvirt = libvirt
        self.images = images
        self.memory_mib = memory_mib
        self.workdir = Path(tempfile.mkdtemp(prefix="qsd-bench-libvirt-"))
        self._stopped: dict[str, tuple[float, int]] = {}
        self._stopped_cond = threading.Condition()
        self._running = True
        libvirt.virEventRegisterDefaultImpl()  # before the connection is opened
        self._thread = threading.Thread(target=self._event_loop, daemon=True, name="libvirt")
        self._thread.start()
        self.conn = libvirt.open("qemu:///system")
        self._timer = libvirt.virEventAddTimeout(100, lambda *_: None, None)
        self._callback = self.conn.domainEventRegisterAny(
            None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, None
        )
        self.remove_leftovers()
        self.domains: dict[str, object] = {}

    # ---- versions -----------------------------------------------------------------

    def versions(self) -> str:
        def ver(n: int) -> str:
            return f"{n // 1000000}.{n // 1000 % 1000}.{n % 1000}"

        return (
            f"libvirtd {ver(self.conn.getLibVersion())}, "
            f"libvirt-python {ver(self.libvirt.getVersion())}"
        )

    # ---- events -------------------------------------------------------------------

    def _event_loop(self) -> None:
        while self._running:
            self.libvirt.virEventRunDefaultImpl()

    def _on_lifecycle(
        self, conn: object, dom: object, event: int, detail: int, opaque: object
    ) -> None:
        if event == self.libvirt.VIR_DOMAIN_EVENT_STOPPED:
            now = time.perf_counter()
            with self._stopped_cond:
                self._stopped[dom.name()] = (now, detail)  # type: ignore[attr-defined]
                self._stopped_cond.notify_all()

    def wait_stopped(self, name: str, timeout: float) -> tuple[float, int] | None:
        """The perf_counter time and detail of *name*'s STOPPED event, or None after *timeout*."""
        end = time.monotonic() + timeout
        with self._stopped_cond:
            while name not in self._stopped:
                left = end - time.monotonic()
                if left <= 0:
                    return None
                self._stopped_cond.wait(left)
            return self._stopped[name]

    # ---- domains -----------------------------------------------------------------

    def serial_log(self, mode: str) -> Path:
        return self.workdir / f"{mode}.serial.log"

    def domain(self, mode: str) -> object:
        name = PREFIX + mode
        if name not in self.domains:
            xml = _xml(name, self.images, mode, self.serial_log(mode), self.memory_mib)
            self.domains[name] = self.conn.defineXML(xml)
        return self.domains[name]

    def start(self, mode: str, ready_timeout: float = 90.0) -> object:
        """Start the ``qsd-bench-<mode>`` domain; return it once the guest printed READY."""
        dom = self.domain(mode)
        log = self.serial_log(mode)
        with contextlib.suppress(FileNotFoundError):
            log.unlink()
        with self._stopped_cond:
            self._stopped.pop(PREFIX + mode, None)
        dom.create()  # type: ignore[attr-defined]
        ready = f"QMPSHUTDOWN-GUEST-READY mode={mode}"
        end = time.monotonic() + ready_timeout
        while True:
            with contextlib.suppress(FileNotFoundError):
                if ready in log.read_text(errors="replace"):
                    return dom
            if not dom.isActive():  # type: ignore[attr-defined]
                raise RuntimeError(f"libvirt domain {PREFIX + mode} stopped before READY")
            if time.monotonic() > end:
                raise TimeoutError(f"libvirt domain {PREFIX + mode}: no READY in {ready_timeout} s")
            time.sleep(0.03)

    def remove_leftovers(self) -> None:
        """Destroy and undefine every ``qsd-bench-`` domain (ours, or a crashed run's)."""
        lv = self.libvirt
        for dom in self.conn.listAllDomains():
            if not dom.name().startswith(PREFIX):
                continue
            with contextlib.suppress(lv.libvirtError):
                if dom.isActive():
                    dom.destroy()
            with contextlib.suppress(lv.libvirtError):
                dom.undefine()

    def close(self) -> None:
        try:
            self.remove_leftovers()
        finally:
            with contextlib.suppress(Exception):
                self.conn.domainEventDeregisterAny(self._callback)
            with contextlib.suppress(Exception):
                self.libvirt.virEventRemoveTimeout(self._timer)
            self._running = False
            self._thread.join(timeout=2)
            with contextlib.suppress(Exception):
                self.conn.close()
            shutil.rmtree(self.workdir, ignore_errors=True)


def stop(
    lv: Libvirt, dom: object, grace: float | None = None, limit: float = 60.0
) -> tuple[float, str]:
    """Stop *dom* the libvirt way; return (perf_counter when the caller knew, how it ended).

    ``dom.shutdown()`` (the ACPI button), then the lifecycle STOPPED event; with
    *grace*, after that many seconds without STOPPED, ``dom.destroy()``.
    """
    name = dom.name()  # type: ignore[attr-defined]
    dom.shutdown()  # type: ignore[attr-defined]
    wait = limit if grace is None else grace
    stopped = lv.wait_stopped(name, wait)
    if stopped is not None:
        return stopped[0], f"stopped (detail {stopped[1]})"
    if grace is None:
        raise TimeoutError(f"{name}: no STOPPED event within {limit} s")
    dom.destroy()  # type: ignore[attr-defined]  # returns once QEMU is gone
    return time.perf_counter(), "destroyed"
