#!/usr/bin/env python3
"""Save and restore of the fixture guest (issue 16): how long, how big.

Boots the ``counts`` guest (256 MiB, TCG) with ``launch()``, lets it tick,
stops it with the policy ``stages=("save", "quit")`` and a save_dir, then
starts it again with ``launch(argv, restore=PATH)`` and checks that it counts
on. Prints one line per run and the medians:

    .venv/bin/python benchmarks/save.py [--runs N]

*save*: the save step (its start to QEMU's exit: migrate to the file, fsync,
quit). *restore*: from ``launch(..., restore=...)`` entered to the guest
running again (QEMU's start, the state loaded). *size*: the state file.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import qmpshutdown  # noqa: E402
from support.guests import guest_argv  # noqa: E402

SAVE = qmpshutdown.ShutdownPolicy(stages=("save", "quit"), command_timeout=5.0)
QUIT = qmpshutdown.ShutdownPolicy(stages=("quit",))
TICK = re.compile(r"QMPSHUTDOWN-GUEST-TICK n=(\d+)")


def read_ticks(serial: Path) -> list[int]:
    text = serial.read_text(errors="replace") if serial.exists() else ""
    return [int(n) for n in TICK.findall(text)]


async def wait_ticks(serial: Path, at_least: int, timeout: float = 60.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ticks = read_ticks(serial)
        if len(ticks) >= at_least:
            return ticks
        await asyncio.sleep(0.05)
    raise TimeoutError(f"fewer than {at_least} ticks in {serial}")


async def one_run(root: Path) -> tuple[float, float, int]:
    first, second, states = root / "first", root / "second", root / "states"
    for path in (first, second, states):
        path.mkdir()
    async with qmpshutdown.launch(
        guest_argv("counts", workdir=first, qmp=False), SAVE, save_dir=states
    ) as vm:
        before = await wait_ticks(first / "serial.log", 3)
    assert vm.result is not None and vm.result.saved_state is not None, vm.result
    step = vm.result.step("save")
    assert step is not None
    saved, size = vm.result.saved_state, os.stat(vm.result.saved_state).st_size
    started = time.perf_counter()
    async with qmpshutdown.launch(
        guest_argv("counts", workdir=second, qmp=False), QUIT, restore=saved
    ) as vm:
        restored = time.perf_counter() - started
        after = await wait_ticks(second / "serial.log", 1)
        assert after[0] > before[-1] - 1, (before, after)
    return step.ended - step.started, restored, size


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    saves, restores, sizes = [], [], []
    for run in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="qsd-bench-save-") as root:
            save, restore, size = await one_run(Path(root))
        saves.append(save)
        restores.append(restore)
        sizes.append(size)
        print(f"run {run + 1}: save {save:.3f} s, restore {restore:.3f} s, "
              f"{size / 2**20:.1f} MiB")  # fmt: skip
    print(
        f"median of {args.runs}: save {statistics.median(saves):.3f} s "
        f"(min {min(saves):.3f}, max {max(saves):.3f}), "
        f"restore {statistics.median(restores):.3f} s "
        f"(min {min(restores):.3f}, max {max(restores):.3f}), "
        f"size {statistics.median(sizes) / 2**20:.1f} MiB"
    )


if __name__ == "__main__":
    asyncio.run(main())
