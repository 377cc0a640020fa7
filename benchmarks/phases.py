"""Where one cooperative stop's CPU goes, phase by phase (cProfile on a CPU clock).

    .venv/bin/python benchmarks/phases.py [--stops 200] [--delay-ms 5] [--dump FILE]
                                          [--library DIR]

One stop at a time against stand-in QEMUs (tests/support/fakeqemu.py, pinned like
QEMU), default policy, ``shutdown(path)``. First the CPU per stop without a
profiler (``time.process_time``, median), with a bare qemu.qmp client
(bareqmp.py) doing the same exchange in the same run for comparison, plain and
quiet (its ``QuietClient``: no message pretty-printed for a DEBUG line that is
off, as the library's own client); then the
same stops under cProfile with a CPU-time clock. A coroutine's cumulative time
counts only while its frames run, so each phase's figure is the CPU spent in
it (callees included); the tasks qemu.qmp runs on its own (its reader and its
disconnect) are phases of their own. Each phase is shown as its share of the
profiled CPU and as that share of the unprofiled CPU per stop (the profiler
slows everything down by about the same factor). Prints a Markdown table.

``--library DIR`` measures the ``qmpshutdown`` package in DIR instead of the installed
one (another checkout, e.g. ``git worktree add /tmp/before HEAD~1``): before and after,
each against the bare client of its own run.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from library_arg import use_library_from_argv

use_library_from_argv()

import qmpshutdown  # noqa: E402

HERE = Path(__file__).resolve().parent
FAKEQEMU = HERE.parent / "tests" / "support" / "fakeqemu.py"
sys.path.insert(0, str(HERE))

import bareqmp  # noqa: E402

#: (phase, [(file, function), ...]): cumulative CPU of those functions' frames.
PHASES: list[tuple[str, list[tuple[str, str]]]] = [
    ("connect (the socket)", [("_connect.py", "connect_socket")]),
    ("SO_PEERCRED", [("_process.py", "peer_pid")]),
    ("the holder check (sock_diag, /proc/PID/fd)", [("_process.py", "holds_socket")]),
    ("pidfd (open, /proc/PID/exe)", [("_process.py", "open_qemu")]),
    ("handshake (greeting, qmp_capabilities)", [("_connect.py", "handshake")]),
    ("query-status", [("_qemu.py", "arrive")]),
    ("the reboot action (/proc/PID/cmdline, set-action)", [("reboot.py", "prepare")]),
    ("the press (system_powerdown)", [("_qemu.py", "try_command")]),
    ("waiting for the guest (deadlines, events)", [
        ("_waits.py", "for_guest"),  # (0.1: in _patience.py; 0.3: in _qemu.py)
        ("_qemu.py", "for_guest"), ("_patience.py", "for_guest"),
    ]),
    ("the sampler", [("_patience.py", "sample_forever")]),
    ("the events (ours: a task till 0.2, a callback since)", [
        ("_qemu.py", "pump_events"), ("_qemu.py", "note"),
    ]),
    ("the exit (pidfd readable: a task till 0.2, a callback since)", [
        ("_qemu.py", "wait_gone"), ("_qemu.py", "exited"),
    ]),
    ("QEMU's last events (settle)", [("_qemu.py", "settle")]),
    ("the agent rung's skip", [("_steps.py", "skip")]),
    ("before-force actions' finish (screenshot, freeze)", [
        ("screenshot.py", "finish"), ("freeze.py", "finish"),
        ("_evidence.py", "finish"), ("_freeze.py", "finish"),
    ]),
    ("the reboot action's finish (nothing once QEMU is gone)", [("reboot.py", "finish")]),
    ("the record (verdict, result)", [("_ladder.py", "record")]),
    ("closing the monitor", [("_monitor.py", "close")]),
    ("qemu.qmp's reader task", [("protocol.py", "_bh_loop_forever")]),
    ("qemu.qmp's disconnect task", [("protocol.py", "_bh_disconnect")]),
]  # fmt: skip


def fake_binary(scratch: Path) -> Path:
    target = scratch / "qemu-system-fake"
    shutil.copy2(os.path.realpath(sys.executable), target)
    return target


def spawn(binary: Path, path: Path, delay_ms: float) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONHOME=sys.base_prefix)
    proc = subprocess.Popen([str(binary), "-S", str(FAKEQEMU), str(path), str(delay_ms)],
                            env=env, stdin=subprocess.DEVNULL)  # fmt: skip
    end = time.monotonic() + 30
    while not path.exists():
        if time.monotonic() > end:
            raise TimeoutError("the fake QEMU did not listen in 30 s")
        time.sleep(0.002)
    return proc


def reap(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


async def one_stop(tool: str, binary: Path, scratch: Path, index: int, delay_ms: float) -> float:
    path = scratch / f"{tool}{index}.sock"
    proc = spawn(binary, path, delay_ms)
    try:
        c0 = time.process_time()
        if tool.startswith("bare"):
            await bareqmp.stop(str(path), quiet=tool == "bare-quiet")
        else:
            result = await qmpshutdown.shutdown(path)
            assert result.graceful, result
        return time.process_time() - c0
    finally:
        reap(proc)


def cumulative(stats: pstats.Stats, keys: list[tuple[str, str]]) -> float:
    total = 0.0
    for (filename, _, function), row in stats.stats.items():  # type: ignore[attr-defined]
        if (os.path.basename(filename), function) in keys:
            total += row[3]  # cumulative time
    return total


async def main(args: argparse.Namespace) -> None:
    scratch = Path(tempfile.mkdtemp(prefix="qsd-phases-"))
    try:
        binary = fake_binary(scratch)
        for i in range(10):  # warm up both
            await one_stop("qmpshutdown", binary, scratch, -i - 1, args.delay_ms)
            await one_stop("bare", binary, scratch, -i - 1, args.delay_ms)
            await one_stop("bare-quiet", binary, scratch, -i - 1, args.delay_ms)
        tools = ["qmpshutdown", "bare", "bare-quiet"]
        cpu: dict[str, list[float]] = {tool: [] for tool in tools}
        for i in range(args.stops):
            for tool in tools[i % 3:] + tools[:i % 3]:  # rotating order
                cpu[tool].append(await one_stop(tool, binary, scratch, i, args.delay_ms))
        profiler = cProfile.Profile(time.thread_time)
        profiled = 0.0
        for i in range(args.stops):
            path = scratch / f"p{i}.sock"
            proc = spawn(binary, path, args.delay_ms)
            try:
                c0 = time.thread_time()
                profiler.enable()
                await qmpshutdown.shutdown(path)
                profiler.disable()
                profiled += time.thread_time() - c0
            finally:
                reap(proc)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    stats = pstats.Stats(profiler)
    if args.dump:
        stats.dump_stats(args.dump)
    lib, bare = statistics.median(cpu["qmpshutdown"]), statistics.median(cpu["bare"])
    quiet = statistics.median(cpu["bare-quiet"])
    print(f"CPU per cooperative stop, median of {args.stops} (process_time, no profiler): "
          f"qmpshutdown {lib * 1000:.2f} ms, bare qemu.qmp {bare * 1000:.2f} ms "
          f"({lib / bare:.2f}x), bare qemu.qmp quiet {quiet * 1000:.2f} ms "
          f"({lib / quiet:.2f}x)\n")  # fmt: skip
    print("| phase | share of profiled CPU | ≈ ms per stop |")
    print("|---|---|---|")
    for phase, keys in PHASES:
        spent = cumulative(stats, keys)
        share = spent / profiled
        print(f"| {phase} | {share * 100:.1f} % | {share * lib * 1000:.3f} |")
    total = cumulative(stats, [("_shutdown.py", "shutdown")])
    print(f"| *`shutdown()` itself, all its frames* | {total / profiled * 100:.1f} % "
          f"| {total / profiled * lib * 1000:.3f} |")  # fmt: skip
    print(f"| *the whole stop (all tasks, the event loop)* | 100 % | {lib * 1000:.3f} |")
    print("\nBy where the code is (own time, not cumulative):\n")
    print("| code | share of profiled CPU | ≈ ms per stop |")
    print("|---|---|---|")
    owners: dict[str, float] = {}
    for (filename, _, _), row in stats.stats.items():  # type: ignore[attr-defined]
        owners[owner(filename)] = owners.get(owner(filename), 0.0) + row[2]
    for name, spent in sorted(owners.items(), key=lambda item: -item[1]):
        share = spent / profiled
        print(f"| {name} | {share * 100:.1f} % | {share * lib * 1000:.3f} |")


def owner(filename: str) -> str:
    """Who owns the code in *filename*: qmpshutdown, qemu.qmp, anyio, asyncio, a stdlib module."""
    parts = Path(filename).parts
    for package in ("qmpshutdown", "anyio", "attrs", "attr"):
        if package in parts:
            return package
    if "qemu" in parts and "qmp" in parts:
        return "qemu.qmp"
    if "asyncio" in parts:
        return "asyncio"
    if filename.startswith("~") or filename == "<built-in>":
        return "built-ins (sockets, select, ...)"
    return f"stdlib {Path(filename).stem}"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stops", type=int, default=200)
    parser.add_argument("--delay-ms", type=float, default=5.0)
    parser.add_argument("--dump", metavar="FILE", help="also write the profile (pstats) here")
    parser.add_argument("--library", metavar="DIR",
                        help="measure the qmpshutdown package in DIR (another checkout)")
    arguments = parser.parse_args()
    print(f"qmpshutdown from {Path(qmpshutdown.__file__).parent.parent}", file=sys.stderr)
    asyncio.run(main(arguments))
