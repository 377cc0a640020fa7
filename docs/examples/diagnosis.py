"""Regenerate the real records in docs/why.md ("The guest's own words").

Boots the fixture's systemd guest (fixtures/qemu-images/build_systemd.py) in each
scenario that will not power off — a block inhibitor, logind told to ignore the
key, a unit still stopping — side by side, stops each with the library (its agent
given), and writes each record (the summary line, the steps, what the guest
said) between the markers in docs/why.md. Run from the repository:
``.venv/bin/python docs/examples/diagnosis.py`` (about two minutes under TCG).
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

import qmpshutdown
from support.guests import GuestFactory

WHY = Path(__file__).resolve().parents[1] / "why.md"
BEGIN, END = "<!-- diagnosis-records:begin -->", "<!-- diagnosis-records:end -->"
POLICY = qmpshutdown.ShutdownPolicy(
    stages=("powerdown", "quit"), powerdown_timeout=4.0, repress_interval=2.0,
    command_timeout=10.0, diagnose_timeout=40.0, freeze_before_force=False,
)  # fmt: skip
SCENARIOS = {
    "inhibitor": "an application holds a block inhibitor",
    "power-key-ignored": "logind told to ignore the power key",
    "stop-job": "shutting down, a unit still stopping",
}


async def record(factory: GuestFactory, scenario: str, out: dict[str, str]) -> None:
    guest = await factory.boot_systemd(scenario)
    try:
        result = await qmpshutdown.shutdown(
            guest.qmp_path, POLICY, agent=guest.agent_path, pid=guest.pid
        )
    except qmpshutdown.ShutdownFailed as failed:
        result = failed.result
    lines = [f"$ # {scenario}: {SCENARIOS[scenario]}", result.summary()]
    for step in result.steps:
        took = step.ended - step.started
        lines.append(f"  {step.stage.value:9} {step.outcome.value:8} {took:5.2f}s  {step.detail}")
    for finding in result.diagnosis or ():
        lines.append(f"  guest said: {finding}")
        lines.append(f"    (asked: {finding.source})")
    out[scenario] = "\n".join(lines)


async def main() -> None:
    out: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="qsd-diag-") as scratch:
        factory = GuestFactory(Path(scratch))
        try:
            async with anyio.create_task_group() as tg:
                for scenario in SCENARIOS:
                    tg.start_soon(record, factory, scenario, out)
        finally:
            factory.cleanup()
    block = "\n\n".join(out[scenario] for scenario in SCENARIOS)
    # Times differ from run to run; the pid is the guest's own (it names who holds what).
    text = WHY.read_text()
    new = re.sub(
        re.escape(BEGIN) + r".*?" + re.escape(END),
        lambda _: f"{BEGIN}\n```text\n{block}\n```\n{END}",
        text,
        flags=re.DOTALL,
    )
    WHY.write_text(new)
    print(block)


if __name__ == "__main__":
    anyio.run(main, backend="asyncio")
