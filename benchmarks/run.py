"""qmpshutdown side by side with a raw QMP socket (the limit) and libvirt (what users run today).

    .venv/bin/python benchmarks/run.py [--runs N] [--sizes 1,8,32] [--no-libvirt]
                                       [--smoke] [--write]

Boots the fixture guests of fixtures/qemu-images (TCG), waits for their READY
serial line (boot time is never measured), then times each way of stopping
them, interleaved (A B C, B C A, ...), and prints medians and spread. With
--write the table also goes to benchmarks/RESULTS.md. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "tests"))
# Every guest booted, none restored from a saved state (tests/support/saved.py): a restored
# guest starts with an empty TCG translation cache, and its first press is slower.
os.environ.setdefault("QMPSHUTDOWN_TEST_RESTORE", "0")
sys.path.insert(0, str(HERE))

# The libvirt domain is TCG (type 'qemu'): run the direct guests under TCG too.
os.environ["QSD_ACCEL"] = "tcg"

import anyio  # noqa: E402
import fleetbench  # noqa: E402
import longrun  # noqa: E402
import rawqmp  # noqa: E402
from exitclock import ExitClock  # noqa: E402

import qmpshutdown  # noqa: E402
from support.guests import QEMU_BINARY, Guest, GuestFactory, images_dir, kill_leftovers  # noqa: E402

LIB, RAW, LIBVIRT = "qmpshutdown", "raw socket", "libvirt"
GRACE = 3.0  # the forced-stop grace period, seconds
HUNG_POLICY = qmpshutdown.ShutdownPolicy(connect_timeout=3.0)
FORCED_POLICY = qmpshutdown.ShutdownPolicy(powerdown_timeout=GRACE, repress_interval=None)
READY_TIMEOUT = 240.0  # per batch of guests: generous, TCG on 2 cores
BATCH = 8  # guests booted at once
SETTLE = 0.3  # seconds after the last READY before a timed stop
MANY_MEMORY = 192  # MiB per guest in the many-at-once case
OUTLIER_WALL = 5.0  # seconds: a many-at-once run this long logs its slowest record
CASES = ("cooperative", "forced", "hung", "many", "import", "fleet", "fastpath")
#: Sections of RESULTS.md written by hand (or by their own script), kept by --write.
KEPT = (
    ("<!-- save benchmark: begin -->", "<!-- save benchmark: end -->"),
    ("<!-- fast path notes: begin -->", "<!-- fast path notes: end -->"),
    ("<!-- listen benchmark: begin -->", "<!-- listen benchmark: end -->"),
)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- statistics


def spread(values: Sequence[float]) -> dict[str, float]:
    ordered = sorted(values)
    if len(ordered) >= 2:
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        q1 = q3 = ordered[0]
    return {"n": len(ordered), "median": statistics.median(ordered), "q1": q1, "q3": q3,
            "min": ordered[0], "max": ordered[-1]}  # fmt: skip


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if abs(seconds) < 1 else f"{seconds:.3f} s"


def ms_range(a: float, b: float) -> str:
    if max(abs(a), abs(b)) < 1:
        return f"{a * 1000:.1f}-{b * 1000:.1f} ms"
    return f"{a:.3f}-{b:.3f} s"


def verdict(ok: bool) -> str:
    return "**met**" if ok else "**missed**"


# ----------------------------------------------------------------------------- exit observer


class LoadWatch:
    """Samples, once a second, how many QEMUs not started by this benchmark are running."""

    def __init__(self) -> None:
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def foreign_qemus() -> int:
        me, count = os.getpid(), 0
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError, IndexError, ValueError):
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
                if not os.path.basename(cmdline[0]).startswith(b"qemu-system"):
                    continue
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                if ppid != me and not any(b"qsd-bench-" in arg for arg in cmdline):
                    count += 1
        return count

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            self.samples.append(self.foreign_qemus())

    def summary(self) -> str:
        self._stop.set()
        self._thread.join(5)
        busy = [n for n in self.samples if n]
        if not busy:
            return "no other QEMU ran on this machine during the run"
        return (
            f"other QEMUs (not this benchmark's) ran during {len(busy)} of {len(self.samples)} "
            f"one-second samples, up to {max(busy)} at once: the figures carry that noise"
        )


# ----------------------------------------------------------------------------- booting


async def boot(factory: GuestFactory, mode: str, count: int, memory: int = 256) -> list[Guest]:
    """Boot *count* guests in batches of BATCH, each waited for to print READY."""
    guests: list[Guest] = []
    while len(guests) < count:
        n = min(BATCH, count - len(guests))
        spec = {"mode": mode, "memory": memory, "ready_timeout": READY_TIMEOUT}
        guests += await factory.boot_many(*[spec] * n)
    await asyncio.sleep(SETTLE)
    return guests


def new_factory(scratch: Path) -> GuestFactory:
    return GuestFactory(Path(tempfile.mkdtemp(prefix="r", dir=scratch)))


def rotated(tools: Sequence[str], round_no: int) -> list[str]:
    k = round_no % len(tools)
    return [*tools[k:], *tools[:k]]


def libvirt_pid(mode: str) -> int:
    return int(Path(f"/run/libvirt/qemu/qsd-bench-{mode}.pid").read_text().strip())


# ----------------------------------------------------------------------------- 1 and 2: one guest


def event_time(events: Sequence[Any], name: str) -> float | None:
    """QEMU's timestamp (epoch seconds) of the first event *name* (records or raw dicts)."""
    for event in events:
        if isinstance(event, dict):
            if event.get("event") == name:
                stamp = event.get("timestamp", {})
                return float(stamp.get("seconds", 0)) + float(stamp.get("microseconds", 0)) / 1e6
        elif event.event == name:
            return float(event.timestamp)
    return None


async def stop_one(
    tool: str, guest: Guest | None, lv: Any, forced: bool
) -> tuple[float, float | None, float | None, str]:
    """Stop one guest with *tool*; return (call→known, exit→known, call→press, how it ended).

    call→press: from the call to QEMU's timestamp on POWERDOWN (the press as QEMU
    saw it; both clocks are this host's realtime clock). None for libvirt.
    """
    press: float | None = None
    if tool == LIBVIRT:
        import libvirtside

        dom = lv.start("ignores" if forced else "cooperative", READY_TIMEOUT)
        await asyncio.sleep(SETTLE)
        clock = ExitClock(libvirt_pid("ignores" if forced else "cooperative"))
        t0 = time.perf_counter()
        t1, how = libvirtside.stop(lv, dom, grace=GRACE if forced else None)
    else:
        assert guest is not None and guest.qmp_path is not None
        clock = ExitClock(guest.pid)
        if tool == LIB:
            policy = FORCED_POLICY if forced else qmpshutdown.ShutdownPolicy()
            wall0, t0 = time.time(), time.perf_counter()
            result = await qmpshutdown.shutdown(guest.qmp_path, policy)
            t1 = time.perf_counter()
            seen = event_time(result.events, "POWERDOWN")
            press = None if seen is None else seen - wall0
            how = f"{result.stage} {result.reason}"
            want = qmpshutdown.Stage.QUIT if forced else qmpshutdown.Stage.POWERDOWN
            if result.stage is not want:
                raise RuntimeError(f"qmpshutdown ended by {result.stage}, not {want}: {result}")
        else:
            wall0, t0 = time.time(), time.perf_counter()
            how, events = rawqmp.stop_with_events(str(guest.qmp_path), GRACE if forced else None)
            t1 = time.perf_counter()
            seen = event_time(events, "POWERDOWN")
            press = None if seen is None else seen - wall0
            want_reason = "host-qmp-quit" if forced else "guest-shutdown"
            if how != want_reason:
                raise RuntimeError(f"raw client: SHUTDOWN reason {how}, not {want_reason}")
    exited = clock.result()
    return t1 - t0, (t1 - exited) if exited is not None else None, press, how


async def one_guest_scenario(
    scratch: Path, tools: Sequence[str], runs: int, lv: Any, forced: bool
) -> dict[str, dict[str, list[float]]]:
    """Rounds of one guest per tool, booted together, stopped one after the other (rotated)."""
    mode = "ignores" if forced else "cooperative"
    data: dict[str, dict[str, list[float]]] = {
        t: {"total": [], "lag": [], "press": []} for t in tools
    }
    for round_no in range(runs):
        factory = new_factory(scratch)
        try:
            direct = [t for t in tools if t != LIBVIRT]
            guests = dict(zip(direct, await boot(factory, mode, len(direct)), strict=True))
            for tool in rotated(tools, round_no):
                total, lag, press, how = await stop_one(tool, guests.get(tool), lv, forced)
                data[tool]["total"].append(total)
                if lag is not None:
                    data[tool]["lag"].append(lag)
                if press is not None:
                    data[tool]["press"].append(press)
                log(f"{mode} round {round_no + 1}/{runs} {tool}: {ms(total)} ({how})")
        finally:
            factory.cleanup()
    return data


# ----------------------------------------------------------------------------- 3: hung QEMU


async def hung_scenario(scratch: Path, runs: int) -> list[tuple[float, str]]:
    out: list[tuple[float, str]] = []
    while len(out) < runs:
        factory = new_factory(scratch)
        try:
            for guest in await boot(factory, "cooperative", min(BATCH // 2, runs - len(out))):
                assert guest.qmp_path is not None
                os.kill(guest.pid, signal.SIGSTOP)
                t0 = time.perf_counter()
                result = await qmpshutdown.shutdown(guest.qmp_path, HUNG_POLICY)
                elapsed = time.perf_counter() - t0
                if result.stage is not qmpshutdown.Stage.TERMINATE:
                    raise RuntimeError(f"hung QEMU ended by {result.stage}, not terminate")
                out.append((elapsed, f"{result.stage} {result.cause}"))
                log(f"hung run {len(out)}/{runs}: {ms(elapsed)} ({result.stage}, {result.cause})")
        finally:
            factory.cleanup()
    return out


# ----------------------------------------------------------------------------- 4: many at once


async def many_scenario(
    scratch: Path, sizes: Sequence[int], runs_for: Callable[[int], int]
) -> dict[int, dict[str, list[dict[str, Any]]]]:
    data: dict[int, dict[str, list[dict[str, Any]]]] = {}
    for size in sizes:
        runs = runs_for(size)
        data[size] = {LIB: [], RAW: []}
        for round_no in range(runs):
            for tool in rotated((LIB, RAW), round_no):
                factory = new_factory(scratch)
                try:
                    guests = await boot(factory, "cooperative", size, memory=MANY_MEMORY)
                    child = "qmpshutdown" if tool == LIB else "raw"
                    proc = await asyncio.create_subprocess_exec(
                        sys.executable, str(HERE / "stopmany.py"), child,
                        *[str(g.qmp_path) for g in guests],
                        stdout=asyncio.subprocess.PIPE,
                    )  # fmt: skip
                    try:
                        out, _ = await asyncio.wait_for(proc.communicate(), 120)
                    except BaseException:
                        with contextlib.suppress(ProcessLookupError):
                            proc.kill()
                        await proc.wait()
                        raise
                    if proc.returncode != 0:
                        raise RuntimeError(f"stopmany.py {child} exited {proc.returncode}")
                    figures = json.loads(out)
                    if figures["errors"]:
                        raise RuntimeError(f"{tool}, {size} guests: {figures['errors'][:3]}")
                    data[size][tool].append(figures)
                    log(
                        f"many N={size} round {round_no + 1}/{runs} {tool}: "
                        f"wall {ms(figures['wall_s'])}, "
                        f"cpu/guest {ms(figures['cpu_s'] / size)}, "
                        f"peak RSS +{figures['peak_rss_kib']} KiB"
                    )
                    if figures.get("slowest") and figures["wall_s"] > OUTLIER_WALL:
                        log(f"  the slowest record: {figures['slowest']}")
                finally:
                    factory.cleanup()
    return data


# ----------------------------------------------------------------------------- 5: import


def import_scenario(runs: int) -> tuple[list[float], list[tuple[float, str]]]:
    code = (
        "import time; t = time.perf_counter(); import qmpshutdown; "
        "print(time.perf_counter() - t)"
    )
    cmd = [sys.executable, "-c", code]
    # .pyc cached, as an installed package has them: a shell with PYTHONDONTWRITEBYTECODE
    # set (this machine's) would otherwise compile every module on every import.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    subprocess.run(cmd, check=True, capture_output=True, env=env)  # warm the .pyc caches
    times = [float(subprocess.run(cmd, check=True, capture_output=True, text=True,
                                  env=env).stdout) for _ in range(runs)]  # fmt: skip
    trace = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import qmpshutdown"],
        check=True, capture_output=True, text=True, env=env,
    ).stderr  # fmt: skip
    # -X importtime prints children before their parent; the block of lines ending with
    # the top-level " qmpshutdown" is what the import statement cost. Keep the first
    # module outside the package on each branch (anyio, qemu.qmp, attrs, asyncio, ...).
    block: list[tuple[int, str, int]] = []
    for line in trace.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = line.split(":", 1)[1].split("|")
        if not cumulative.strip().isdigit():
            continue
        depth = (len(name) - len(name.lstrip()) - 1) // 2
        block.append((depth, name.strip(), int(cumulative)))
        if depth == 0:
            if name.strip() == "qmpshutdown":
                break
            block = []
    heavy: list[tuple[float, str]] = []
    parents: dict[int, str] = {}
    for depth, name, cumulative in reversed(block):
        parents[depth] = name
        parent = parents.get(depth - 1, "")
        if depth and parent.split(".")[0] == "qmpshutdown" != name.split(".")[0]:
            heavy.append((cumulative / 1e6, name))
    heavy.sort(reverse=True)
    return times, heavy[:6]


def fastpath_scenario(smoke: bool) -> tuple[str, str]:
    """phases.py's table and sampler_cost.py's line, each run in its own process."""
    stops, readings = ("5", "50") if smoke else ("200", "500")
    phases = subprocess.run([sys.executable, str(HERE / "phases.py"), "--stops", stops],
                            check=True, capture_output=True, text=True).stdout  # fmt: skip
    sampler = subprocess.run([sys.executable, str(HERE / "sampler_cost.py"), readings],
                             check=True, capture_output=True, text=True).stdout  # fmt: skip
    return phases, sampler


# ----------------------------------------------------------------------------- machine


def machine_info(lv: Any) -> list[tuple[str, str]]:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    qemu = subprocess.run(
        [QEMU_BINARY, "--version"], capture_output=True, text=True, check=False
    ).stdout.splitlines()[0]
    from importlib.metadata import version

    libs = ", ".join(f"{n} {version(n)}" for n in ("qmpshutdown", "qemu.qmp", "anyio", "attrs"))
    info = [
        ("CPU", f"{cpu}, {os.cpu_count()} cores"),
        ("kernel", platform.release()),
        ("QEMU", f"{qemu.removeprefix('QEMU emulator version ')}, TCG (no usable KVM)"),
        ("guest", "fixtures/qemu-images (Debian cloud kernel 6.1, busybox initramfs), q35"),
        ("Python", f"{platform.python_version()} ({platform.python_implementation()})"),
        ("libraries", libs),
        ("libvirt", lv.versions() if lv is not None else "not measured"),
        ("date", time.strftime("%Y-%m-%d %H:%M %Z")),
    ]
    return info


# ----------------------------------------------------------------------------- the report


def render(report: dict[str, Any]) -> str:
    out: list[str] = []
    add = out.append
    add("# qmpshutdown benchmarks\n")
    add(f"Command: `{report['command']}` ({report['duration']:.0f} s); {report['load']}.\n")
    add("| machine | |\n|---|---|")
    for key, value in report["machine"]:
        add(f"| {key} | {value} |")
    if report["libvirt_note"]:
        add(f"\n**libvirt column omitted**: {report['libvirt_note']}")
    add("")
    targets: list[tuple[str, str, bool | None]] = []

    def one_guest_table(title: str, key: str, forced: bool) -> None:
        data = report[key]
        add(f"## {title}\n")
        tail_head = "call → press (median) | exit → known (median)"
        if forced:
            add("| client | runs | median past grace | IQR | min-max | total (median) "
                f"| {tail_head} |")  # fmt: skip
        else:
            add(f"| client | runs | median | IQR | min-max | vs raw | {tail_head} |")
        add("|---|---|---|---|---|---|---|---|")
        base = spread(data[RAW]["total"])["median"] if RAW in data else None
        for tool, figures in data.items():
            values = [v - GRACE for v in figures["total"]] if forced else figures["total"]
            s = spread(values)
            lag = ms(statistics.median(figures["lag"])) if figures["lag"] else "-"
            press = ms(statistics.median(figures["press"])) if figures["press"] else "-"
            lag = f"{press} | {lag}"
            if forced:
                add(f"| {tool} | {s['n']} | {ms(s['median'])} | {ms_range(s['q1'], s['q3'])} "
                    f"| {ms_range(s['min'], s['max'])} | {ms(s['median'] + GRACE)} "
                    f"| {lag} |")  # fmt: skip
            else:
                ratio = f"{s['median'] / base:.2f}x ({(s['median'] - base) * 1000:+.1f} ms)"
                add(f"| {tool} | {s['n']} | {ms(s['median'])} | {ms_range(s['q1'], s['q3'])} "
                    f"| {ms_range(s['min'], s['max'])} | {ratio} | {lag} |")  # fmt: skip
        add("")

    if "cooperative" in report:
        one_guest_table(
            "1. Cooperative stop: call → caller knows QEMU exited", "cooperative", forced=False
        )
        add("qmpshutdown: `await qmpshutdown.shutdown(sock)` (default policy). raw socket: "
            "benchmarks/rawqmp.py (connect, greeting, qmp_capabilities, query-status, "
            "system_powerdown, SHUTDOWN, pidfd). libvirt: `dom.shutdown()` → lifecycle STOPPED "
            "event. *call → press*: from the call to QEMU's own timestamp on the POWERDOWN "
            "event (connect, handshake, query-status, system_powerdown). *exit → known*: from "
            "QEMU's real exit (a pidfd watched in a thread of the benchmark) to the caller "
            "knowing.\n")  # fmt: skip
        lib = spread(report["cooperative"][LIB]["total"])["median"]
        raw = spread(report["cooperative"][RAW]["total"])["median"]
        targets.append(("cooperative ≤ raw + 2 ms", f"{(lib - raw) * 1000:+.1f} ms, "
                        f"{lib / raw:.2f}x", lib - raw <= 0.002))  # fmt: skip
    if "forced" in report:
        one_guest_table(
            f"2. Forced stop of the `ignores` guest, grace {GRACE:g} s: how far past the grace",
            "forced", forced=True,
        )  # fmt: skip
        add(f"qmpshutdown: `powerdown_timeout={GRACE:g}, repress_interval=None` → quit. raw: "
            f"press, wait {GRACE:g} s for SHUTDOWN, quit, pidfd. libvirt: `dom.shutdown()`, "
            f"wait {GRACE:g} s for STOPPED, `dom.destroy()` (returns once QEMU is gone). "
            f"*past grace* = call → known - {GRACE:g} s (so it includes connecting).\n"
            )  # fmt: skip
        past = [v - GRACE for v in report["forced"][LIB]["total"]]
        s = spread(past)
        raw_past = spread([v - GRACE for v in report["forced"][RAW]["total"]])["median"]
        targets.append(("forced stop ≤ raw + 5 ms (median past the grace)",
                        f"{ms(s['median'])} past vs raw's {ms(raw_past)} "
                        f"({(s['median'] - raw_past) * 1000:+.1f} ms; worst {ms(s['max'])})",
                        s["median"] - raw_past <= 0.005))  # fmt: skip
    if "hung" in report:
        p = HUNG_POLICY
        times = [t for t, _ in report["hung"]]
        s = spread(times)
        bound = p.connect_timeout + p.terminate_timeout + p.kill_timeout
        add("## 3. Hung QEMU (SIGSTOPped): qmpshutdown's time to gone\n")
        add(f"Policy: default with `connect_timeout={p.connect_timeout:g}`. A stopped QEMU never "
            "greets: the ladder waits out connect_timeout, then SIGTERM + SIGCONT.\n")  # fmt: skip
        add("| runs | median | IQR | min-max | past connect_timeout (median) "
            "| bound: connect + terminate + kill | `policy.bound` |")  # fmt: skip
        add("|---|---|---|---|---|---|---|")
        add(f"| {s['n']} | {ms(s['median'])} | {ms_range(s['q1'], s['q3'])} "
            f"| {ms_range(s['min'], s['max'])} | {ms(s['median'] - p.connect_timeout)} "
            f"| {bound:g} s | {p.bound:g} s |\n")  # fmt: skip
        targets.append(("hung QEMU gone within the policy's bound",
                        f"{ms(s['max'])} worst vs {bound:g} s", s["max"] <= bound))  # fmt: skip
    if "many" in report:
        add("## 4. Many at once: N cooperative guests stopped concurrently\n")
        add("qmpshutdown: `await qmpshutdown.shutdown_many(socks)`; raw: one thread per guest. "
            "Each run in a fresh process (benchmarks/stopmany.py); CPU = that process's CPU "
            "time (all threads) over the stop; memory = how far its peak RSS rose over the stop "
            "(peak reset via /proc/self/clear_refs just before). "
            f"Guests: {MANY_MEMORY} MiB, booted in batches of {BATCH}.\n")  # fmt: skip
        add("| N | client | runs | wall median | wall IQR | wall min-max | vs raw "
            "| CPU per guest (median) | peak RSS rise (median) |")  # fmt: skip
        add("|---|---|---|---|---|---|---|---|---|")
        for size, per_tool in report["many"].items():
            raw_wall = spread([r["wall_s"] for r in per_tool[RAW]])["median"]
            for tool, runs in per_tool.items():
                w = spread([r["wall_s"] for r in runs])
                cpu = statistics.median(r["cpu_s"] / size for r in runs)
                rss = statistics.median(r["peak_rss_kib"] for r in runs)
                add(f"| {size} | {tool} | {w['n']} | {ms(w['median'])} "
                    f"| {ms_range(w['q1'], w['q3'])} | {ms_range(w['min'], w['max'])} "
                    f"| {w['median'] / raw_wall:.2f}x | {ms(cpu)} "
                    f"| {rss / 1024:.1f} MiB |")  # fmt: skip
            lib_wall = spread([r["wall_s"] for r in per_tool[LIB]])["median"]
            lib_cpu = statistics.median(r["cpu_s"] / size for r in per_tool[LIB])
            targets.append((f"N={size}: wall ≤ 1.2x raw", f"{lib_wall / raw_wall:.2f}x",
                            lib_wall / raw_wall <= 1.2))  # fmt: skip
            targets.append((f"N={size}: library CPU ≤ 5 ms per guest", ms(lib_cpu),
                            lib_cpu <= 0.005))  # fmt: skip
        if report.get("many_note"):
            add(f"\n{report['many_note']}")
        add("")
    if "import" in report:
        times, heavy = report["import"]
        s = spread(times)
        add("## 5. `import qmpshutdown` (fresh interpreter, .pyc cached)\n")
        add("| runs | median | IQR | min-max |\n|---|---|---|---|")
        add(f"| {s['n']} | {ms(s['median'])} | {ms_range(s['q1'], s['q3'])} "
            f"| {ms_range(s['min'], s['max'])} |\n")  # fmt: skip
        add("Heaviest imports (`-X importtime`, cumulative, one run): "
            + ", ".join(f"{name} {ms(t)}" for t, name in heavy) + "\n")
        targets.append(("import ≤ 80 ms", ms(s["median"]), s["median"] <= 0.080))
    if "fastpath" in report:
        phases, sampler = report["fastpath"]
        add("## 8. The fast path: where one cooperative stop's CPU goes\n")
        add("Command: `benchmarks/phases.py --stops 200` (stand-in QEMUs, one stop at a time, "
            "default policy, against a bare qemu.qmp client doing the same exchange, plain "
            "and quiet (bareqmp.QuietClient: no message pretty-printed for a DEBUG line "
            "that is off, as the library's own client), "
            "interleaved; then the same stops under cProfile on a CPU clock) and "
            "`benchmarks/sampler_cost.py 500` (a real guest with a disk).\n")  # fmt: skip
        add(phases.rstrip() + "\n")
        add(f"Sampler: {sampler.strip().removeprefix('sampler: ')}\n")
        first = phases.splitlines()[0]
        found = re.search(r"bare qemu\.qmp [\d.]+ ms \(([\d.]+)x\)", first)
        assert found is not None, first
        ratio = float(found.group(1))
        targets.append(("one stop's CPU ≤ 1.3x bare qemu.qmp", f"{ratio:.2f}x", ratio <= 1.3))
        per_reading = float(sampler.split("library ")[1].split(" ms")[0])
        targets.append(("sampler ≤ 0.2 ms CPU per reading", f"{per_reading:.3f} ms",
                        per_reading <= 0.2))  # fmt: skip
    add("## Targets\n")
    add("| target | measured | |\n|---|---|---|")
    for name, measured, ok in targets:
        add(f"| {name} | {measured} | {verdict(bool(ok))} |")
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, help="runs per client per case (default 10; smoke 1)")
    parser.add_argument("--sizes", help="guests stopped at once, comma-separated (default 1,8,32)")
    parser.add_argument(
        "--large-runs", type=int, default=3,
        help="runs per client for sizes above 8 (default 3: TCG boots are slow)",
    )  # fmt: skip
    parser.add_argument("--no-libvirt", action="store_true", help="leave the libvirt column out")
    parser.add_argument(
        "--smoke", action="store_true",
        help="a quick check that all runs (1 run, size 2, no libvirt)",
    )  # fmt: skip
    parser.add_argument("--only", help=f"run only these cases, comma-separated: {','.join(CASES)}")
    parser.add_argument("--write", action="store_true", help="also write benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    args.only = args.only.split(",") if args.only else list(CASES)
    if set(args.only) - set(CASES):
        parser.error(f"--only takes {', '.join(CASES)}")
    if args.smoke:
        args.no_libvirt = True
    args.runs = args.runs or (1 if args.smoke else 10)
    args.sizes = [int(s) for s in (args.sizes or ("2" if args.smoke else "1,8,32")).split(",")]
    if args.runs < 1 or any(s < 1 for s in args.sizes):
        parser.error("--runs and --sizes must be positive")
    return args


def open_libvirt(no_libvirt: bool) -> tuple[Any, str]:
    if no_libvirt:
        return None, "--no-libvirt given (or --smoke)."
    try:
        import libvirtside

        return libvirtside.Libvirt(images_dir()), ""
    except Exception as err:  # no binding, no daemon, no permission: run without it
        return None, f"libvirt could not be used ({type(err).__name__}: {err}); " + (
            "run `bash benchmarks/setup-libvirt` first."
        )


async def run_all(args: argparse.Namespace, scratch: Path, lv: Any, report: dict[str, Any]) -> None:
    await anyio.lowlevel.checkpoint()  # first use: anyio loads its asyncio backend
    tools = [LIB, RAW] + ([LIBVIRT] if lv is not None else [])
    smoke = args.smoke
    if "cooperative" in args.only:
        log(f"1. cooperative stop, {args.runs} rounds of {', '.join(tools)}")
        report["cooperative"] = await one_guest_scenario(scratch, tools, args.runs, lv, False)
    if "forced" in args.only:
        forced_runs = 1 if smoke else args.runs
        log(f"2. forced stop, {forced_runs} rounds")
        report["forced"] = await one_guest_scenario(scratch, tools, forced_runs, lv, True)
    if "hung" in args.only:
        hung_runs = 1 if smoke else args.runs
        log(f"3. hung QEMU, {hung_runs} runs")
        report["hung"] = await hung_scenario(scratch, hung_runs)
    if "many" not in args.only:
        return

    def runs_for(size: int) -> int:
        if smoke:
            return 1
        return args.runs if size <= 8 else min(args.runs, args.large_runs)

    log(f"4. many at once, sizes {args.sizes}")
    report["many"] = await many_scenario(scratch, args.sizes, runs_for)
    large = [s for s in args.sizes if s > 8 and runs_for(s) != args.runs]
    if smoke:
        report["many_note"] = "Smoke run: 1 run per client and size."
    elif large:
        report["many_note"] = (
            f"Sizes {', '.join(map(str, large))}: {runs_for(large[0])} runs per client instead "
            f"of {args.runs} (booting {large[0]} TCG guests takes about a minute on 2 cores)."
        )


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    images_dir()  # build the fixture guest first (cached)
    if shutil.which(QEMU_BINARY) is None:
        print(f"{QEMU_BINARY} not found: run bash .ci/setup", file=sys.stderr)
        return 1
    scratch = Path(tempfile.mkdtemp(prefix="qsd-bench-"))
    lv, libvirt_note = open_libvirt(args.no_libvirt)
    if libvirt_note:
        log(f"libvirt column omitted: {libvirt_note}")
    report: dict[str, Any] = {"libvirt_note": libvirt_note}
    load = LoadWatch()
    try:
        report["machine"] = machine_info(lv)
        asyncio.run(run_all(args, scratch, lv, report))
        if "import" in args.only:
            log("5. import time")
            report["import"] = import_scenario(max(args.runs, 5))
        if "fastpath" in args.only:
            log("8. the fast path (phases.py, sampler_cost.py)")
            report["fastpath"] = fastpath_scenario(args.smoke)
        if "fleet" in args.only:
            sizes = fleetbench.SMOKE_SIZES if args.smoke else fleetbench.SIZES
            log(f"6. fleets of fake QEMUs, sizes {sizes}")
            fleet = fleetbench.measure(sizes, 1 if args.smoke else min(args.runs, 3))
            for size, per_client in fleet.items():
                for client, runs in per_client.items():
                    if any(r["stopped"] != size for r in runs):
                        raise RuntimeError(f"fleet N={size} {client}: not all stopped")
            if args.write:
                fleetbench.plot(fleet)
            report["fleet"] = fleetbench.render(fleet, "benchmarks/run.py " + " ".join(argv))
    finally:
        if lv is not None:
            lv.close()
        left = kill_leftovers()
        if left:
            log(f"killed leftover QEMU pids {left}")
        shutil.rmtree(scratch, ignore_errors=True)
    report["load"] = load.summary()
    report["command"] = " ".join(["benchmarks/run.py", *argv])
    report["duration"] = time.monotonic() - started
    # The fleet section: this run's, or the one RESULTS.md has (fleetbench.py --write).
    text = fleetbench.keep_section(render(report), report.get("fleet") or fleetbench.old_section())
    # The long-run section (longrun.py --write) is kept as it is.
    for marks in ((longrun.BEGIN, longrun.END), *KEPT):
        old = fleetbench.old_section(HERE / "RESULTS.md", *marks)
        text = fleetbench.keep_section(text, old, *marks)
    print(text)
    if args.write:
        (HERE / "RESULTS.md").write_text(text)
        log(f"wrote {HERE / 'RESULTS.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
