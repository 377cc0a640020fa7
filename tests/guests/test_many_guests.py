"""shutdown_many() on real guests: results in the targets' order, failures kept apart.

Its argument checks, without guests, are in tests/test_many.py.
"""

from __future__ import annotations

import time

import anyio
import attrs
import pytest

import qmpshutdown
from qmpshutdown import Stage
from support.guests import Guest, qmp_connect, qmp_disconnect
from support.policies import FAULTS, PRESSED
from support.records import as_pressed

pytestmark = pytest.mark.asyncio


#: FAULTS' quick escalation, with commands and connections given time: these tests are about
#: order and isolation, not the monitor's bounds (test_faults.py). In CI, with FAULTS' 1 s,
#: replies more than 1 s late on a loaded host ("Unknown ID ... dropped") forced a
#: cooperative guest (stage terminate).
POLICY = attrs.evolve(FAULTS, powerdown_timeout=3.0, connect_timeout=5.0, command_timeout=5.0)


def _told(result: object) -> str:
    """A result's summary and its steps, for a failing assert's message."""
    if not isinstance(result, qmpshutdown.ShutdownResult):
        return repr(result)
    steps = (f"  {s.stage.value} {s.outcome.value}: {s.detail}" for s in result.steps)
    return "\n".join([result.summary(), *steps])


@pytest.mark.qemu
@pytest.mark.parametrize("limit", [None, 1])
async def test_results_in_order_and_one_failure_stops_nothing(guests, tmp_path, limit):
    cooperative, ignoring, other = await guests.boot_many("cooperative", "ignores", "cooperative")
    missing = tmp_path / "missing.sock"
    # The cooperative guests get a long press step (PRESSED): it ends at their power-off.
    targets = [
        qmpshutdown.Job(cooperative.qmp_path, policy=PRESSED),
        missing,
        ignoring.qmp_path,
        qmpshutdown.Job(other.qmp_path, policy=PRESSED),
    ]
    with anyio.fail_after(60):
        results = await qmpshutdown.shutdown_many(targets, POLICY, limit=limit)
    results = [as_pressed(r) for r in results]
    assert len(results) == 4
    assert isinstance(results[1], qmpshutdown.ConnectError)
    assert str(missing) in str(results[1])
    first, forced, last = results[0], results[2], results[3]
    said = "\n".join(_told(r) for r in (first, forced, last))
    assert [r.stage for r in (first, forced, last)] == [
        Stage.POWERDOWN,
        Stage.QUIT,
        Stage.POWERDOWN,
    ], said
    assert [r.pid for r in (results[0], results[2], results[3])] == [
        cooperative.pid,
        ignoring.pid,
        other.pid,
    ]
    # QEMU's own clock, not a wall-time bound: all at once, the last guest was pressed while
    # the ignoring one still waited out its powerdown_timeout; one at a time, only after it.
    pressed, quit_at = _qemu_time(last, "POWERDOWN"), _qemu_time(forced, "SHUTDOWN")
    assert (pressed < quit_at) if limit is None else (pressed > quit_at), said
    for guest in (cooperative, ignoring, other):
        assert await guest.wait_exit(5) == 0


#: Quick escalation, and only the rungs each test names (a per-VM policy shows in the stage).
QUIT_ONLY = attrs.evolve(POLICY, stages=("powerdown", "quit"))


TERM_ONLY = attrs.evolve(POLICY, stages=("powerdown", "terminate", "kill"))


def _qemu_time(result: qmpshutdown.ShutdownResult, event: str) -> float:
    return next(e.timestamp for e in result.events if e.event == event)


@pytest.mark.qemu
async def test_jobs_and_targets_mixed_keep_order_with_their_own_policy_and_pid(guests):
    cooperative, ignoring, tcp_like = await guests.boot_many("cooperative", "ignores", "ignores")
    seen: set[str] = set()
    targets = [
        qmpshutdown.Job(ignoring.qmp_path, policy=QUIT_ONLY, name="web1"),
        cooperative.qmp_path,
        qmpshutdown.Job(tcp_like.qmp_path, policy=TERM_ONLY, pid=tcp_like.pid),
    ]
    # The plain target (cooperative) takes the call's policy: PRESSED, its press step ends at
    # the power-off (a loaded host has kept a booted guest past POLICY's 3 s, CI).
    with anyio.fail_after(PRESSED.bound + 10):
        results = await qmpshutdown.shutdown_many(
            targets, PRESSED, on_progress=lambda update: seen.add(update.target)
        )
    results = [as_pressed(r) for r in results]
    assert [r.stage for r in results] == [Stage.QUIT, Stage.POWERDOWN, Stage.TERMINATE], "\n".join(
        _told(r) for r in results
    )
    assert [r.pid for r in results] == [ignoring.pid, cooperative.pid, tcp_like.pid]
    assert "web1" in seen and str(cooperative.qmp_path) in seen
    for guest in (cooperative, ignoring, tcp_like):
        await guest.wait_exit(5)  # raises if still running


@pytest.mark.qemu
async def test_a_wrong_pid_in_a_job_is_that_vms_error_only(guests):
    first, second = await guests.boot_many("cooperative", "cooperative")
    targets = [qmpshutdown.Job(first.qmp_path, pid=second.pid), second.qmp_path]
    with anyio.fail_after(PRESSED.bound + 10):
        results = await qmpshutdown.shutdown_many(targets, PRESSED)
    results = [as_pressed(r) for r in results]
    assert isinstance(results[0], qmpshutdown.PidMismatchError)
    assert isinstance(results[1], qmpshutdown.ShutdownResult), results[1]
    assert results[1].graceful, _told(results[1])
    assert first.alive()  # nothing was sent to it


@pytest.mark.qemu
async def test_group_1_starts_only_after_group_0_ended_and_a_failure_stops_nothing(
    guests, tmp_path
):
    web, slow, db = await guests.boot_many("cooperative", "ignores", "cooperative")
    gone_at: dict[str, float] = {}
    began_at: dict[str, float] = {}

    def stamp(update: qmpshutdown.Progress) -> None:
        if update.kind is qmpshutdown.ProgressKind.GONE:
            gone_at.setdefault(update.target, time.time())
        if update.kind is qmpshutdown.ProgressKind.BEGIN:
            began_at.setdefault(update.target, time.time())

    targets = [
        qmpshutdown.Job(db.qmp_path, group=1, name="db", policy=PRESSED),
        qmpshutdown.Job(web.qmp_path, name="web", policy=PRESSED),
        qmpshutdown.Job(tmp_path / "missing.sock", name="missing"),  # fails at once
        qmpshutdown.Job(slow.qmp_path, name="slow"),  # forced after POLICY's 3 s
    ]
    with anyio.fail_after(PRESSED.bound + 10):
        results = await qmpshutdown.shutdown_many(targets, POLICY, on_progress=stamp)
    results = [as_pressed(r) for r in results]
    db_result, web_result, missing, slow_result = results
    assert isinstance(missing, qmpshutdown.ConnectError)
    assert [r.stage for r in (db_result, web_result, slow_result)] == [
        Stage.POWERDOWN, Stage.POWERDOWN, Stage.QUIT,
    ], "\n".join(_told(r) for r in (db_result, web_result, slow_result))  # fmt: skip
    # Our clock: db's ladder began after both of group 0 were seen gone.
    assert began_at["db"] >= max(gone_at["web"], gone_at["slow"])
    # QEMU's own clock: db's press came after the SHUTDOWN of every QEMU of group 0.
    assert _qemu_time(db_result, "POWERDOWN") > max(
        _qemu_time(web_result, "SHUTDOWN"), _qemu_time(slow_result, "SHUTDOWN")
    )
    for guest in (web, slow, db):
        await guest.wait_exit(5)  # raises if still running


async def _settled(guest: Guest, quick: float = 0.02, in_a_row: int = 5) -> None:
    """Wait until *guest*'s monitor answers ``query-status`` within *quick* s, *in_a_row* times."""
    assert guest.qmp_path is not None
    client = await qmp_connect(guest.qmp_path)
    try:
        with anyio.fail_after(30):
            row = 0
            while row < in_a_row:
                start = anyio.current_time()
                await client.execute("query-status")
                row = row + 1 if anyio.current_time() - start <= quick else 0
                await anyio.sleep(0.05)
    finally:
        await qmp_disconnect(client)


@pytest.mark.qemu
@pytest.mark.alone  # fitted to 8 s, each QMP command gets ~60 ms: no neighbours on the CPUs
@pytest.mark.timeout(400)
async def test_deadline_8_s_six_ignoring_two_cooperative(guests):
    deadline, margin = 8.0, 1.0
    modes = ["ignores"] * 6 + ["cooperative"] * 2
    specs = [{"mode": m, "ready_timeout": 180.0} for m in modes]
    booted = await guests.boot_many(*specs)
    # Restored guests (support.saved) answered QMP slower than the 60 ms this deadline leaves
    # each command for a moment after their start (in CI, twice: presses=0): wait for quick
    # answers first.
    async with anyio.create_task_group() as tg:
        for guest in booted:
            tg.start_soon(_settled, guest)
    policy = qmpshutdown.ShutdownPolicy(repress_interval=1.0)  # the default, a short re-press
    with anyio.fail_after(deadline + 10):
        started = anyio.current_time()
        results = await qmpshutdown.shutdown_many(
            [g.qmp_path for g in booted], policy, deadline=deadline
        )
        elapsed = anyio.current_time() - started
    assert elapsed <= deadline + margin
    for guest, result in zip(booted, results, strict=True):
        assert isinstance(result, qmpshutdown.ShutdownResult), result
        assert result.elapsed <= deadline + margin
        await guest.wait_exit(1)  # raises if QEMU is left running
        said = _told(result)
        if guest.mode == "cooperative":
            assert (result.stage, result.graceful) == (Stage.POWERDOWN, True), said
        else:
            assert result.stage is Stage.QUIT, said
            assert result.cause is qmpshutdown.Cause.IGNORED_POWER_BUTTON
            # The graceful wait took all but the reserve: 8 s - 2 s.
            assert result.step(Stage.POWERDOWN).outcome is qmpshutdown.Outcome.TIMEOUT
            assert result.presses >= 5
    assert all(not guest.alive() for guest in booted)
