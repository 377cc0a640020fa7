"""Where one cooperative stop's CPU goes, step by step, against the bare qemu.qmp client's:
a CPU clock read at each step's start and end, no profiler.

    .venv/bin/python benchmarks/cpu_timeline.py [--stops 300] [--delay-ms 5] [--against DIR]...

cProfile (``phases.py``) charges every Python call the profiler's own cost, so it
overstates code made of many small calls (anyio's scopes, attrs' validators).
Here the library runs unprofiled: ``stepclock.py`` wraps ten of its functions
(a few microseconds each) and reads ``time.thread_time`` as each starts and
ends; the bare client (``bareqmp.py``) marks its own steps. Between two marks
is what ran then, whoever's code it was (qemu.qmp's reader, the event loop).
Stand-in QEMUs (tests/support/fakeqemu.py, pinned like QEMU), one stop at a
time, the clients in rotation, default policy, ``shutdown(path)``. Each row is
the median over the stops; the rows of a client add up to about its total.

A stop here runs on cold caches: a stand-in QEMU (a Python process) starts
right before it, as a real QEMU runs beside a real one. Code run once per
stop then costs far more than in a warm loop (``as_job`` 2 µs warm, about 40
µs here), so what counts is how much distinct code a stop runs.

``--against DIR`` (repeatable): the qmpshutdown package of another checkout
(DIR/qmpshutdown, or DIR itself when it is a package directory), imported under
another name in the same process (its imports are relative) and measured in the
same rotation: before and after, or copies with a piece taken out, free of the
drift between runs (the same code measured twice this way differs by about 1 %).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import ModuleType
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bareqmp  # noqa: E402
from phases import fake_binary, reap, spawn  # noqa: E402
from stepclock import Mark, Step, instrument  # noqa: E402

import qmpshutdown  # noqa: E402

#: The steps clocked, by a short name; a gap between two is named by both.
STEPS: list[Step] = [
    ("connect", "_connect", "connect_socket", None),
    ("pin", "_attach", "_pin_process", None),
    ("handshake", "_connect", "handshake", None),
    ("arrive", "_qemu", "arrive", "Qemu"),
    ("prepare", "_rungs.reboot", "prepare", "RebootAsShutdown"),
    ("press", "_qemu", "try_command", "Qemu"),
    ("gone", "_qemu", "mark_gone", "Qemu"),
    ("settle", "_qemu", "settle", "Qemu"),
    ("record", "_ladder", "record", None),
    ("close", "_monitor", "close", "QMPMonitor"),
]
#: What each step and the gaps before them are, for the table.
SAID = {
    "connect": "connect (the socket)",
    "pin": "SO_PEERCRED, the holder check, pidfd, /proc/PID/exe",
    "handshake": "greeting, capabilities + first commands, their replies, qemu.qmp's session",
    "arrive": "query-status (answered already)",
    "prepare": "the reboot action (answered already)",
    "press": "the press (system_powerdown through qemu.qmp)",
    "gone": "QEMU seen gone (the pidfd's callback)",
    "settle": "QEMU's last events",
    "record": "the record (verdict, result)",
    "close": "closing the monitor (qemu.qmp's disconnect)",
    "call → connect": "the Job, the plan",
    "connect → pin": "waiting for the greeting (the accept grace)",
    "pin → handshake": "the first commands (QEMU's command line: the reboot action)",
    "handshake → arrive": "the Qemu, the watch, listening",
    "arrive → prepare": "the ladder opens the power button's step",
    "prepare → press": "the step's waits, the sampler's timer",
    "press → gone": "POWERDOWN, SHUTDOWN, the exit's wake-up",
    "gone → settle": "the waits end, the step's end, the ladder unwinds, finishes",
    "settle → record": "",
    "record → close": "",
    "close → return": "",
}


class Client:
    """One way to stop a stand-in: its name, its stop, and its marks for the last stop."""

    def __init__(
        self,
        name: str,
        stop: Callable[[str], Awaitable[Any]],
        cut: Callable[[list[Mark], float, float], list[tuple[str, float]]],
    ) -> None:
        self.name = name
        self.stop = stop
        self.cut = cut
        self.marks: list[Mark] = []
        self.rows: dict[str, list[float]] = {}
        self.order: dict[str, list[int]] = {}
        self.totals: list[float] = []

    async def once(self, path: str, keep: bool) -> None:
        self.marks.clear()
        start = time.thread_time()
        await self.stop(path)
        end = time.thread_time()
        if keep:
            self.totals.append(end - start)
            for index, (label, took) in enumerate(self.cut(self.marks, start, end)):
                self.rows.setdefault(label, []).append(took)
                self.order.setdefault(label, []).append(index)


def segments(marks: list[Mark], start: float, end: float) -> list[tuple[str, float]]:
    """The CPU from the call to the return, cut at each step's first start and end."""
    seen: set[str] = set()
    cuts: list[tuple[float, str, str]] = []  # (clock, step, "start" or "end")
    for label, begun, ended in sorted(marks, key=lambda mark: mark[1]):
        if label not in seen:
            seen.add(label)
            cuts += [(begun, label, "start"), (ended, label, "end")]
    cuts.sort(key=lambda cut: cut[0])
    out = []
    previous, at = "call", start
    for clock, label, edge in cuts:
        name = label if edge == "end" else f"{previous} → {label}"
        out.append((name, clock - at))
        previous, at = label, clock
    out.append((f"{previous} → return", end - at))
    return out


def instants(marks: list[Mark], start: float, end: float) -> list[tuple[str, float]]:
    """The CPU from the call to each step's end in turn (the bare client's marks)."""
    out, at = [], start
    for label, ended, _ in marks:
        out.append((label, ended - at))
        at = ended
    return [*out, ("→ return", end - at)]


def bare_client() -> Client:
    marks: list[Mark] = []

    def mark(step: str) -> None:
        now = time.thread_time()
        marks.append((step, now, now))

    async def stop(path: str) -> None:
        await bareqmp.stop(path, mark=mark)

    client = Client("bare qemu.qmp", stop, instants)
    client.marks = marks
    return client


def library_client(name: str, package: ModuleType) -> Client:
    client = Client(name, lambda path: package.shutdown(path), segments)
    instrument(STEPS, client.marks, time.thread_time, package.__name__)
    return client


def load_against(where: str, scratch: Path, number: int) -> ModuleType:
    """DIR/qmpshutdown (or DIR itself, a package directory) imported as
    ``qmpshutdown_againstN``."""
    source = Path(where) / "qmpshutdown"
    name = f"qmpshutdown_against{number}"
    shutil.copytree(source if source.is_dir() else Path(where), scratch / name,
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    if str(scratch) not in sys.path:
        sys.path.insert(0, str(scratch))
    return importlib.import_module(name)


def table(client: Client) -> None:
    print(f"\n| {client.name}: step | CPU, ms (median) | what |")
    print("|---|---|---|")
    labels = sorted(client.rows, key=lambda label: statistics.median(client.order[label]))
    for label in labels:
        values = client.rows[label]
        count = "" if len(values) == len(client.totals) else f" ({len(values)} stops)"
        name = label if " → " not in label else f"· {label}"
        print(f"| {name}{count} | {statistics.median(values) * 1e3:.3f} | "
              f"{SAID.get(label, '')} |")  # fmt: skip
    print(f"| **the whole stop** | {statistics.median(client.totals) * 1e3:.3f} | |")


async def main(args: argparse.Namespace) -> None:
    scratch = Path(tempfile.mkdtemp(prefix="qsd-cpu-timeline-"))
    try:
        clients = [bare_client(), library_client(f"qmpshutdown {qmpshutdown.__version__}",
                                                 qmpshutdown)]  # fmt: skip
        for number, where in enumerate(args.against):
            other = load_against(where, scratch, number)
            clients.append(library_client(f"qmpshutdown from {where}", other))
        binary = fake_binary(scratch)
        for index in range(args.stops + 10):  # 10 to warm up
            turn = index % len(clients)
            for number, client in enumerate(clients[turn:] + clients[:turn]):
                path = scratch / f"s{index}-{number}.sock"
                proc = spawn(binary, path, args.delay_ms)
                try:
                    await client.once(str(path), keep=index >= 10)
                finally:
                    reap(proc)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    bare = statistics.median(clients[0].totals)
    print(f"CPU per cooperative stop, median of {args.stops}, stand-in QEMUs:", end="")
    for client in clients:
        total = statistics.median(client.totals)
        print(f" {client.name} {total * 1e3:.3f} ms ({total / bare:.2f}x bare);", end="")
    print()
    for client in clients:
        table(client)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stops", type=int, default=300)
    parser.add_argument("--delay-ms", type=float, default=5.0)
    parser.add_argument("--against", metavar="DIR", action="append", default=[],
                        help="another checkout (or package directory), in the same run; "
                        "repeatable")
    asyncio.run(main(parser.parse_args()))
