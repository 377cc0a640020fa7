"""What a fleet's live ladders cost the cyclic garbage collector, against bare qemu.qmp.

    .venv/bin/python benchmarks/fleet_gc.py [--n 1000] [--rounds 2]

One process, N stand-in QEMUs (tests/support/fakeqemu.py, as fleetbench.py) stopped
at once, in turn by a bare qemu.qmp client (bareqmp.py, asyncio.gather), the same
quiet (its ``QuietClient``: no message pretty-printed for a DEBUG line that is off)
and ``shutdown_many()``, each round with the cyclic GC on, then with it off
(``gc.disable()`` around the stop only). Prints the CPU per VM of each, the GC's
collections by generation, and, in a last round with the GC on, the objects the GC
tracks per live VM at the peak, by type. Nothing in qmpshutdown is changed: this
says how much of the fleet's cost grows with the objects each live ladder holds.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import qmpshutdown

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bareqmp  # noqa: E402
from fleetbench import FakeFleet  # noqa: E402
from phases import fake_binary  # noqa: E402


async def stop_all(client: str, paths: list[Path]) -> None:
    if client.startswith("bare"):
        quiet = client == "bare-quiet"
        outcomes = await asyncio.gather(*(bareqmp.stop(str(p), quiet=quiet) for p in paths),
                                        return_exceptions=True)  # fmt: skip
        failed = [o for o in outcomes if isinstance(o, BaseException)]
        assert not failed, failed[:3]
    else:
        results = await qmpshutdown.shutdown_many(paths)
        assert all(r.graceful for r in results), results[:3]


async def one(client: str, fleet: FakeFleet, collect: bool, census: bool) -> dict[str, Any]:
    n = len(fleet.paths)
    gc.collect()
    before = [s["collections"] for s in gc.get_stats()]
    base = collections.Counter(type(o).__qualname__ for o in gc.get_objects()) if census else None
    peak: dict[str, Any] = {"count": 0, "types": collections.Counter(base)}

    async def look() -> None:  # the census: the most objects seen, every 50 ms
        while True:
            await asyncio.sleep(0.05)
            objects = gc.get_objects()
            if len(objects) > peak["count"]:
                peak["count"] = len(objects)
                peak["types"] = collections.Counter(type(o).__qualname__ for o in objects)
            del objects

    looker = asyncio.ensure_future(look()) if census else None
    if not collect:
        gc.disable()
    c0, w0 = time.process_time(), time.monotonic()
    try:
        await stop_all(client, fleet.paths)
    finally:
        cpu, wall = time.process_time() - c0, time.monotonic() - w0
        gc.enable()
        if looker is not None:
            looker.cancel()
    runs = [s["collections"] - b for s, b in zip(gc.get_stats(), before, strict=True)]
    out: dict[str, Any] = {"cpu": cpu / n, "wall": wall, "collections": runs}
    if base is not None:
        types = peak["types"]
        types.subtract(base)
        out["objects"] = sum(types.values()) / n
        out["types"] = [(name, count / n) for name, count in types.most_common(12) if count > 0]
    return out


async def main(args: argparse.Namespace) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 4 * args.n + 256)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    with tempfile.TemporaryDirectory(prefix="qsd-fleetgc-") as tmp:
        scratch = Path(tmp)
        binary = fake_binary(scratch)
        print(f"N = {args.n}, one process; CPU per VM (process_time)\n")
        print("| round | GC | client | CPU per VM | wall | collections (gen 0, 1, 2) |")
        print("|---|---|---|---|---|---|")
        census: dict[str, dict[str, Any]] = {}
        for round_ in range(1, args.rounds + 2):
            last = round_ == args.rounds + 1
            for collect in (True,) if last else (True, False):
                for client in ("bare", "bare-quiet", "qmpshutdown"):
                    fleet = FakeFleet(binary, scratch, args.n)
                    try:
                        got = await one(client, fleet, collect, census=last)
                    finally:
                        fleet.close()
                    if last:
                        census[client] = got
                        continue
                    print(f"| {round_} | {'on' if collect else 'off'} | {client} "
                          f"| {got['cpu'] * 1000:.3f} ms | {got['wall']:.2f} s "
                          f"| {', '.join(map(str, got['collections']))} |")  # fmt: skip
        print("\nObjects the GC tracks per live VM at the peak (a last round, GC on, "
              "looked at every 50 ms; 0 when the stop ended before the first look):\n")
        for client, got in census.items():
            kinds = ", ".join(f"{name} {count:.1f}" for name, count in got["types"])
            print(f"- {client}: {got['objects']:.0f} ({kinds})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1000, help="stand-in QEMUs stopped at once")
    parser.add_argument("--rounds", type=int, default=2)
    asyncio.run(main(parser.parse_args()))
