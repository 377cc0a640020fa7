"""The short chaos soak: random guests, policies and faults, every invariant checked.

Each test is one trial of ``tests/support/chaos.py``, drawn from its seed; a failure
prints the seed and its fault schedule, and ``python tests/support/chaos.py --seed N``
(or ``pytest tests/guests/test_chaos.py -k seed-N``) replays it.
``QMPSHUTDOWN_CHAOS_SEED`` (first seed, default 1) and
``QMPSHUTDOWN_CHAOS_TRIALS`` (default 8) pick the trials.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import require_qemu

from support.chaos import Trial, run_trial

pytestmark = [pytest.mark.asyncio, pytest.mark.qemu, pytest.mark.chaos]

FIRST = int(os.environ.get("QMPSHUTDOWN_CHAOS_SEED", "1"))
TRIALS = int(os.environ.get("QMPSHUTDOWN_CHAOS_TRIALS", "8"))
SEEDS = range(FIRST, FIRST + TRIALS)


@pytest.mark.parametrize("seed", SEEDS, ids=[f"seed-{seed}" for seed in SEEDS])
async def test_chaos_trial_keeps_every_invariant(seed: int, tmp_path: Path) -> None:
    require_qemu()
    trial = Trial.draw(seed)
    await run_trial(trial, tmp_path)  # raises chaos.Violation with the seed and schedule
    assert all(target.outcome is not None for target in trial.targets)
