"""The data-safety trial: force-stop a guest writing to ext4, with or without the freeze.

Shared by tests/guests/test_data_safety.py (which asserts the freeze's N of N) and
benchmarks/data_safety.py (which writes docs/data-safety.md). Each trial boots
an ``ignores`` guest with its agent and the ext4 disk, lets it write, stops it
with ``quit`` only (``stages=("quit",)``), and reads the disk afterwards with
:func:`guests.inspect_disk` (journal state, the counter without a replay).
"""

from __future__ import annotations

import re

import anyio
import attrs

import qmpshutdown
from qmpshutdown import Stage
from support.guests import Guest, GuestFactory, inspect_disk
from support.policies import GUEST

#: quit only: the forced stop under test; the freeze (when on) comes right before it.
POLICY = attrs.evolve(GUEST, stages=("quit",), freeze_timeout=10.0)
#: Writes the guest makes before it is stopped (about one every few tenths of a second).
WRITES_BEFORE_STOP = 5
_WROTE = re.compile(r"^QMPSHUTDOWN-GUEST-WROTE n=(\d+)$")


@attrs.frozen
class Trial:
    """One forced stop and what the disk held afterwards."""

    freeze: bool
    froze: bool  #: a freeze step ended done
    last_wrote: int | None  #: the last counter the guest reported durable before the stop
    needs_recovery: bool
    counter: int | None  #: /counter read in place, without a journal replay

    @property
    def last_data_readable(self) -> bool:
        return (
            self.counter is not None
            and self.last_wrote is not None
            and self.counter >= self.last_wrote
        )


def last_wrote(guest: Guest) -> int | None:
    values = [int(m.group(1)) for line in guest.serial_lines() if (m := _WROTE.match(line))]
    return values[-1] if values else None


async def trial(guest: Guest, *, freeze: bool) -> Trial:
    """Stop *guest* (booted with disk and agent) by force; inspect its disk."""
    await guest.wait_for_serial(f"QMPSHUTDOWN-GUEST-WROTE n={WRITES_BEFORE_STOP}\n", 60.0)
    policy = attrs.evolve(POLICY, freeze_before_force=freeze)
    seen: dict[str, int | None] = {}

    def on_progress(update: qmpshutdown.Progress) -> None:
        # With the freeze: what was durable once it completed (writes block while frozen).
        # Without: what was durable right before quit was sent.
        if update.step is not None and update.step.stage is Stage.FREEZE:
            seen["last"] = last_wrote(guest)
        if update.step is None and update.stage is Stage.QUIT and "last" not in seen:
            seen["last"] = last_wrote(guest)

    with anyio.fail_after(policy.bound + 10):
        result = await qmpshutdown.shutdown(
            guest.qmp_path, policy, agent=guest.agent_path, on_progress=on_progress
        )
    await guest.wait_exit(10.0)
    assert guest.disk_path is not None
    state = await anyio.to_thread.run_sync(inspect_disk, guest.disk_path)
    freeze_step = result.step(Stage.FREEZE)
    return Trial(
        freeze=freeze,
        froze=freeze_step is not None and freeze_step.outcome.value == "done",
        last_wrote=seen.get("last"),
        needs_recovery=state.needs_recovery,
        counter=state.counter,
    )


async def trials(factory: GuestFactory, n: int, *, freeze: bool) -> list[Trial]:
    """*n* trials, the guests booted and stopped in parallel."""
    spec = {"mode": "ignores", "disk": True, "agent": True}
    booted = await factory.boot_many(*[spec] * n)
    results: list[Trial | None] = [None] * n

    async def one(i: int) -> None:
        results[i] = await trial(booted[i], freeze=freeze)

    async with anyio.create_task_group() as tg:
        for i in range(n):
            tg.start_soon(one, i)
    return [t for t in results if t is not None]
