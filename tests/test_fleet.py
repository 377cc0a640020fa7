"""Fleets: the deadline arithmetic, and our own descriptor limit (fake QEMUs)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import anyio
import attrs
import pytest

import qmpshutdown
from qmpshutdown import ShutdownPolicy, Stage
from qmpshutdown._fleet import (
    FDS_PER_LADDER,
    FORCED_RESERVE,
    MIN_LEFT,
    check_deadline,
    fit_policy,
    open_descriptors,
)
from support.policies import FAULTS, GUEST

# ----------------------------------------------------------------------------- the deadline


@pytest.mark.parametrize("deadline", [0, -1, float("nan"), float("inf"), True, "8"])
def test_deadline_must_be_a_positive_number(deadline):
    with pytest.raises(ValueError, match="deadline"):
        check_deadline(deadline)


def test_a_policy_that_fits_is_kept():
    assert fit_policy(GUEST, GUEST.bound) is GUEST
    assert fit_policy(GUEST, GUEST.bound + 10) is GUEST


@pytest.mark.parametrize("left", [MIN_LEFT, 1.0, 3.0, 8.0, 30.0, 100.0, 144.0])
@pytest.mark.parametrize(
    "policy",
    [
        ShutdownPolicy(),
        ShutdownPolicy(repress_interval=1.0),
        GUEST,
        FAULTS,
        ShutdownPolicy(stages=("powerdown",)),
        ShutdownPolicy(stages=("quit", "kill")),
        ShutdownPolicy(stages=("powerdown", "kill"), connect_timeout=60.0),
        # adaptive: the bound counts the cap, not powerdown_timeout (the host unit's policy)
        ShutdownPolicy(patience="adaptive", max_powerdown_timeout=600.0),
        ShutdownPolicy(patience="adaptive", powerdown_timeout=30.0, max_powerdown_timeout=90.0),
    ],
)
def test_a_fitted_policy_ends_within_what_is_left(policy, left):
    fitted = fit_policy(policy, left)
    assert fitted.bound <= left + 1e-9
    assert fitted.stages == policy.stages
    for field in attrs.fields(ShutdownPolicy):
        if field.name in ("powerdown_timeout", "connect_timeout", "command_timeout",
                          "quit_timeout", "terminate_timeout", "kill_timeout"):  # fmt: skip
            assert getattr(fitted, field.name) <= getattr(policy, field.name)
    if fitted is not policy and policy.allows(Stage.POWERDOWN):
        # Nearly the whole of what is left goes to the guest: all but the reserve.
        # (halved when the agent rung's wait shares it)
        reserve = min(FORCED_RESERVE, left / 4)
        waits = 1 + policy.allows(Stage.AGENT)
        wanted = min(policy.powerdown_timeout, (left - reserve) / waits)
        assert fitted.powerdown_timeout >= wanted - 1e-9
        if policy.patience == "adaptive":
            assert fitted.patience == "adaptive"
            cap = min(policy.max_powerdown_timeout, (left - reserve) / waits)
            assert fitted.max_powerdown_timeout >= cap - 1e-9


def test_the_default_policy_at_8_s_as_documented():
    fitted = fit_policy(ShutdownPolicy(), 8.0, agent=False)  # a VM without an agent socket
    assert Stage.AGENT not in fitted.stages
    assert fitted.powerdown_timeout == pytest.approx(6.1)
    # the reserve of 2 s: connect 15 %, quit 10 %, terminate and kill 5 % each, the
    # commands the rest (55 %, over the 11 the bound counts)
    assert (fitted.connect_timeout, fitted.command_timeout) == pytest.approx((0.3, 1.1 / 11))
    assert (fitted.quit_timeout, fitted.terminate_timeout, fitted.kill_timeout) == pytest.approx(
        (0.2, 0.1, 0.1)
    )
    assert fitted.bound == pytest.approx(8.0)


def test_too_little_left_gets_the_floor():
    assert fit_policy(ShutdownPolicy(), -3.0).bound == pytest.approx(MIN_LEFT)


# ----------------------------------------------------------------------------- fake QEMUs
# (the fixtures fakes and fake_binary: conftest.py)


@pytest.mark.asyncio
async def test_a_ladder_holds_what_the_budget_counts(fakes):
    (path,) = fakes(1, delay_ms=300)
    before = open_descriptors()
    held: list[int] = []

    def sample(update: qmpshutdown.Progress) -> None:
        if update.message.startswith("pressed the power button"):
            held.append(open_descriptors() - before)

    with anyio.fail_after(10):
        result = await qmpshutdown.shutdown(path, on_progress=sample)
    assert result.graceful
    assert held and set(held) == {FDS_PER_LADDER}
    assert open_descriptors() == before


_LOW_LIMIT_CHILD = textwrap.dedent(
    """
    import json, logging, resource, sys
    soft, hard, squeeze = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "squeeze"
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    import anyio, qmpshutdown, qmpshutdown._fleet as fleet
    if squeeze:  # a budget that believes in twice the descriptors: EMFILE must be retried
        fleet.FD_HEADROOM, fleet.FDS_PER_LADDER = 0, 1
    async def main():
        results = await qmpshutdown.shutdown_many(sys.argv[4:])
        print(json.dumps({
            "soft": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
            "results": [
                {"stage": str(r.stage), "graceful": r.graceful}
                if isinstance(r, qmpshutdown.ShutdownResult) else {"error": repr(r)}
                for r in results
            ],
        }))
    anyio.run(main)
    """
)


@pytest.mark.parametrize(
    ("soft", "hard", "mode"),
    [(64, 64, "budget"), (64, 64, "squeeze"), (64, 4096, "budget")],
    ids=["hard-limit-64", "emfile-retried", "soft-raised"],
)
def test_more_vms_than_descriptors_all_stopped(fakes, soft, hard, mode):
    paths = fakes(100)
    child = subprocess.run(
        [sys.executable, "-c", _LOW_LIMIT_CHILD, str(soft), str(hard), mode, *map(str, paths)],
        capture_output=True, text=True, timeout=100,
    )  # fmt: skip
    assert child.returncode == 0, child.stderr
    report = json.loads(child.stdout)
    assert report["results"] == [{"stage": "powerdown", "graceful": True}] * len(paths), (
        child.stderr
    )
    assert "Too many open files" not in child.stdout
    if hard > soft:
        assert report["soft"] > soft
        assert "raised the soft limit of open files (RLIMIT_NOFILE) from 64" in child.stderr
    else:
        assert report["soft"] == soft
    if mode == "squeeze":
        assert "trying again once another VM is done" in child.stderr
    for proc in fakes.started:
        assert proc.wait(10) == 0
