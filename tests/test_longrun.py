"""Days, not seconds (issue 14), the short version: many stops in one process leave nothing.

benchmarks/longrun.py runs 2,000 stops and 100 rounds and also measures the
resident set and the CPU per stop (benchmarks/RESULTS.md); this asserts only
what must hold exactly, whatever the machine's load: the descriptors are
back, no task is left, and every stand-in QEMU exited and was reaped.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
from pathlib import Path

import anyio
import pytest

import qmpshutdown
from qmpshutdown import Job, ShutdownPolicy, Stage

pytestmark = pytest.mark.asyncio

STOPS, WARMUP, ROUNDS, FLEET = 60, 10, 5, 4
POLICY = ShutdownPolicy()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def children() -> set[int]:
    """Our children still in the process table, zombies (exited, not reaped) included."""
    pids: set[int] = set()
    for task in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            pids |= set(map(int, Path(f"/proc/self/task/{task}/children").read_text().split()))
    return pids


def other_tasks() -> set[asyncio.Task[object]]:
    return asyncio.all_tasks() - {asyncio.current_task()}  # type: ignore[operator]


def reaped(procs: list[subprocess.Popen[bytes]]) -> list[int | None]:
    """Reap each fake (waitpid); its exit status: 0 when it powered off by itself."""
    return [proc.wait(10) for proc in procs]


@pytest.mark.timeout(60)
async def test_many_stops_in_one_process_leave_nothing_behind(fakes):
    async def one_stop() -> None:
        (path,) = fakes(1)
        proc = fakes.started[-1]
        with anyio.fail_after(10):
            result = await qmpshutdown.shutdown(path, POLICY, pid=proc.pid)
        assert result.stage is Stage.POWERDOWN
        assert reaped([proc]) == [0]

    for _ in range(WARMUP):
        await one_stop()
    fds = open_fds()
    assert other_tasks() == set()

    for _ in range(STOPS - WARMUP):
        await one_stop()
    for _ in range(ROUNDS):
        paths = fakes(FLEET)
        procs = fakes.started[-FLEET:]
        with anyio.fail_after(10):
            results = await qmpshutdown.shutdown_many(
                [Job(path, pid=proc.pid) for path, proc in zip(paths, procs, strict=True)], POLICY
            )
        assert [getattr(r, "stage", r) for r in results] == [Stage.POWERDOWN] * FLEET
        assert reaped(procs) == [0] * FLEET

    assert open_fds() == fds
    assert other_tasks() == set()
    assert len(fakes.started) == STOPS + ROUNDS * FLEET
    assert not children() & {proc.pid for proc in fakes.started}
