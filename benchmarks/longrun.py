"""Days, not seconds (issue 14): thousands of stops in one process, and nothing piles up.

    .venv/bin/python benchmarks/longrun.py [--stops 2000] [--rounds 100] [--fleet 8]
                                           [--smoke] [--note TEXT] [--write]

One process and one event loop (``anyio.run``), like an orchestrator that runs
for weeks: ``qmpshutdown.shutdown(path, policy, pid=...)`` N times in a row,
then R rounds of ``shutdown_many`` over K VMs, each against fresh stand-in
QEMUs (fakeqemu.py run by a copy of the interpreter named ``qemu-system-fake``:
``fleetbench.FakeFleet``), every one reaped before the next starts. Measured
in this process, at the start, after a warm-up and at the end of each phase:
the resident set (VmRSS, after ``gc.collect()``), open descriptors
(/proc/self/fd), asyncio tasks alive besides the main one, threads, children
not reaped, objects the garbage collector tracks, the Python allocator's
blocks; and the CPU time of this process (``time.process_time``) per stop, in
blocks of 100, the first block against the last. Exits 1 when a target is
missed (``--smoke`` judges only descriptors, tasks, children and results: its
blocks are too small for memory and CPU). ``--write`` puts the section in
RESULTS.md (between markers). tests/test_longrun.py is the short version CI runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import re
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from array import array
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import anyio
from fleetbench import FakeFleet, write_section

import qmpshutdown
from qmpshutdown import Job, ShutdownPolicy, Stage

HERE = Path(__file__).resolve().parent
BEGIN, END = "<!-- longrun benchmark: begin -->", "<!-- longrun benchmark: end -->"
POLICY = ShutdownPolicy()
RSS_GROWTH_KIB = 1024  # after the warm-up, per phase
FLAT = 0.20  # CPU per stop, last block / first block (medians), within ±20 %
LOADS: list[float] = []  # the 1-minute load average after each block


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- this process


def rss_kib() -> int:
    match = re.search(r"^VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(match.group(1)) if match else 0


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))  # the listing's own descriptor counts, every time


def children() -> list[int]:
    """Our children still in the process table (zombies included: not yet reaped)."""
    pids: list[int] = []
    for task in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):
            pids += map(int, Path(f"/proc/self/task/{task}/children").read_text().split())
    return pids


def other_tasks() -> int:
    return len(asyncio.all_tasks() - {asyncio.current_task()})


@dataclass(frozen=True)
class Snapshot:
    rss_kib: int
    fds: int
    tasks: int
    threads: int
    children: int
    gc_objects: int
    py_blocks: int  # memory blocks the Python allocator has handed out (sys.getallocatedblocks)


def snapshot() -> Snapshot:
    # Descriptors and tasks before collecting: one that only a collection closes counts as held.
    fds, tasks = open_fds(), other_tasks()
    gc.collect()
    return Snapshot(
        rss_kib(), fds, tasks, threading.active_count(), len(children()),
        len(gc.get_objects()), sys.getallocatedblocks(),
    )  # fmt: skip


# ----------------------------------------------------------------------------- the phases


@dataclass
class Phase:
    """One phase's figures: CPU per VM, per unit (a stop or a round), and its snapshots."""

    name: str
    per_unit: int  # VMs per unit
    block: int  # units per CPU block
    # CPU per VM of each unit: the library call, and spawn + call + reap. Arrays filled in
    # place: no Python object per stop, so the memory blocks counted are the library's.
    call_cpu: array[float] = field(default_factory=lambda: array("d"))
    whole_cpu: array[float] = field(default_factory=lambda: array("d"))
    snaps: dict[str, Snapshot] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)  # not stopped, or not by the power button
    ungraceful: list[str] = field(default_factory=list)  # stopped so, yet graceful=False
    killed: int = 0  # fakes still running after the call said they were gone
    rss_series: list[int] = field(default_factory=list)  # KiB, after each block (collected)
    wall: float = 0.0


async def run_phase(
    phase: Phase,
    units: int,
    warmup: int,
    start_fleet: Callable[[int], FakeFleet],
    stop: Callable[[FakeFleet], Awaitable[Sequence[object]]],
) -> None:
    """Start a fresh fleet, stop it through *stop*, reap it; *units* times."""
    phase.call_cpu, phase.whole_cpu = array("d", bytes(8 * units)), array("d", bytes(8 * units))
    phase.snaps["start"] = snapshot()
    began = time.monotonic()
    for unit in range(units):
        c0 = time.process_time()
        fleet = start_fleet(phase.per_unit)
        try:
            c1 = time.process_time()
            try:
                outcome = await stop(fleet)
            except qmpshutdown.Error as err:
                outcome = [err]
            c2 = time.process_time()
        finally:
            alive = sum(proc.poll() is None for proc in fleet.procs)
            fleet.close()
        c3 = time.process_time()
        phase.killed += alive
        phase.call_cpu[unit] = (c2 - c1) / phase.per_unit
        phase.whole_cpu[unit] = (c3 - c0) / phase.per_unit
        for result in outcome:
            if not isinstance(result, qmpshutdown.ShutdownResult):
                phase.errors.append(repr(result))
                log(f"{phase.name} {unit + 1}: {phase.errors[-1]}")
            elif result.stage is not Stage.POWERDOWN:
                phase.errors.append(f"{result.stage}: {result.reason}")
                log(f"{phase.name} {unit + 1}: {phase.errors[-1]}")
            elif not result.graceful:
                phase.ungraceful.append("; ".join(step.detail for step in result.steps))
                log(f"{phase.name} {unit + 1}: graceful=False: {phase.ungraceful[-1]}")
        if unit + 1 == warmup:
            phase.snaps["warm"] = snapshot()
        if (unit + 1) % phase.block == 0:
            LOADS.append(os.getloadavg()[0])
            gc.collect()
            phase.rss_series.append(rss_kib())
            recent = phase.call_cpu[unit + 1 - phase.block : unit + 1]
            log(f"{phase.name}: {unit + 1}/{units}, "
                f"CPU per VM (median of the block) {statistics.median(recent) * 1000:.2f} ms, "
                f"RSS {phase.rss_series[-1]} KiB, {open_fds()} fds")  # fmt: skip
    phase.wall = time.monotonic() - began
    phase.snaps["end"] = snapshot()


async def measure(args: argparse.Namespace, scratch: Path) -> list[Phase]:
    binary = scratch / "qemu-system-fake"
    await anyio.lowlevel.checkpoint()  # the loop is up before the first snapshot

    def start_fleet(n: int) -> FakeFleet:
        return FakeFleet(binary, scratch, n)

    async def one(fleet: FakeFleet) -> list[object]:
        return [await qmpshutdown.shutdown(fleet.paths[0], POLICY, pid=fleet.procs[0].pid)]

    async def many(fleet: FakeFleet) -> list[object]:
        pairs = zip(fleet.paths, fleet.procs, strict=True)
        jobs = [Job(path, pid=proc.pid) for path, proc in pairs]
        return list(await qmpshutdown.shutdown_many(jobs, POLICY))

    rounds_block = max(1, args.rounds // 10)
    stops = Phase("shutdown()", 1, args.block)
    rounds = Phase(f"shutdown_many() of {args.fleet}", args.fleet, rounds_block)
    await run_phase(stops, args.stops, args.block, start_fleet, one)
    await run_phase(rounds, args.rounds, rounds_block, start_fleet, many)
    return [stops, rounds]


def reap_leftovers() -> list[int]:
    """Kill and reap any child still here (FakeFleet.close should have left none)."""
    left = children()
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
    return left


# ----------------------------------------------------------------------------- the report


def blocks(values: Sequence[float], size: int) -> list[Sequence[float]]:
    return [values[i : i + size] for i in range(0, len(values) - size + 1, size)]


def first_last(
    values: Sequence[float], size: int
) -> tuple[Sequence[float], Sequence[float], float]:
    """The first and the last block of *values*, and the ratio of their medians."""
    parts = blocks(values, size)
    return parts[0], parts[-1], statistics.median(parts[-1]) / statistics.median(parts[0])


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def judge(phases: list[Phase], smoke: bool) -> list[tuple[str, str, bool]]:
    targets: list[tuple[str, str, bool]] = []
    for phase in phases:
        start, warm, end = phase.snaps["start"], phase.snaps["warm"], phase.snaps["end"]
        growth = end.rss_kib - warm.rss_kib
        ratio = first_last(phase.call_cpu, phase.block)[2]
        n = len(phase.call_cpu) * phase.per_unit
        targets += [
            (f"{phase.name}: all {n} stopped on the power-button rung", f"{len(phase.errors)} not",
             not phase.errors),
            (f"{phase.name}: descriptors back to the start", f"{start.fds} → {end.fds}",
             end.fds == start.fds),
            (f"{phase.name}: no asyncio task left", str(end.tasks), end.tasks == 0),
            (f"{phase.name}: every fake exited by itself and was reaped",
             f"{phase.killed} killed, {end.children} left", not phase.killed and not end.children),
        ]  # fmt: skip
        if not smoke:
            targets += [
                (f"{phase.name}: RSS growth after the warm-up ≤ 1 MiB", f"{growth:+d} KiB",
                 growth <= RSS_GROWTH_KIB),
                (f"{phase.name}: CPU per VM flat, last/first block (medians) within "
                 f"±{FLAT:.0%}", f"{ratio:.2f}", abs(ratio - 1) <= FLAT),
            ]  # fmt: skip
    return targets


def render(phases: list[Phase], args: argparse.Namespace, command: str, duration: float) -> str:
    stops, rounds = phases
    versions = ", ".join(
        f"{name} {metadata.version(name)}" for name in ("qemu.qmp", "anyio", "attrs")
    )
    load = f"{min(LOADS):.1f} to {max(LOADS):.1f}" if LOADS else "not sampled"
    out = [BEGIN, "## 7. Days, not seconds: one process, many stops (benchmarks/longrun.py)\n"]
    out.append(
        f"Command: `{command}` ({duration:.0f} s), "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {os.cpu_count()} cores, "
        f"load average (1 min) {load} during the run"
        + (f" ({args.note})" if args.note else "")
        + f"; Python {sys.version.split()[0]}, qmpshutdown {qmpshutdown.__version__}, "
        f"{versions}.\n"
    )
    out.append(
        f"One process, one event loop (`anyio.run`): {len(stops.call_cpu)} sequential "
        f"`shutdown(path, policy, pid=...)`, then {len(rounds.call_cpu)} rounds of "
        f"`shutdown_many()` over {rounds.per_unit} `Job(path, pid=...)`, the default policy, "
        "each against fresh stand-in QEMUs (fakeqemu.py: a real process pinned by pidfd, "
        "SHUTDOWN 5 ms after the press), every one reaped before the next. *warm* is after "
        f"the first {stops.block} stops, or the first {rounds.block} rounds. RSS after "
        "`gc.collect()`; descriptors and tasks counted before it. This script keeps its "
        "figures in arrays allocated up front: the Python memory blocks counted are the "
        "stops' (library, qemu.qmp, anyio, asyncio, subprocess).\n"
    )
    out.append("| phase | figure | start | warm | end | end - warm |")
    out.append("|---|---|---|---|---|---|")
    figures = (("RSS (KiB)", "rss_kib"), ("open descriptors", "fds"),
               ("asyncio tasks besides main", "tasks"), ("threads", "threads"),
               ("children not reaped", "children"), ("objects tracked by gc", "gc_objects"),
               ("Python memory blocks in use", "py_blocks"))  # fmt: skip
    for phase in phases:
        for label, attr in figures:
            start, warm, end = (getattr(phase.snaps[k], attr) for k in ("start", "warm", "end"))
            out.append(f"| {phase.name} | {label} | {start:,} | {warm:,} | {end:,} "
                       f"| {end - warm:+,} |")  # fmt: skip
    out.append(
        "\nCPU time of this process per VM (`time.process_time`). *call*: the library call "
        "alone (connect, SO_PEERCRED, pidfd, qemu.qmp handshake, `query-status`, the press, "
        "the events, the exit seen through the pidfd, closing). *whole*: also starting the "
        "fake (`subprocess.Popen`: the fork and exec, in this process; the fake's interpreter "
        "starting is the child's CPU, not ours), polling for its socket, `kill` check, "
        "`waitpid`, its scratch directory. First and last block of "
        f"{stops.block} stops, or of {rounds.block} rounds.\n"
    )
    out.append("| phase | | first block: median | mean | last block: median | mean "
               "| last/first (medians) |")  # fmt: skip
    out.append("|---|---|---|---|---|---|---|")
    for phase in phases:
        for label, values in (("call", phase.call_cpu), ("whole", phase.whole_cpu)):
            first, last, ratio = first_last(values, phase.block)
            out.append(f"| {phase.name} | {label} | {ms(statistics.median(first))} "
                       f"| {ms(statistics.mean(first))} | {ms(statistics.median(last))} "
                       f"| {ms(statistics.mean(last))} | {ratio:.2f} |")  # fmt: skip
    for phase in phases:
        for error in phase.errors[:3]:
            out.append(f"\n{phase.name}: not stopped on the power-button rung: `{error}`")
        if phase.ungraceful:
            n = len(phase.call_cpu) * phase.per_unit
            out.append(f"\n{phase.name}: {len(phase.ungraceful)} of {n} records stopped on "
                       "the power-button rung say `graceful=False` (no target of this "
                       "benchmark), the step said: "
                       + "; ".join(f"`{detail}`" for detail in phase.ungraceful[:3]))  # fmt: skip
    for phase in phases:
        medians = " ".join(f"{statistics.median(b) * 1000:.2f}"
                           for b in blocks(phase.call_cpu, phase.block))  # fmt: skip
        rss = " ".join(f"{kib:,}" for kib in phase.rss_series)
        out.append(f"\n{phase.name}, *call* CPU per VM, median of each block in order (ms): "
                   f"{medians}. RSS after each block (KiB): {rss}. "
                   f"Wall: {phase.wall:.0f} s.")  # fmt: skip
    out.append(
        "\n| target | measured | |\n|---|---|---|"
        + "".join(
            f"\n| {name} | {measured} | {'**met**' if ok else '**missed**'} |"
            for name, measured, ok in judge(phases, args.smoke)
        )
    )
    out.append(END)
    return "\n".join(out) + "\n"


def shell_word(word: str) -> str:
    """*word* as a shell reads it back: bare when it can be, else in double quotes."""
    if re.fullmatch(r"[\w@%+=:,./-]+", word):
        return word
    return '"' + re.sub(r'(["\\$`])', r"\\\1", word) + '"'


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stops", type=int, default=2000, help="sequential stops (2000)")
    parser.add_argument("--rounds", type=int, default=100, help="shutdown_many rounds (100)")
    parser.add_argument("--fleet", type=int, default=8, help="VMs per round (8)")
    parser.add_argument("--block", type=int, default=100,
                        help="stops per CPU block, also the warm-up (100)")  # fmt: skip
    parser.add_argument("--smoke", action="store_true",
                        help="60 stops, 5 rounds of 4, blocks of 20: that it runs")  # fmt: skip
    parser.add_argument("--note", default="", help="a word on the machine's load, for the report")
    parser.add_argument("--write", action="store_true", help="write RESULTS.md's section")
    args = parser.parse_args(argv)
    if args.smoke:
        args.stops, args.rounds, args.fleet, args.block = 60, 5, 4, 20
    if args.stops < 2 * args.block or args.rounds < 2 or args.fleet < 1:
        parser.error("need --stops ≥ 2 blocks, --rounds ≥ 2 and --fleet ≥ 1")
    log(f"qmpshutdown from {Path(qmpshutdown.__file__).parent}")
    started = time.monotonic()
    scratch = Path(tempfile.mkdtemp(prefix="qsd-longrun-"))
    try:
        shutil.copy2(os.path.realpath(sys.executable), scratch / "qemu-system-fake")
        phases = anyio.run(measure, args, scratch)
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        left = reap_leftovers()
        if left:
            log(f"killed and reaped leftover children {left}")
        shutil.rmtree(scratch, ignore_errors=True)
    command = " ".join(shell_word(word) for word in ["benchmarks/longrun.py", *argv])
    section = render(phases, args, command, time.monotonic() - started)
    print(section)
    if args.write:
        write_section(section, begin=BEGIN, end=END)
        log("wrote benchmarks/RESULTS.md (longrun section)")
    missed = [name for name, _, ok in judge(phases, args.smoke) if not ok]
    for name in missed:
        log(f"missed: {name}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
