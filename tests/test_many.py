"""shutdown_many(): many VMs at once, results in the targets' order, failures kept apart."""

from __future__ import annotations

import anyio
import pytest

import qmpshutdown
from policies import FAULTS
from qmpshutdown import Stage

pytestmark = pytest.mark.asyncio

POLICY = FAULTS


@pytest.mark.qemu
@pytest.mark.parametrize("limit", [None, 1])
async def test_results_in_order_and_one_failure_stops_nothing(guests, tmp_path, limit):
    cooperative, ignoring, other = await guests.boot_many("cooperative", "ignores", "cooperative")
    missing = tmp_path / "missing.sock"
    targets = [cooperative.qmp_path, missing, ignoring.qmp_path, other.qmp_path]
    with anyio.fail_after(30):
        started = anyio.current_time()
        results = await qmpshutdown.shutdown_many(targets, POLICY, limit=limit)
        elapsed = anyio.current_time() - started
    assert len(results) == 4
    assert isinstance(results[1], qmpshutdown.ConnectError)
    assert str(missing) in str(results[1])
    assert [r.stage for r in (results[0], results[2], results[3])] == [
        Stage.POWERDOWN,
        Stage.QUIT,
        Stage.POWERDOWN,
    ]
    assert [r.pid for r in (results[0], results[2], results[3])] == [
        cooperative.pid,
        ignoring.pid,
        other.pid,
    ]
    if limit is None:
        assert (
            elapsed < POLICY.powerdown_timeout + 1.0
        )  # all at once: the ignoring one sets the pace
    for guest in (cooperative, ignoring, other):
        assert await guest.wait_exit(5) == 0


async def test_a_bad_target_is_refused_before_anything_starts(tmp_path):
    with pytest.raises(TypeError):
        await qmpshutdown.shutdown_many([tmp_path / "a.sock", 42])


@pytest.mark.parametrize("limit", [0, -1, 1.5, True])
async def test_limit_must_be_a_positive_int(limit):
    with pytest.raises(ValueError):
        await qmpshutdown.shutdown_many([], limit=limit)


async def test_no_targets_no_results():
    assert await qmpshutdown.shutdown_many([]) == []
