"""Patience that reads the guest, against fakes on virtual time: the sampler's record, the
adaptive deadline (busy moves it on, idle brings it forward, the cap holds), the press schedule,
and the causes busy / stalled / ignored-power-button as plain functions of the record.
"""

from __future__ import annotations

import itertools

import anyio
import attrs
import looptime
import pytest

import qmpshutdown._patience as patience_module
from qmpshutdown import Activity, Cause, ShutdownPolicy, Stage, climb
from qmpshutdown._cli import parse_command_line
from qmpshutdown._patience import Reading, Sampler, demand, vcpu_times
from qmpshutdown._policy import wait_budget
from qmpshutdown._verdict import likely_cause, press_cause
from support.fakes import FakeMonitor, FakeQemu

ADAPTIVE = ShutdownPolicy(
    patience="adaptive", powerdown_timeout=60, max_powerdown_timeout=120, idle_cutoff=5,
    repress_interval=10, quit_timeout=1, terminate_timeout=1, kill_timeout=1,
    command_timeout=1,
)  # fmt: skip
FIXED = attrs.evolve(ADAPTIVE, patience="fixed", powerdown_timeout=10)


def busy_between(*spans):
    """A vCPU that works in each (start, end) span: its total wanted seconds at time t."""

    def wanted(t):
        return sum(max(0.0, min(t, end) - start) for start, end in spans)

    return wanted


IDLE = busy_between()
BUSY_FOREVER = busy_between((0, 10_000))


def run(
    monkeypatch, policy, *, wanted=IDLE, off_at=None, io_per_second=0, with_pid=True,
    guest="ignores",
):  # fmt: skip
    """Stop a fake whose vCPU works as *wanted* says (powering off at *off_at*), virtual time."""
    qemu = FakeQemu(guest=guest)

    async def cpus(qemu_, arguments):
        return [{"cpu-index": 0, "thread-id": 99}]

    async def blockstats(qemu_, arguments):
        written = int(io_per_second * (anyio.current_time() - started))
        stats = {"rd_bytes": 0, "wr_bytes": written, "rd_operations": 0, "wr_operations": 1}
        return [{"device": "vda", "stats": stats}]

    qemu.handlers["query-cpus-fast"] = cpus
    qemu.handlers["query-blockstats"] = blockstats
    started = 0.0

    def times(pid, tids):
        used = wanted(anyio.current_time() - started)
        return used, used

    monkeypatch.setattr(patience_module, "vcpu_times", times)

    async def stop():
        nonlocal started
        started = anyio.current_time()
        async with anyio.create_task_group() as tg:
            if off_at is not None:

                async def power_off():
                    await anyio.sleep(off_at)
                    if qemu.runstate == "running":
                        qemu.power_off()

                tg.start_soon(power_off)
            result = await climb(
                qemu.monitor, qemu.process if with_pid else None, policy, started=started
            )
            tg.cancel_scope.cancel()
        return result

    loop = looptime.new_event_loop()
    try:
        return loop.run_until_complete(stop())
    finally:
        loop.close()


def powerdown_seconds(result):
    step = result.step("powerdown")
    return step.ended - step.started


# ---- the deadline ------------------------------------------------------------------------


def test_an_idle_guest_is_escalated_after_the_idle_cutoff_not_the_timeout(monkeypatch):
    result = run(monkeypatch, ADAPTIVE)
    assert result.stage is Stage.QUIT
    assert result.cause is Cause.IGNORED_POWER_BUTTON
    assert powerdown_seconds(result) == pytest.approx(5, abs=0.05)
    assert result.presses == 1
    assert "escalating early" in result.step("powerdown").detail
    assert result.activity.ended == "idle-cutoff"
    assert result.activity.longest_idle == pytest.approx(5, abs=0.05)
    assert result.activity.busy_seconds == 0


def test_a_re_press_gets_its_chance_but_the_escalation_comes_at_most_one_interval_late(
    monkeypatch,
):
    # idle_cutoff 15 > repress 10: the re-press at 10 gets 10 s, so the end comes at 20, not 15
    result = run(monkeypatch, attrs.evolve(ADAPTIVE, idle_cutoff=15))
    assert powerdown_seconds(result) == pytest.approx(20, abs=0.05)
    assert result.presses == 2  # 0 and 10: the schedule is kept, no press is added or moved
    assert result.activity.ended == "idle-cutoff"


def test_a_busy_guest_gets_past_the_timeout_and_powers_off(monkeypatch):
    policy = attrs.evolve(ADAPTIVE, powerdown_timeout=10)
    result = run(monkeypatch, policy, wanted=busy_between((0, 25)), off_at=25)
    assert (result.stage, result.graceful, result.cause) == (Stage.POWERDOWN, True, None)
    assert result.elapsed == pytest.approx(25, abs=0.05)
    assert result.presses == 3  # 0, 10, 20: re-pressing keeps its schedule
    assert result.activity.ended == "powered-off"
    assert result.activity.busy_seconds == pytest.approx(25, abs=1.01)


def test_a_busy_guest_is_forced_at_the_cap_with_cause_busy(monkeypatch):
    policy = attrs.evolve(ADAPTIVE, powerdown_timeout=10, max_powerdown_timeout=40)
    result = run(monkeypatch, policy, wanted=BUSY_FOREVER)
    assert (result.stage, result.cause) == (Stage.QUIT, Cause.BUSY)
    assert powerdown_seconds(result) == pytest.approx(40, abs=0.05)
    assert result.presses == 4
    assert result.activity.ended == "cap" and result.activity.busy_at_end
    assert "(the cap)" in result.step("powerdown").detail


def test_the_deadline_moves_on_while_busy_then_the_guest_gets_the_idle_cutoff(monkeypatch):
    policy = attrs.evolve(ADAPTIVE, powerdown_timeout=10)
    result = run(monkeypatch, policy, wanted=busy_between((0, 30)))
    # last busy reading at 30; idle 5 s after it (the re-press at 30 had its 5 s too)
    assert powerdown_seconds(result) == pytest.approx(35, abs=1.05)
    assert result.cause is Cause.STALLED  # it worked, then idled without powering off
    assert result.activity.ended == "idle-cutoff"


def test_disk_writes_alone_count_as_work(monkeypatch):
    policy = attrs.evolve(ADAPTIVE, powerdown_timeout=10, max_powerdown_timeout=30)
    result = run(monkeypatch, policy, io_per_second=4 * 2**20)
    assert (result.cause, result.activity.ended) == (Cause.BUSY, "cap")
    assert result.activity.bytes_written == pytest.approx(30 * 4 * 2**20, rel=0.05)
    assert result.activity.vcpu_seconds == 0


def test_a_stalled_guest_is_escalated_early_with_cause_stalled(monkeypatch):
    result = run(monkeypatch, ADAPTIVE, wanted=busy_between((0, 1.5)))
    assert (result.stage, result.cause) == (Stage.QUIT, Cause.STALLED)
    assert powerdown_seconds(result) == pytest.approx(7, abs=0.05)  # busy reading at 2, then 5
    assert result.activity.reacted and not result.activity.busy_at_end


@pytest.mark.parametrize(
    ("wanted", "cause"),
    [(IDLE, Cause.IGNORED_POWER_BUTTON), (busy_between((0, 1.5)), Cause.STALLED),
     (BUSY_FOREVER, Cause.BUSY)],
)  # fmt: skip
def test_fixed_patience_waits_its_timeout_and_still_tells_the_cause(monkeypatch, wanted, cause):
    result = run(monkeypatch, FIXED, wanted=wanted)
    assert powerdown_seconds(result) == pytest.approx(10, abs=0.05)
    assert (result.stage, result.cause, result.presses) == (Stage.QUIT, cause, 1)
    assert result.activity.ended == "timeout"
    # One reading a second: 1 s .. 9 s for sure; the one due at 10 s ties with the deadline.
    assert result.activity.samples in (9, 10)


def test_without_a_pid_nothing_is_read_and_adaptive_waits_like_fixed(monkeypatch):
    policy = attrs.evolve(ADAPTIVE, powerdown_timeout=10, stages=("powerdown", "quit"))
    result = run(monkeypatch, policy, with_pid=False)
    assert result.activity is None
    assert powerdown_seconds(result) == pytest.approx(10, abs=0.05)
    assert result.cause is Cause.IGNORED_POWER_BUTTON


def test_a_cooperative_guest_is_as_quick_under_adaptive_patience(monkeypatch):
    result = run(monkeypatch, ADAPTIVE, guest="cooperative")
    assert (result.stage, result.graceful, result.presses) == (Stage.POWERDOWN, True, 1)
    assert result.elapsed < 0.01
    assert result.activity is None  # gone before the first interval ended


@pytest.mark.parametrize("policy", [ADAPTIVE, FIXED])
def test_a_guest_that_powers_off_at_once_costs_no_reading(monkeypatch, policy):
    # Pay only for what runs: the baseline reading waits its grace; the guest is off by then.
    commands: list[str] = []
    monkeypatch.setattr(FakeMonitor, "execute", recording(FakeMonitor.execute, commands))
    result = run(monkeypatch, policy, off_at=0.1)
    assert result.graceful and result.activity is None
    assert commands == ["query-status", "set-action", "system_powerdown"]


def recording(execute, commands):
    async def execute_and_note(self, command, arguments=None):
        commands.append(command)
        return await execute(self, command, arguments)

    return execute_and_note


def test_a_monitor_without_the_queries_leaves_the_guest_unread(monkeypatch):
    qemu = FakeQemu(guest="ignores")
    policy = attrs.evolve(ADAPTIVE, powerdown_timeout=3, stages=("powerdown", "quit"))

    async def stop():
        return await climb(qemu.monitor, qemu.process, policy, started=anyio.current_time())

    loop = looptime.new_event_loop()
    try:
        result = loop.run_until_complete(stop())
    finally:
        loop.close()
    assert result.activity is None
    assert powerdown_seconds(result) == pytest.approx(3, abs=0.05)


# ---- the sampler's arithmetic ------------------------------------------------------------


def test_an_interval_is_busy_on_cpu_or_disk_and_idle_stretches_are_counted():
    patience = Sampler(ShutdownPolicy(), pid=1)
    patience.quiet_since = 0.0
    readings = [
        Reading(0.0, 0.0, 0.0, (0, 0, 0)),
        Reading(1.0, 0.9, 1.0, (0, 0, 0)),  # CPU: busy
        Reading(2.0, 0.9, 1.0, (0, 0, 0)),  # idle
        Reading(3.0, 0.9, 1.0, (0, 2**20, 8)),  # disk: busy
        Reading(4.0, 0.9, 1.01, (0, 2**20, 8)),  # idle
        Reading(6.0, 0.9, 1.02, (0, 2**20, 8)),  # idle
    ]
    busy = [patience.take(before, after) for before, after in itertools.pairwise(readings)]
    assert busy == [True, False, True, False, False]  # what a 'sample' progress update says
    assert patience.take(readings[1], readings[1]) is None  # no time between: no interval
    activity = patience.activity(powered_off=False)
    assert activity == Activity(
        samples=5, vcpu_seconds=0.9, bytes_read=0, bytes_written=2**20, longest_idle=3.0,
        busy_seconds=2.0, busy_at_end=False, ended=None,
    )  # fmt: skip


def test_run_queue_wait_counts_as_work_only_beside_runs():
    """A busy vCPU sharing its core reads busy; an idle one that waits to wake does not."""
    patience = Sampler(ShutdownPolicy(), pid=1)
    patience.quiet_since = 0.0
    sharing = (Reading(0.0, 0.0, 0.0, None), Reading(1.0, 0.34, 1.0, None))  # 3 a core
    crowded = (Reading(1.0, 0.34, 1.0, None), Reading(2.0, 0.48, 2.0, None))  # 7 a core
    waking = (Reading(2.0, 0.48, 2.0, None), Reading(3.0, 0.49, 2.31, None))  # CI's idle guest
    first_press = (Reading(3.0, 0.49, 2.31, None), Reading(3.75, 0.55, 2.72, None))  # restored
    busy = [patience.take(*pair) for pair in (sharing, crowded, waking, first_press)]
    assert busy == [True, True, False, False]
    assert demand(0.34, 1.0) == pytest.approx(1.0)  # all of its wait counts
    assert demand(0.01, 0.31) == pytest.approx(0.03)  # twice its run, not 0.31
    assert demand(0.5, 0.4) == 0.5 and demand(-0.1, 0.2) == 0.0  # never less than the run


def test_vcpu_times_reads_this_process_and_none_for_a_missing_thread():
    import os
    import threading

    times = vcpu_times(os.getpid(), [threading.get_native_id()])
    assert times is not None and 0 < times[0] <= times[1]
    assert vcpu_times(os.getpid(), [2**22 + 7]) is None


def test_activity_to_dict_keys():
    activity = Activity(
        samples=3, vcpu_seconds=1.5, bytes_read=1, bytes_written=2, longest_idle=2.0,
        busy_seconds=1.0, busy_at_end=False, ended="idle-cutoff",
    )  # fmt: skip
    assert activity.to_dict() == {
        "samples": 3, "vcpu_seconds": 1.5, "bytes_read": 1, "bytes_written": 2,
        "longest_idle_s": 2.0, "busy_s": 1.0, "busy_at_end": False, "ended": "idle-cutoff",
    }  # fmt: skip


# ---- the causes as plain functions ---------------------------------------------------------


def activity(**changes):
    fields = dict(samples=10, vcpu_seconds=0.0, bytes_read=0, bytes_written=0, longest_idle=10.0,
                  busy_seconds=0.0, busy_at_end=False, ended="timeout")  # fmt: skip
    return Activity(**(fields | changes))


@pytest.mark.parametrize(
    ("seen", "cause"),
    [
        (None, Cause.IGNORED_POWER_BUTTON),
        (activity(), Cause.IGNORED_POWER_BUTTON),
        (activity(busy_seconds=1.0), Cause.STALLED),
        (activity(busy_seconds=10.0, busy_at_end=True), Cause.BUSY),
    ],
)
def test_press_cause(seen, cause):
    assert press_cause(seen) is cause
    assert likely_cause([], [], runstate="running", presses=2, activity=seen) is cause


def test_events_and_named_causes_come_before_the_activity():
    from qmpshutdown import EventRecord

    reset = [EventRecord("RESET", 0.0, {"guest": True, "reason": "guest-reset"})]
    busy = activity(busy_seconds=5.0, busy_at_end=True)
    assert likely_cause([], reset, runstate="running", presses=1, activity=busy) is Cause.REBOOTED
    assert likely_cause([], [], runstate="running", presses=0, activity=busy) is None


# ---- the policy and the command line -----------------------------------------------------


def test_the_policy_defaults_and_budget():
    policy = ShutdownPolicy()
    assert (policy.patience, policy.max_powerdown_timeout, policy.idle_cutoff) == (
        "fixed", 600.0, 15.0,
    )  # fmt: skip
    adaptive = attrs.evolve(policy, patience="adaptive")
    assert adaptive.bound - policy.bound == pytest.approx(600 - 60)
    assert wait_budget(adaptive, 60) == 600 and wait_budget(policy, 60) == 60


@pytest.mark.parametrize(
    "changes",
    [
        {"patience": "patient"},
        {"patience": "adaptive", "powerdown_timeout": 700},
        {"idle_cutoff": 0},
        {"max_powerdown_timeout": float("inf")},
        {"busy_cpu": -1},
        {"busy_io": True},
        {"sample_interval": 0},
    ],
)
def test_the_policy_rejects(changes):
    with pytest.raises(ValueError):
        attrs.evolve(ShutdownPolicy(), **changes)


def test_a_long_fixed_timeout_needs_no_cap():
    assert ShutdownPolicy(powerdown_timeout=3600).max_powerdown_timeout == 600


def test_the_command_line_sets_the_patience():
    argv = ["--timeout", "900", "--max-timeout", "3600", "--idle-cutoff", "20",
            "--patience", "adaptive", "/run/vm.sock"]  # fmt: skip
    policy = parse_command_line(argv).policy
    assert (policy.patience, policy.powerdown_timeout) == ("adaptive", 900)
    assert (policy.max_powerdown_timeout, policy.idle_cutoff) == (3600, 20)


def test_the_command_line_rejects_an_unknown_patience(capsys):
    with pytest.raises(SystemExit):
        parse_command_line(["--patience", "patient", "/run/vm.sock"])
    assert "invalid choice" in capsys.readouterr().err
