"""Fleets at scale: ``shutdown_many`` over N fake QEMUs (real processes), beside the raw client.

    .venv/bin/python benchmarks/fleetbench.py [--sizes 1,10,100,1000] [--runs 3]
                                              [--smoke] [--write]

Each run starts N stand-in QEMUs (tests/support/fakeqemu.py run by a copy of the
interpreter named ``qemu-system-fake``, so the library pins them like QEMU:
socket, SO_PEERCRED, pidfd, /proc/PID/exe), then stops them all at once from
a fresh process (benchmarks/stopmany.py): wall time, CPU per VM, peak RSS
rise per VM, and the most descriptors that process held (sampled from here,
through /proc/PID/fd, every 5 ms: no cost to the measured process). At large N
the library also runs under a soft limit of 1,024 open files (hard 20,000 or
what the machine allows: the library raises it) and under a hard limit of
1,024 (it must wait its turns). ``--write`` puts the table in RESULTS.md (its
own section, between markers) and the curves in fleet.png (needs matplotlib:
``pip install -e '.[bench]'``). run.py runs this as its case ``fleet``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
FAKEQEMU = HERE.parent / "tests" / "support" / "fakeqemu.py"
SIZES = (1, 10, 100, 1000)
SMOKE_SIZES = (1, 10)
LIMITED_FROM = 500  # the open-file limit variants run from this N on
LIB, BARE, RAW = "qmpshutdown", "bare qemu.qmp", "raw socket"
LIB_SOFT, LIB_HARD = "qmpshutdown, soft limit 1024", "qmpshutdown, hard limit 1024"
CLIENTS = {
    LIB: ["qmpshutdown"],
    LIB_SOFT: ["--nofile=1024", "qmpshutdown"],
    LIB_HARD: ["--nofile=1024:1024", "qmpshutdown"],
    BARE: ["bare"],
    RAW: ["raw"],
}
BEGIN, END = "<!-- fleet benchmark: begin -->", "<!-- fleet benchmark: end -->"
PLOT = HERE / "fleet.png"
LOADS: list[float] = []  # the 1-minute load average after each run (2 shared cores)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class FakeFleet:
    """N fake QEMUs listening on unix sockets; every one killed and reaped by :meth:`close`."""

    def __init__(self, binary: Path, scratch: Path, n: int) -> None:
        env = dict(os.environ, PYTHONHOME=sys.base_prefix)
        self.dir = Path(tempfile.mkdtemp(prefix="f", dir=scratch))
        self.paths = [self.dir / f"{i}.sock" for i in range(n)]
        self.procs: list[subprocess.Popen[bytes]] = []
        try:
            for path in self.paths:
                self.procs.append(subprocess.Popen(
                    [str(binary), "-S", str(FAKEQEMU), str(path)],
                    env=env, stdin=subprocess.DEVNULL,
                ))  # fmt: skip
            end = time.monotonic() + 120
            while not all(path.exists() for path in self.paths):
                if time.monotonic() > end:
                    raise TimeoutError(f"{n} fake QEMUs did not listen in 120 s")
                time.sleep(0.02)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


def peak_fds(pid: int, stop: threading.Event, out: list[int]) -> None:
    """Sample how many descriptors *pid* holds until *stop*; keep the peak in out[0]."""
    while not stop.wait(0.005):
        with contextlib.suppress(OSError):
            out[0] = max(out[0], len(os.listdir(f"/proc/{pid}/fd")))


def one_run(client: str, paths: list[Path]) -> dict[str, Any]:
    argv = [sys.executable, str(HERE / "stopmany.py"), *CLIENTS[client], *map(str, paths)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stop, peak = threading.Event(), [0]
    sampler = threading.Thread(target=peak_fds, args=(proc.pid, stop, peak), daemon=True)
    sampler.start()
    try:
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        stop.set()
        sampler.join(5)
    if proc.returncode != 0:
        raise RuntimeError(f"{client} at N={len(paths)} failed:\n{err.decode()[-3000:]}")
    figures: dict[str, Any] = json.loads(out)
    figures["peak_fds"] = peak[0]
    figures["stopped"] = len(paths) - len(figures["errors"])
    return figures


def measure(sizes: tuple[int, ...], runs: int) -> dict[int, dict[str, list[dict[str, Any]]]]:
    scratch = Path(tempfile.mkdtemp(prefix="qsd-fleet-"))
    binary = scratch / "qemu-system-fake"
    shutil.copy2(os.path.realpath(sys.executable), binary)
    data: dict[int, dict[str, list[dict[str, Any]]]] = {}
    try:
        for n in sizes:
            clients = [LIB, BARE, RAW] + ([LIB_SOFT, LIB_HARD] if n >= LIMITED_FROM else [])
            data[n] = {client: [] for client in clients}
            for round_no in range(runs):
                k = round_no % len(clients)
                for client in clients[k:] + clients[:k]:  # rotated, like run.py
                    fleet = FakeFleet(binary, scratch, n)
                    try:
                        figures = one_run(client, fleet.paths)
                    finally:
                        fleet.close()
                    data[n][client].append(figures)
                    LOADS.append(os.getloadavg()[0])
                    log(f"fleet N={n} {client} run {round_no + 1}/{runs}: "
                        f"{figures['wall_s'] * 1000:.0f} ms, {figures['stopped']}/{n} stopped, "
                        f"{figures['peak_fds']} fds")  # fmt: skip
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return data


def summary(runs: list[dict[str, Any]], n: int) -> dict[str, float]:
    return {
        "wall": statistics.median(r["wall_s"] for r in runs),
        "cpu": statistics.median(r["cpu_s"] / n for r in runs),
        "rss": statistics.median(r["peak_rss_kib"] / n for r in runs),
        "fds": max(r["peak_fds"] for r in runs),
        "stopped": min(r["stopped"] for r in runs),
    }


def render(data: dict[int, dict[str, list[dict[str, Any]]]], command: str) -> str:
    out = [BEGIN, "## 6. Fleets: N fake QEMUs stopped at once (benchmarks/fleetbench.py)\n"]
    out.append(
        f"Command: `{command}`. Stand-in QEMUs (fakeqemu.py: real processes, real sockets, "
        "pinned by pidfd; SHUTDOWN 5 ms after the press), stopped from a fresh process "
        "(stopmany.py): `shutdown_many(paths)` with the default policy, a bare qemu.qmp "
        "client (bareqmp.py, all at once), or the raw client with one thread per VM. "
        "Medians; *fds* is the most descriptors the stopping process held (sampled every "
        "5 ms from outside). The machine's soft and hard limits are "
        f"{_limits()}; the *limit 1024* rows set them in the stopping process."
        + (
            f" Load average (1 min) after the runs: {min(LOADS):.1f} to {max(LOADS):.1f}."
            if LOADS
            else ""
        )
        + "\n"
    )
    out.append("| N | client | runs | wall | vs bare | vs raw | CPU per VM | CPU vs bare "
               "| peak RSS rise per VM | fds (max) | stopped (worst run) |")  # fmt: skip
    out.append("|---|---|---|---|---|---|---|---|---|---|---|")
    targets: list[tuple[str, str, bool]] = []
    for n, per_client in data.items():
        raw = summary(per_client[RAW], n)["wall"]
        bare = summary(per_client[BARE], n)
        for client, runs in per_client.items():
            s = summary(runs, n)
            out.append(f"| {n} | {client} | {len(runs)} | {s['wall'] * 1000:.0f} ms "
                       f"| {s['wall'] / bare['wall']:.2f}x | {s['wall'] / raw:.2f}x "
                       f"| {s['cpu'] * 1000:.2f} ms | {s['cpu'] / bare['cpu']:.2f}x "
                       f"| {s['rss']:.0f} KiB | {s['fds']} | {s['stopped']}/{n} |")  # fmt: skip
        if n == max(data):
            lib = summary(per_client[LIB], n)
            cpu_ratio, wall_ratio = lib["cpu"] / bare["cpu"], lib["wall"] / bare["wall"]
            targets += [
                (f"N={n}: CPU per VM ≤ 1.3x bare qemu.qmp", f"{cpu_ratio:.2f}x "
                 f"({lib['cpu'] * 1000:.2f} vs {bare['cpu'] * 1000:.2f} ms)", cpu_ratio <= 1.3),
                (f"N={n}: wall ≤ 1.3x bare qemu.qmp", f"{wall_ratio:.2f}x", wall_ratio <= 1.3),
                (f"N={n}: peak RSS rise ≤ 100 KiB per VM", f"{lib['rss']:.0f} KiB",
                 lib["rss"] <= 100),
            ]  # fmt: skip
            for client in (LIB_SOFT, LIB_HARD):
                if client in per_client:
                    s = summary(per_client[client], n)
                    targets.append((f"N={n}, {client}: all stopped", f"{s['stopped']}/{n}",
                                    s["stopped"] == n))  # fmt: skip
    if PLOT.exists():
        out.append(f"\n![cost against N]({PLOT.name})\n")
    out.append("| target | measured | |\n|---|---|---|")
    for name, measured, ok in targets:
        out.append(f"| {name} | {measured} | {'**met**' if ok else '**missed**'} |")
    out.append(END)
    return "\n".join(out) + "\n"


def _limits() -> str:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return f"{soft} and {hard}"


def plot(data: dict[int, dict[str, list[dict[str, Any]]]]) -> bool:
    """Draw wall time, CPU and RSS per VM against N into fleet.png; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("no matplotlib: fleet.png not drawn (pip install -e '.[bench]')")
        return False
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    panels = (("wall", "wall time (s)", 1), ("cpu", "CPU per VM (ms)", 1000),
              ("rss", "peak RSS rise per VM (KiB)", 1))  # fmt: skip
    clients = [c for c in CLIENTS if any(c in per for per in data.values())]
    for ax, (key, title, scale) in zip(axes, panels, strict=True):
        for client in clients:
            points = [(n, summary(per[client], n)[key] * scale)
                      for n, per in data.items() if client in per]  # fmt: skip
            style = "o--" if client in (RAW, BARE) else "o-"
            ax.plot(*zip(*points, strict=True), style, label=client)
        ax.set_xscale("log")
        ax.set_xlabel("N VMs stopped at once")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(PLOT, dpi=90)
    return True


def write_section(
    section: str, results: Path = HERE / "RESULTS.md", begin: str = BEGIN, end: str = END
) -> None:
    """Put *section* in RESULTS.md, replacing the one there (the rest is run.py's)."""
    text = results.read_text() if results.exists() else "# qmpshutdown benchmarks\n"
    text = keep_section(text, section, begin, end)
    results.write_text(text)


def keep_section(text: str, section: str | None, begin: str = BEGIN, end: str = END) -> str:
    """*text* with its section (the fleet one by default) replaced by *section* (kept if None)."""
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end) + "\n?", re.S)
    if section is None:
        return text
    if pattern.search(text):
        return pattern.sub(lambda _: section, text)
    return text.rstrip("\n") + "\n\n" + section


def old_section(
    results: Path = HERE / "RESULTS.md", begin: str = BEGIN, end: str = END
) -> str | None:
    """The section (the fleet one by default) in RESULTS.md now, if any (run.py keeps it)."""
    if not results.exists():
        return None
    match = re.search(re.escape(begin) + ".*?" + re.escape(end) + "\n", results.read_text(), re.S)
    return match.group(0) if match else None


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", help="N, comma-separated (default 1,10,100,1000)")
    parser.add_argument("--runs", type=int, default=3, help="runs per client per N (default 3)")
    parser.add_argument("--smoke", action="store_true", help="N=1,10 once: checks that it runs")
    parser.add_argument(
        "--write", action="store_true", help="write RESULTS.md's section and the plot"
    )
    args = parser.parse_args(argv)
    sizes = SMOKE_SIZES if args.smoke else SIZES
    if args.sizes:
        sizes = tuple(int(n) for n in args.sizes.split(","))
    data = measure(sizes, 1 if args.smoke else args.runs)
    for n, per_client in data.items():
        for client, runs in per_client.items():
            failed = [r for r in runs if r["stopped"] != n]
            if failed:
                log(f"N={n} {client}: not all stopped: {failed[0]['errors'][:3]}")
                return 1
    command = "benchmarks/fleetbench.py " + " ".join(argv)
    if args.write:
        plot(data)
        write_section(render(data, command.strip()))
        log("wrote benchmarks/RESULTS.md (fleet section)")
    else:
        print(render(data, command.strip()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
