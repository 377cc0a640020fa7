"""Live progress: typed updates, in order, as the ladder runs; a callback that raises is ignored."""

from __future__ import annotations

import logging

import anyio
import attrs
import pytest

from qmpshutdown import Progress, ProgressKind, Stage, climb
from support.fakes import FakeQemu
from support.policies import FAKE

pytestmark = pytest.mark.asyncio


async def run(qemu: FakeQemu, on_progress, policy=FAKE):
    with anyio.fail_after(10):
        return await climb(
            qemu.monitor, qemu.process, policy, started=anyio.current_time(), name="vm1",
            on_progress=on_progress,
        )  # fmt: skip


async def test_a_cooperative_stop_reports_begin_events_gone_and_end_in_order():
    updates: list[Progress] = []
    result = await run(FakeQemu(), updates.append)
    kinds = [(u.kind.value, u.stage.value if u.stage else None) for u in updates]
    assert kinds[0] == ("begin", "powerdown")
    assert ("note", "powerdown") in kinds  # "pressed the power button"
    events = [u.event.event for u in updates if u.kind is ProgressKind.EVENT]
    assert events == ["POWERDOWN", "SHUTDOWN"]
    assert ("gone", None) in kinds
    ends = [u for u in updates if u.kind is ProgressKind.END]
    assert [u.step for u in ends] == list(result.steps)
    assert all(u.target == "vm1" for u in updates)
    elapsed = [u.elapsed for u in updates if u.kind is not ProgressKind.END]
    assert elapsed == sorted(elapsed)


async def test_each_step_begins_and_ends_once_and_events_carry_their_record():
    updates: list[Progress] = []
    result = await run(FakeQemu(guest="ignores"), updates.append)
    begins = [u.stage for u in updates if u.kind is ProgressKind.BEGIN]
    ends = [u.step.stage for u in updates if u.kind is ProgressKind.END and u.step]
    assert begins == ends == [s.stage for s in result.steps] == [Stage.POWERDOWN, Stage.QUIT]
    event_updates = [u.event for u in updates if u.kind is ProgressKind.EVENT]
    assert event_updates == list(result.events)
    messages = [u.message for u in updates if u.kind is ProgressKind.NOTE]
    assert messages[:2] == ["pressed the power button", "pressed the power button again (press 2)"]
    assert "sent quit" in messages
    end = next(u for u in updates if u.kind is ProgressKind.END)
    assert end.message.startswith("powerdown timeout: pressed ")


async def test_a_callback_that_raises_is_logged_once_and_never_breaks_the_ladder(caplog):
    calls = 0

    def broken(update: Progress) -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("display is broken")

    caplog.set_level(logging.ERROR, logger="qmpshutdown")
    result = await run(FakeQemu(guest="ignores"), broken)
    assert result.stage is Stage.QUIT
    assert calls > 5  # still called for every update
    errors = [r for r in caplog.records if "on_progress raised" in r.getMessage()]
    assert len(errors) == 1 and errors[0].exc_info is not None


async def test_progress_is_frozen():
    update = Progress(target="t", elapsed=0.0, stage=None, message="m")
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        update.message = "other"  # type: ignore[misc]
    assert update.kind is ProgressKind.NOTE and update.step is None and update.event is None
