"""What patience that listens costs: one inhibitor question, and per second of waiting.

Under adaptive patience with an agent, a guest that holds a block inhibitor is
asked again every 2 x ``sample_interval`` (2 s by default) whether it still
does (``InhibitorListener``, one ``guest-exec`` of ``busctl ... ListInhibitors``
and its ``guest-exec-status`` polls). This measures, for N questions in a row:

* against a stand-in agent (tests/support/fakeagent.py in its own process):
  our CPU per question and the agent calls per question — the library's side;
* against the real systemd guest in its ``inhibitor`` scenario (``--guest``):
  wall time per question, our CPU, and QEMU's CPU per question (what the
  guest's ``busctl`` costs under TCG).

Each figure is then given per second of waiting under the default policy.

    .venv/bin/python benchmarks/listen_cost.py [--questions N] [--guest] [--write]

``--write`` puts the section into benchmarks/RESULTS.md between its markers.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import anyio

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))

from qmpshutdown import ShutdownPolicy  # noqa: E402
from qmpshutdown._agent import AgentClient, AgentLink  # noqa: E402
from qmpshutdown._questions import linux  # noqa: E402
from qmpshutdown._rungs.listen import InhibitorListener  # noqa: E402
from qmpshutdown._waits import LISTEN_EVERY  # noqa: E402

RESULTS = HERE / "RESULTS.md"
BEGIN, END = "<!-- listen benchmark: begin -->", "<!-- listen benchmark: end -->"
HELD = (
    '{"type":"a(ssssuu)","data":[[["shutdown:handle-power-key","nightly-backup",'
    '"writing the archive","block",0,412]]]}\n'
)
FAKE_AGENT = """
import sys, anyio
sys.path.insert(0, {tests!r})
from support.fakeagent import FakeAgent
async def main():
    agent = FakeAgent({path!r}, osinfo={{"id": "debian", "name": "Debian GNU/Linux"}},
                      exec_outputs={{{argv!r}: (0, {held!r}, "")}})
    async with anyio.create_task_group() as tg:
        await tg.start(agent.serve)
        print("ready", flush=True)
anyio.run(main)
"""


class Counting(AgentClient):
    """The library's agent client, counting the calls it sends."""

    calls = 0

    async def _send(self, command: str, arguments: object) -> None:  # type: ignore[override]
        type(self).calls += 1
        await super()._send(command, arguments)  # type: ignore[arg-type]


def stand_in(path: str) -> types.SimpleNamespace:
    """What the listener reads of a Qemu: its agent link, policy and recorder."""
    policy = ShutdownPolicy()
    link = AgentLink(path, policy.command_timeout)
    recorder = types.SimpleNamespace(say=lambda message: None)
    return types.SimpleNamespace(agent=link, policy=policy, recorder=recorder)


async def ask(path: str, questions: int, qemu_pid: int | None = None) -> dict[str, float]:
    """Ask *questions* times in a row; our CPU, wall and calls per question (and QEMU's CPU)."""
    import qmpshutdown._agent as agent_module

    agent_module.AgentClient = Counting  # type: ignore[misc]  # count what AgentLink sends
    qemu = stand_in(path)
    listener = InhibitorListener(qemu)  # type: ignore[arg-type]
    assert await listener() is True  # the first: connect, guest-info, osinfo, users
    Counting.calls = 0
    qemu_before = _qemu_cpu(qemu_pid)
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(questions):
        assert await listener() is True
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    figures = {"cpu_ms": cpu / questions * 1e3, "wall_ms": wall / questions * 1e3,
               "calls": Counting.calls / questions}  # fmt: skip
    if qemu_pid is not None:
        figures["qemu_cpu_ms"] = (_qemu_cpu(qemu_pid) - qemu_before) / questions * 1e3
    await qemu.agent.close()
    return figures


def _qemu_cpu(pid: int | None) -> float:
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def fake(questions: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="qsd-listen-") as scratch:
        path = os.path.join(scratch, "qga.sock")
        code = FAKE_AGENT.format(tests=str(ROOT / "tests"), path=path,
                                 argv=linux.INHIBITORS_ARGV, held=HELD)  # fmt: skip
        server = subprocess.Popen(  # noqa: ASYNC220 (started once, before anything is timed)
            [sys.executable, "-c", code], stdout=subprocess.PIPE
        )
        try:
            assert server.stdout is not None and server.stdout.readline() == b"ready\n"
            return await ask(path, questions)
        finally:
            server.kill()
            server.wait()


async def guest(questions: int) -> dict[str, float]:
    from support.guests import GuestFactory

    with tempfile.TemporaryDirectory(prefix="qsd-listen-") as scratch:
        factory = GuestFactory(Path(scratch))
        try:
            booted = await factory.boot_systemd("inhibitor")
            assert booted.agent_path is not None
            return await ask(str(booted.agent_path), questions, booted.pid)
        finally:
            factory.cleanup()


def section(rows: list[tuple[str, dict[str, float]]], command: str) -> str:
    every = LISTEN_EVERY * ShutdownPolicy().sample_interval
    lines = [
        BEGIN,
        "## 10. Patience that listens: what asking for a held inhibitor costs (issue 22)",
        "",
        f"`benchmarks/listen_cost.py {command}`, "
        f"{time.strftime('%Y-%m-%d')}, this 2-core TCG machine. One question is one "
        "`guest-exec` of `busctl --json=short call ... ListInhibitors` and its "
        "`guest-exec-status` polls; a guest that holds an inhibitor is asked every "
        f"{every:g} s under the default policy (a guest that goes or works is never asked, "
        "an idle one once, when the wait would end).",
        "",
        "| against | agent calls per question | our CPU per question | wall per question "
        "| QEMU's CPU per question | per second of waiting: our CPU, QEMU's |",
        "|---|---|---|---|---|---|",
    ]
    for name, f in rows:
        qemu = f.get("qemu_cpu_ms")
        lines.append(
            f"| {name} | {f['calls']:.1f} | {f['cpu_ms']:.2f} ms | {f['wall_ms']:.1f} ms | "
            + ("-" if qemu is None else f"{qemu:.0f} ms")
            + f" | {f['cpu_ms'] / every:.2f} ms/s, "
            + ("-" if qemu is None else f"{qemu / every:.0f} ms/s")
            + " |"
        )
    lines += ["", END]
    return "\n".join(lines)


async def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=200)
    parser.add_argument("--guest", action="store_true", help="also the real systemd guest")
    parser.add_argument("--write", action="store_true", help="into benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    rows = [("stand-in agent (own process)", await fake(args.questions))]
    if args.guest:
        rows.append(("the systemd guest (TCG)", await guest(max(10, args.questions // 10))))
    text = section(rows, " ".join(argv))
    print(text)
    if args.write:
        results = RESULTS.read_text()
        if BEGIN in results:
            head, _, rest = results.partition(BEGIN)
            results = head + text + rest.partition(END)[2]
        else:
            results = results.rstrip("\n") + "\n\n" + text + "\n"
        RESULTS.write_text(results)


if __name__ == "__main__":
    anyio.run(main, sys.argv[1:], backend="asyncio")
