"""What each byte sent to QEMU's monitor costs: a command's round trip against its length.

QEMU reads its QMP monitor one byte per turn of its main loop (its ``can_read``
callback allows one byte at a time; ``strace -e recvmsg`` on QEMU 7.2 and 10.0
shows one ``recvmsg`` of length 1 per byte). So the bytes a client sends before
the press delay the press, the library's included. This boots an idle QEMU
(``-machine none``, TCG), negotiates, then times ``query-status`` round trips
with ids padded to a given length, and fits the cost per byte.

    .venv/bin/python benchmarks/qmp_bytes.py [--qemu BINARY]... [--guest] [--runs 50]

Default: ``qemu-system-x86_64`` and, when built, the fixture's QEMU 10.0, idle;
``--guest`` also boots the fixture's cooperative guest (TCG) and measures its
QEMU while the guest runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
QEMU_10 = HERE.parent / "fixtures/qemu-images/build/qemu-10.0/bin/qemu-system-x86_64"
PADDING = (0, 100, 400, 1000)


def round_trips(binary: str, runs: int) -> tuple[str, dict[int, tuple[int, float]]]:
    """QEMU's version, and {id padding: (command bytes, median round trip in ms)} against
    it idle."""
    with tempfile.TemporaryDirectory(prefix="qsd-bytes-") as scratch:
        path = Path(scratch) / "qmp.sock"
        qemu = subprocess.Popen(
            [binary, "-machine", "none", "-accel", "tcg", "-display", "none", "-nodefaults",
             "-qmp", f"unix:{path},server=on,wait=off"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            end = time.monotonic() + 30
            while not path.exists():
                if time.monotonic() > end or qemu.poll() is not None:
                    raise RuntimeError(f"{binary} did not open its monitor")
                time.sleep(0.01)
            return measure(path, runs)
        finally:
            qemu.kill()
            qemu.wait(10)


def measure(path: Path, runs: int) -> tuple[str, dict[int, tuple[int, float]]]:
    """Over the QMP socket *path*: QEMU's version and the round trips by id padding."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(path))
        lines = sock.makefile("rb")
        version = json.loads(lines.readline())["QMP"]["version"]["qemu"]
        sock.sendall(b'{"execute":"qmp_capabilities"}')
        lines.readline()
        out: dict[int, tuple[int, float]] = {}
        for padding in PADDING:
            command = json.dumps(
                {"execute": "query-status", "id": "x" * padding}, separators=(",", ":")
            ).encode()
            times = []
            for _ in range(runs):
                start = time.perf_counter()
                sock.sendall(command)
                while b'"return"' not in lines.readline():
                    pass  # an event (a guest's RTC_CHANGE, ...)
                times.append(time.perf_counter() - start)
            out[padding] = (len(command), statistics.median(times) * 1000)
    return "{major}.{minor}.{micro}".format(**version), out


async def with_guest(runs: int) -> tuple[str, dict[int, tuple[int, float]]]:
    """The same against the fixture's cooperative guest, running (TCG), then stopped."""
    sys.path.insert(0, str(HERE.parent / "tests"))
    import qmpshutdown
    from support.guests import GuestFactory

    with tempfile.TemporaryDirectory(prefix="qsd-bytes-") as scratch:
        factory = GuestFactory(Path(scratch))
        try:
            (guest,) = await factory.boot_many({"mode": "cooperative", "memory": 192})
            name, found = measure(Path(guest.qmp_path), runs)
            await qmpshutdown.shutdown(guest.qmp_path)
            return f"{name}, a guest running", found
        finally:
            factory.cleanup()


def show(name: str, found: dict[int, tuple[int, float]]) -> None:
    for size, took in found.values():
        print(f"| {name} | {size} | {took:.3f} |")
    (small, fast), (large, slow) = found[PADDING[0]], found[PADDING[-1]]
    print(f"| {name}: per byte | | {(slow - fast) / (large - small) * 1000:.2f} us |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--qemu", action="append", help="an idle QEMU binary (repeatable)")
    parser.add_argument("--guest", action="store_true", help="also the cooperative guest")
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args()
    binaries = args.qemu or ["qemu-system-x86_64"] + ([str(QEMU_10)] if QEMU_10.exists() else [])
    print("| QEMU | command bytes | round trip (ms, median) |")
    print("|---|---|---|")
    for binary in binaries:
        show(*round_trips(binary, args.runs))
    if args.guest:
        show(*asyncio.run(with_guest(args.runs)))


if __name__ == "__main__":
    main()
