"""shutdown_many(): many VMs at once, results in the targets' order, failures kept apart."""

from __future__ import annotations

import pytest

import qmpshutdown

pytestmark = pytest.mark.asyncio


async def test_a_bad_target_is_refused_before_anything_starts(tmp_path):
    with pytest.raises(TypeError):
        await qmpshutdown.shutdown_many([tmp_path / "a.sock", 42])


@pytest.mark.parametrize("limit", [0, -1, 1.5, True])
async def test_limit_must_be_a_positive_int(limit):
    with pytest.raises(ValueError):
        await qmpshutdown.shutdown_many([], limit=limit)


async def test_no_targets_no_results():
    assert await qmpshutdown.shutdown_many([]) == []


# ----------------------------------------------------------------------------- fleets (issue 13)


async def test_a_bad_deadline_is_refused(tmp_path):
    for deadline in (0, -1.0, float("inf"), "8"):
        with pytest.raises(ValueError, match="deadline"):
            await qmpshutdown.shutdown_many([tmp_path / "a.sock"], deadline=deadline)
