"""How long ``discover()`` takes: N fake QEMUs in a fake /proc, and this host's real /proc.

Each fake QEMU has a realistic command line (q35, -name guest=..., a -chardev
socket + -mon QMP monitor, an agent chardev and virtserialport, a disk); 300
other processes stand beside them (a host's usual daemons and shells), so the
figure includes telling QEMUs from the rest. Run: ``python benchmarks/discoverbench.py``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qmpshutdown._discover import scan

OTHERS = 300


def qemu_argv(index: int) -> list[str]:
    run = f"/run/vms/vm{index}"
    return [
        "/usr/bin/qemu-system-x86_64", "-name", f"guest=vm{index},debug-threads=on",
        "-machine", "q35,accel=kvm", "-m", "2048", "-smp", "2", "-nodefaults",
        "-chardev", f"socket,id=qmp,path={run}/qmp.sock,server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
        "-chardev", f"socket,id=qga0,path={run}/qga.sock,server=on,wait=off",
        "-device", "virtio-serial-pci,id=vser0",
        "-device", "virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0",
        "-drive", f"file=/var/lib/vms/vm{index}.qcow2,if=none,id=d0,format=qcow2",
        "-device", "virtio-blk-pci,drive=d0", "-display", "none", "-serial", f"file:{run}/console",
    ]  # fmt: skip


def fake_proc(root: Path, qemus: int) -> Path:
    proc = root / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "root").symlink_to("/")
    entries = [(qemu_argv(i), "/usr/bin/qemu-system-x86_64") for i in range(qemus)]
    entries += [(["/usr/sbin/sshd", "-D"], "/usr/sbin/sshd")] * OTHERS
    for pid, (argv, exe) in enumerate(entries, start=1000):
        entry = proc / str(pid)
        entry.mkdir()
        (entry / "cmdline").write_bytes(b"".join(a.encode() + b"\0" for a in argv))
        (entry / "exe").symlink_to(exe)
        (entry / "cwd").symlink_to("/")
        (entry / "root").symlink_to("/")
    return proc


def timed(proc: str, runs: int) -> tuple[float, float, int]:
    times, found = [], 0
    for _ in range(runs):
        started = time.perf_counter()
        found = len(scan(proc=proc))
        times.append(time.perf_counter() - started)
    return statistics.median(times), min(times), found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    print("| QEMUs | other processes | runs | median | min | found |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as scratch:
        for count in (10, 100):
            proc = fake_proc(Path(scratch) / str(count), count)
            median, best, found = timed(str(proc), args.runs)
            print(f"| {count} (fake /proc) | {OTHERS} | {args.runs} | {median * 1e3:.1f} ms "
                  f"| {best * 1e3:.1f} ms | {found} |")  # fmt: skip
    others = sum(1 for e in os.listdir("/proc") if e.isdigit())
    median, best, found = timed("/proc", args.runs)
    print(f"| this host's /proc | {others} processes | {args.runs} | {median * 1e3:.1f} ms "
          f"| {best * 1e3:.1f} ms | {found} |")  # fmt: skip


if __name__ == "__main__":
    main()
