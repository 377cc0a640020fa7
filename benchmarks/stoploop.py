"""Cooperative stops one after the other, for a sampling profiler outside the process.

    .venv/bin/python benchmarks/stoploop.py {qmpshutdown,bare,bare-quiet} [--stops 600]
    py-spy record --rate 2000 --format raw -o lib.txt -- \\
        .venv/bin/python benchmarks/stoploop.py qmpshutdown --stops 600
    .venv/bin/python benchmarks/stoploop.py --aggregate lib.txt --stops 600

The same stops as ``phases.py`` (stand-in QEMUs, default policy), with no
profiler of our own: a sampler such as py-spy (not a dependency: ``pip install
py-spy``) charges each sample to what runs, however short, where cProfile's own
cost per call inflates small functions. ``--aggregate`` reads py-spy's raw
(collapsed) stacks: the samples taken in the event loop's turns (not while a
stand-in is spawned or reaped, nor in an import), charged to the innermost frame
of qmpshutdown on the stack, else to "qemu.qmp, asyncio and the loop".
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


async def loop(tool: str, stops: int) -> None:
    import bareqmp
    from phases import fake_binary, reap, spawn

    import qmpshutdown

    with tempfile.TemporaryDirectory(prefix="qsd-loop-") as tmp:
        binary = fake_binary(Path(tmp))
        cpu = 0.0
        for i in range(stops):
            path = Path(tmp) / f"{i}.sock"
            proc = spawn(binary, path, 5.0)
            try:
                c0 = time.process_time()
                if tool == "qmpshutdown":
                    assert (await qmpshutdown.shutdown(path)).graceful
                else:
                    await bareqmp.stop(str(path), quiet=tool == "bare-quiet")
                cpu += time.process_time() - c0
            finally:
                reap(proc)
    print(f"{tool}: {cpu / stops * 1000:.3f} ms CPU per stop (mean of {stops})")


#: Functions whose samples are not the stops': the stand-ins' spawn and reap, imports.
_ELSEWHERE = frozenset({"spawn", "reap", "fake_binary", "_find_and_load"})


def aggregate(raw: Path, stops: int, rate: int, rows: int) -> None:
    charged: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        functions = {frame.partition(" (")[0].rpartition(".")[2] for frame in frames}
        if "_run_once" not in functions or functions & _ELSEWHERE:
            continue  # not in the event loop's turns, or a stand-in's spawn, a reap, an import
        where = "qemu.qmp, asyncio and the loop"
        for frame in reversed(frames):
            if "qmpshutdown/" in frame:
                function, _, place = frame.partition(" (")
                where = f"{function} ({place.split('qmpshutdown/')[1].split(':')[0]})"
                break
        charged[where] += int(count)
    total = sum(charged.values())
    print(f"{total} samples in the stops: {total / stops / rate * 1e3:.3f} ms per stop "
          f"(sampled, at {rate}/s)\n")  # fmt: skip
    print("| charged to | µs per stop | share |\n|---|---|---|")
    for where, count in charged.most_common(rows):
        print(f"| {where} | {count / stops / rate * 1e6:.1f} | {100 * count / total:.1f} % |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("tool", nargs="?", choices=["qmpshutdown", "bare", "bare-quiet"])
    parser.add_argument("--stops", type=int, default=600)
    parser.add_argument("--aggregate", type=Path, metavar="RAW", help="py-spy's --format raw")
    parser.add_argument("--rate", type=int, default=2000, help="the sampling rate used")
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args()
    if args.aggregate is not None:
        aggregate(args.aggregate, args.stops, args.rate, args.rows)
    elif args.tool is None:
        parser.error("give a tool, or --aggregate RAW")
    else:
        asyncio.run(loop(args.tool, args.stops))
