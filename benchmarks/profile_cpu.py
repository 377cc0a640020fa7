"""Where qmpshutdown's CPU goes: stop many stand-in QEMUs (fakeqemu.py) and profile it.

    .venv/bin/python benchmarks/profile_cpu.py [--n 8] [--batches 20] [--profile]
                                               [--pyinstrument] [--variant NAME]

No guest and no TCG: each target is tests/support/fakeqemu.py run by a copy of this
interpreter named ``qemu-system-fake`` (qmpshutdown checks /proc/PID/exe), so
the library takes exactly its real path (SO_PEERCRED, pidfd, qemu.qmp,
events, exit seen through the pidfd). Prints the library's CPU time per
guest (median over batches) for the first batch in a fresh process and the
warm ones, the peak of Python allocations per guest (tracemalloc, one extra
batch), and with --profile the functions that use the CPU (cProfile with a
CPU-time clock). --variant applies a candidate fix by monkeypatching (nothing
in qmpshutdown/ is changed): see VARIANTS.
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
import tracemalloc
from pathlib import Path

import anyio

import qmpshutdown

HERE = Path(__file__).resolve().parent
FAKEQEMU = HERE.parent / "tests" / "support" / "fakeqemu.py"


def quiet_qmp_logging() -> None:
    """qemu.qmp formats every message for a DEBUG log line even when DEBUG is off.

    ``_cb_outbound`` / ``_cb_inbound`` call ``str(msg)`` (``json.dumps(indent=2)``)
    before ``logger.debug``; skip it unless the logger would emit.
    """
    from qemu.qmp.protocol import AsyncProtocol

    def outbound(self, msg):  # type: ignore[no-untyped-def]
        if self.logger.isEnabledFor(10):
            self.logger.debug("--> %s", str(msg))
        return msg

    def inbound(self, msg):  # type: ignore[no-untyped-def]
        if self.logger.isEnabledFor(10):
            self.logger.debug("<-- %s", str(msg))
        return msg

    AsyncProtocol._cb_outbound = outbound  # type: ignore[method-assign]
    AsyncProtocol._cb_inbound = inbound  # type: ignore[method-assign]


VARIANTS = {"none": lambda: None, "quiet-qmp-logging": quiet_qmp_logging}


def fake_binary(scratch: Path) -> Path:
    target = scratch / "qemu-system-fake"
    shutil.copy2(os.path.realpath(sys.executable), target)
    return target


def spawn(
    binary: Path, scratch: Path, n: int, batch: object, delay_ms: float
) -> list[tuple[subprocess.Popen[bytes], Path]]:
    env = dict(os.environ, PYTHONHOME=sys.base_prefix)
    fakes = []
    for i in range(n):
        path = scratch / f"b{batch}-{i}.sock"
        proc = subprocess.Popen(
            [str(binary), "-S", str(FAKEQEMU), str(path), str(delay_ms)],
            env=env, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        fakes.append((proc, path))
    end = time.monotonic() + 30
    while not all(path.exists() for _, path in fakes):
        if time.monotonic() > end:
            raise TimeoutError("fake QEMUs did not listen in 30 s")
        time.sleep(0.005)
    return fakes


def reap(fakes: list[tuple[subprocess.Popen[bytes], Path]]) -> None:
    for proc, _ in fakes:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


async def stop_batch(paths: list[Path], n: int) -> None:
    if n == 1:
        result = await qmpshutdown.shutdown(paths[0])
        results: list[object] = [result]
    else:
        results = list(await qmpshutdown.shutdown_many(paths))
    for result in results:
        if not isinstance(result, qmpshutdown.ShutdownResult) or not result.graceful:
            raise RuntimeError(f"unexpected result {result!r}")


def powerdown_at(events: list[object]) -> float:
    for event in events:
        if isinstance(event, dict) and event.get("event") == "POWERDOWN":
            stamp = event["timestamp"]
            return float(stamp["seconds"]) + float(stamp["microseconds"]) / 1e6
        if getattr(event, "event", None) == "POWERDOWN":
            return float(event.timestamp)  # type: ignore[attr-defined]
    raise RuntimeError("no POWERDOWN")


async def compare_raw(args: argparse.Namespace, binary: Path, scratch: Path) -> None:
    """One stop at a time, qmpshutdown and the raw client alternating: wall times."""
    sys.path.insert(0, str(HERE))
    import rawqmp

    figures: dict[str, dict[str, list[float]]] = {
        tool: {"press": [], "total": [], "cpu": []} for tool in ("qmpshutdown", "raw")
    }
    for batch in range(args.batches):
        for tool in ("qmpshutdown", "raw") if batch % 2 else ("raw", "qmpshutdown"):
            fakes = spawn(binary, scratch, 1, f"{batch}{tool}", args.delay_ms)
            try:
                path = fakes[0][1]
                wall0, c0, t0 = time.time(), time.process_time(), time.perf_counter()
                if tool == "raw":
                    _, events = rawqmp.stop_with_events(str(path))
                else:
                    events = list((await qmpshutdown.shutdown(path)).events)
                t1, c1 = time.perf_counter(), time.process_time()
            finally:
                reap(fakes)
            figures[tool]["press"].append(powerdown_at(events) - wall0)
            figures[tool]["total"].append(t1 - t0)
            figures[tool]["cpu"].append(c1 - c0)
    print(f"variant {args.variant}: one stop at a time, {args.batches} each, alternating; "
          f"fake guest powers off {args.delay_ms:g} ms after the press (medians)")  # fmt: skip
    for tool, data in figures.items():
        print(f"  {tool:12} call → press {statistics.median(data['press']) * 1000:6.2f} ms   "
              f"call → known {statistics.median(data['total']) * 1000:6.2f} ms   "
              f"CPU {statistics.median(data['cpu']) * 1000:5.2f} ms")  # fmt: skip


async def main(args: argparse.Namespace) -> None:
    VARIANTS[args.variant]()
    if args.compare_raw:
        await anyio.lowlevel.checkpoint()
        scratch = Path(tempfile.mkdtemp(prefix="qsd-prof-"))
        try:
            await compare_raw(args, fake_binary(scratch), scratch)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return
    await anyio.lowlevel.checkpoint()
    scratch = Path(tempfile.mkdtemp(prefix="qsd-prof-"))
    binary = fake_binary(scratch)
    profiler = cProfile.Profile(time.thread_time) if args.profile else None
    instrument = None
    if args.pyinstrument:
        from pyinstrument import Profiler

        instrument = Profiler(interval=0.0001)
    cpu: list[float] = []
    try:
        for batch in range(args.batches + 1):
            fakes = spawn(binary, scratch, args.n, batch, args.delay_ms)
            try:
                paths = [path for _, path in fakes]
                tracing = batch == args.batches  # the last batch: memory only
                if tracing:
                    tracemalloc.start()
                elif profiler is not None and batch > 0:
                    profiler.enable()
                elif instrument is not None and batch > 0:
                    instrument.start()
                c0 = time.process_time()
                await stop_batch(paths, args.n)
                c1 = time.process_time()
                if tracing:
                    _, peak = tracemalloc.get_traced_memory()
                    tracemalloc.stop()
                elif profiler is not None and batch > 0:
                    profiler.disable()
                elif instrument is not None and batch > 0:
                    instrument.stop()
                if not tracing:
                    cpu.append((c1 - c0) / args.n)
            finally:
                reap(fakes)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    warm = cpu[1:]
    print(f"variant {args.variant}, N={args.n}, {args.batches} batches, "
          f"fake guest powers off {args.delay_ms:g} ms after the press")  # fmt: skip
    print(f"  CPU per guest, first batch in this process: {cpu[0] * 1000:.2f} ms")
    if warm:
        print(f"  CPU per guest, warm batches: median {statistics.median(warm) * 1000:.2f} ms "
              f"(min {min(warm) * 1000:.2f}, max {max(warm) * 1000:.2f})")  # fmt: skip
    print(f"  Python allocations, peak per guest (tracemalloc): {peak / args.n / 1024:.0f} KiB")
    if profiler is not None:
        stats = pstats.Stats(profiler).strip_dirs()
        stats.sort_stats("tottime").print_stats(25)
        stats.sort_stats("cumulative").print_stats(40)
    if instrument is not None:
        print(instrument.output_text(unicode=False, color=False))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=8, help="fake QEMUs stopped at once")
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--delay-ms", type=float, default=5.0)
    parser.add_argument("--profile", action="store_true", help="cProfile (CPU clock)")
    parser.add_argument("--pyinstrument", action="store_true")
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="none")
    parser.add_argument("--compare-raw", action="store_true",
                        help="wall times of single stops, qmpshutdown vs rawqmp.py")  # fmt: skip
    asyncio.run(main(parser.parse_args()))
