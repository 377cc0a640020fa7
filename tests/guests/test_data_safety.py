"""Data safety (our claim): a guest frozen before a forced stop comes back clean, N of N.

Forced stop (``stages=("quit",)``) of guests writing to ext4, with and without
the freeze; after each stop the disk is read without a journal replay. With
the freeze: no recovery needed and the last counter the guest reported durable
before the freeze is read back, in N of N runs (asserted). Without: how many
needed recovery is reported, not asserted (docs/data-safety.md has the figures;
``python benchmarks/data_safety.py`` regenerates it).
"""

from __future__ import annotations

import pytest

from support.datasafety import trials

pytestmark = [pytest.mark.asyncio, pytest.mark.qemu, pytest.mark.timeout(400)]

N = 5


async def test_a_frozen_guest_comes_back_clean_n_of_n(guests):
    runs = await trials(guests, N, freeze=True)
    assert len(runs) == N
    assert [run.froze for run in runs] == [True] * N
    assert [run.needs_recovery for run in runs] == [False] * N, runs
    assert [run.last_data_readable for run in runs] == [True] * N, runs


async def test_without_the_freeze_report_how_many_needed_recovery(guests, capsys):
    runs = await trials(guests, N, freeze=False)
    assert len(runs) == N
    assert not any(run.froze for run in runs)
    recovered = sum(run.needs_recovery for run in runs)
    readable = sum(run.last_data_readable for run in runs)
    with capsys.disabled():
        print(
            f"\nwithout the freeze: needs recovery {recovered}/{N}, "
            f"last data readable without replay {readable}/{N}"
        )
