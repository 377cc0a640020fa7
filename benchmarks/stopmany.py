"""Stop N guests at once in a fresh process and measure it (run by run.py, one process per run).

    python benchmarks/stopmany.py [--nofile=SOFT[:HARD]] qmpshutdown|bare|raw SOCKET...

``bare`` is a bare qemu.qmp client (bareqmp.py, all at once with asyncio.gather),
``raw`` the raw socket client (rawqmp.py, one thread each).

Prints one JSON object: ``wall_s`` (start of the stop to the last exit
known), ``cpu_s`` (this process's CPU time, all threads, over the same span),
``peak_rss_kib`` (how far the peak resident set rose above the resident set
at the start: the peak is reset through ``/proc/self/clear_refs`` first) and
``errors``. Imports and the library's first-use setup (anyio loading its
asyncio backend) happen before the clock starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any


def _status_kib(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(match.group(1)) if match else 0


def _reset_peak_rss() -> int:
    """Reset the peak RSS (VmHWM) to the current RSS (Linux ≥ 4.0); return the peak after it.

    Where the reset is refused the old peak stays, and only a rise above it shows.
    """
    gc.collect()
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmHWM")


def _peak_rss_kib() -> int:
    return _status_kib("VmHWM")


def measure_qmpshutdown(paths: list[str]) -> dict[str, Any]:
    import anyio

    import qmpshutdown

    async def run() -> dict[str, Any]:
        await anyio.lowlevel.checkpoint()  # first use: anyio loads its asyncio backend
        rss0, cpu0, wall0 = _reset_peak_rss(), time.process_time(), time.perf_counter()
        results = await qmpshutdown.shutdown_many(paths)
        wall1, cpu1, rss1 = time.perf_counter(), time.process_time(), _peak_rss_kib()
        errors = [
            f"{path}: {result!r}"
            for path, result in zip(paths, results, strict=True)
            if not isinstance(result, qmpshutdown.ShutdownResult)
            or result.stage is not qmpshutdown.Stage.POWERDOWN
            or not result.graceful
        ]
        stopped = [r for r in results if isinstance(r, qmpshutdown.ShutdownResult)]
        slowest = max(stopped, key=lambda r: r.elapsed, default=None)
        told = None if slowest is None else _told(slowest)
        return {"wall_s": wall1 - wall0, "cpu_s": cpu1 - cpu0, "peak_rss_kib": rss1 - rss0,
                "errors": errors, "slowest": told}  # fmt: skip

    return asyncio.run(run())


def _told(result: Any) -> str:
    """One record in a line: how long, the presses, and each step (for an outlier's why)."""
    steps = "; ".join(f"{s.stage.value} {s.outcome.value} {s.started:.2f}-{s.ended:.2f} s: "
                      f"{s.detail}" for s in result.steps)  # fmt: skip
    events = ", ".join(f"{e.event}@{e.timestamp:.2f}" for e in result.events)
    return f"{result.elapsed:.2f} s, {result.presses} press(es); {steps}; events {events}"


def measure_raw(paths: list[str]) -> dict[str, Any]:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import rawqmp

    reasons: list[str | None] = [None] * len(paths)
    errors: list[str] = []

    def worker(index: int, path: str) -> None:
        try:
            reasons[index] = rawqmp.stop(path)
        except Exception as err:
            errors.append(f"{path}: {err!r}")

    threads = [threading.Thread(target=worker, args=(i, p)) for i, p in enumerate(paths)]
    rss0, cpu0, wall0 = _reset_peak_rss(), time.process_time(), time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall1, cpu1, rss1 = time.perf_counter(), time.process_time(), _peak_rss_kib()
    errors += [
        f"{path}: reason {reason}"
        for path, reason in zip(paths, reasons, strict=True)
        if reason not in (None, "guest-shutdown")
    ]
    return {"wall_s": wall1 - wall0, "cpu_s": cpu1 - cpu0, "peak_rss_kib": rss1 - rss0,
            "errors": errors}  # fmt: skip


def measure_bare(paths: list[str]) -> dict[str, Any]:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bareqmp

    async def run() -> dict[str, Any]:
        await asyncio.sleep(0)
        rss0, cpu0, wall0 = _reset_peak_rss(), time.process_time(), time.perf_counter()
        outcomes = await asyncio.gather(*(bareqmp.stop(p) for p in paths), return_exceptions=True)
        wall1, cpu1, rss1 = time.perf_counter(), time.process_time(), _peak_rss_kib()
        errors = [
            f"{path}: {seen!r}"
            for path, seen in zip(paths, outcomes, strict=True)
            if not isinstance(seen, list) or "SHUTDOWN" not in seen
        ]
        return {"wall_s": wall1 - wall0, "cpu_s": cpu1 - cpu0, "peak_rss_kib": rss1 - rss0,
                "errors": errors}  # fmt: skip

    return asyncio.run(run())


def main(argv: list[str]) -> int:
    if argv and argv[0].startswith("--nofile="):  # SOFT or SOFT:HARD, set before anything opens
        import resource

        soft, _, hard = argv.pop(0).removeprefix("--nofile=").partition(":")
        limits = (int(soft), int(hard) if hard else resource.getrlimit(resource.RLIMIT_NOFILE)[1])
        resource.setrlimit(resource.RLIMIT_NOFILE, limits)
    tool, paths = argv[0], argv[1:]
    measure = {"qmpshutdown": measure_qmpshutdown, "bare": measure_bare, "raw": measure_raw}[tool]
    print(json.dumps(measure(paths)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
