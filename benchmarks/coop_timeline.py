"""Where a cooperative stop's wall time goes on a real guest, before the press and after the exit.

    .venv/bin/python benchmarks/coop_timeline.py [--runs 12] [--library DIR]

Boots the fixture's ``cooperative`` guests (TCG) in pairs, and stops one of each
pair with ``qmpshutdown.shutdown(path)`` (default policy) and the other with
benchmarks/rawqmp.py, alternating which goes first. For the library, each
step's start and end are taken (perf_counter) by wrapping its functions for the
run: connecting, SO_PEERCRED, the holder check, the handshake and what is in it
(the first words, the greeting and capabilities with the first commands, their
replies, qemu.qmp taking the session over), ``query-status``, the reboot
action, the press, and after QEMU's exit: the pidfd's callback, ``settle``,
the record and closing the monitor. For both clients: *call → press* (QEMU's
own timestamp on POWERDOWN) and *exit → known* (a pidfd polled in a thread
stamps the exit; it wakes late when the loop holds the GIL, so this is a lower
bound). Prints a Markdown table of medians, in ms from the call.

The wrapping costs a few microseconds per wrapped call (about 15 calls per stop).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from library_arg import use_library_from_argv  # noqa: E402

use_library_from_argv()

import rawqmp  # noqa: E402
from exitclock import ExitClock  # noqa: E402
from stepclock import Mark, Step, instrument  # noqa: E402

import qmpshutdown  # noqa: E402
from support.guests import GuestFactory  # noqa: E402

#: (label, module, attribute, owner class or None); wrapped where the name is bound.
STEPS: list[Step] = [
    ("connect (the socket)", "_connect", "connect_socket", None),
    ("SO_PEERCRED", "_process", "peer_pid", None),
    ("holder check (sock_diag, /proc/PID/fd)", "_process", "holds_socket", None),
    ("handshake, all of it", "_connect", "handshake", None),
    ("· first words (peek)", "_connect", "first_words", None),
    ("· greeting, capabilities (+ first commands sent)", "_greeting", "negotiate", None),
    ("· the first commands' replies", "_greeting", "take_replies", None),
    ("· qemu.qmp takes the session", "_connect", "connect_client", None),
    ("query-status (arrive)", "_qemu", "arrive", "Qemu"),
    ("reboot action (prepare)", "_rungs.reboot", "prepare", "RebootAsShutdown"),
    ("the press (system_powerdown)", "_qemu", "try_command", "Qemu"),
    ("QEMU seen gone (pidfd callback)", "_qemu", "mark_gone", "Qemu"),
    ("settle (QEMU's last events)", "_qemu", "settle", "Qemu"),
    ("the record", "_ladder", "record", None),
    ("closing the monitor", "_monitor", "close", "QMPMonitor"),
]

marks: list[Mark] = []


def powerdown_at(events: list[Any]) -> float | None:
    for event in events:
        if isinstance(event, dict) and event.get("event") == "POWERDOWN":
            stamp = event["timestamp"]
            return float(stamp["seconds"]) + float(stamp["microseconds"]) / 1e6
        if not isinstance(event, dict) and event.event == "POWERDOWN":
            return float(event.timestamp)
    return None


async def one(tool: str, guest: Any) -> dict[str, Any]:
    clock = ExitClock(guest.pid)
    marks.clear()
    wall0, t0 = time.time(), time.perf_counter()
    if tool == "qmpshutdown":
        result = await qmpshutdown.shutdown(guest.qmp_path)
        events: list[Any] = list(result.events)
    else:
        _, events = rawqmp.stop_with_events(str(guest.qmp_path), None)
    t1 = time.perf_counter()
    exited = clock.result()
    pressed = powerdown_at(events)
    return {
        "total": t1 - t0,
        "press": None if pressed is None else pressed - wall0,
        "known": None if exited is None else t1 - exited,
        "exit": None if exited is None else exited - t0,
        "marks": [(label, a - t0, b - t0) for label, a, b in marks],
    }


def median_ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1e3:.2f}" if values else "-"


async def main(runs: int) -> None:
    found = instrument(STEPS, marks, time.perf_counter)
    scratch = Path(tempfile.mkdtemp(prefix="coop-timeline-"))
    data: dict[str, list[dict[str, Any]]] = {"qmpshutdown": [], "raw": []}
    factory = GuestFactory(scratch)
    try:
        for round_no in range(runs + 1):  # round 0 warms up (lazy imports), not counted
            pair = await factory.boot_many(*[{"mode": "cooperative", "memory": 192}] * 2)
            await asyncio.sleep(0.3)
            order = ["qmpshutdown", "raw"] if round_no % 2 else ["raw", "qmpshutdown"]
            for tool, guest in zip(order, pair, strict=True):
                row = await one(tool, guest)
                if round_no:
                    data[tool].append(row)
            for guest in pair:
                await guest.wait_exit(10)
    finally:
        factory.cleanup()
    lib, raw = data["qmpshutdown"], data["raw"]
    print(f"qmpshutdown {qmpshutdown.__version__} from {Path(qmpshutdown.__file__).parent}, "
          f"{runs} stops each, medians\n")  # fmt: skip
    print("| step (qmpshutdown) | from | starts | ends | takes |")
    print("|---|---|---|---|---|")
    for label in found:
        spans = []
        for row in lib:
            first = next(((a, b) for lab, a, b in row["marks"] if lab == label), None)
            if first is None:
                continue
            exit_at = row["exit"]
            after = exit_at is not None and first[0] >= exit_at - 0.001
            base = exit_at if after else 0.0
            spans.append((after, first[0] - base, first[1] - base, first[1] - first[0]))
        if not spans:
            continue
        after = sum(s[0] for s in spans) > len(spans) / 2
        spans = [s for s in spans if s[0] == after]
        columns = [median_ms([s[i] for s in spans]) for i in (1, 2, 3)]
        print(f"| {label} | {'the exit' if after else 'the call'} | " + " | ".join(columns) + " |")
    print()
    print("| client | call → press | exit → known (lower bound) | call → known |")
    print("|---|---|---|---|")
    for name, rows in (("qmpshutdown", lib), ("raw socket", raw)):
        press = [r["press"] for r in rows if r["press"] is not None]
        known = [r["known"] for r in rows if r["known"] is not None]
        print(f"| {name} | {median_ms(press)} | {median_ms(known)} | "
              f"{median_ms([r['total'] for r in rows])} |")  # fmt: skip


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=12)
    parser.add_argument("--library", help="measure the qmpshutdown package in DIR")
    asyncio.run(main(parser.parse_args().runs))
