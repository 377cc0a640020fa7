"""ShutdownPolicy: documented defaults, validation, and what a policy allows."""

from __future__ import annotations

import math
from typing import Any

import attrs
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from qmpshutdown import ShutdownPolicy, Stage

# Written out here rather than imported, so the tests do not share the code's constant.
LADDER = (Stage.POWERDOWN, Stage.SAVE, Stage.QUIT, Stage.TERMINATE, Stage.KILL)

TIMEOUT_FIELDS = (
    "powerdown_timeout",
    "repress_interval",
    "quit_timeout",
    "terminate_timeout",
    "kill_timeout",
    "save_timeout",
    "connect_timeout",
    "command_timeout",
)

BAD_SECONDS = [
    pytest.param(-1.0, id="negative"),
    pytest.param(-0.5, id="negative-fraction"),
    pytest.param(0, id="zero-int"),
    pytest.param(0.0, id="zero"),
    pytest.param(-0.0, id="negative-zero"),
    pytest.param(math.nan, id="nan"),
    pytest.param(math.inf, id="inf"),
    pytest.param(-math.inf, id="-inf"),
    pytest.param(True, id="True"),
    pytest.param(False, id="False"),
    pytest.param("5", id="str"),
    pytest.param("5.0", id="str-float"),
    pytest.param([5.0], id="list"),
    pytest.param(10**400, id="int-too-big-for-float"),
]


def make_policy(**fields: Any) -> ShutdownPolicy:
    """Build a policy from fields chosen at run time (parametrized names, bad types)."""
    return ShutdownPolicy(**fields)


# --- defaults ---------------------------------------------------------------


def test_documented_defaults() -> None:
    policy = ShutdownPolicy()
    assert policy.powerdown_timeout == 60.0
    assert policy.repress_interval == 10.0
    assert policy.quit_timeout == 30.0
    assert policy.terminate_timeout == 10.0
    assert policy.kill_timeout == 10.0
    assert policy.connect_timeout == 5.0
    assert policy.command_timeout == 5.0
    assert policy.stages == ("powerdown", "agent", "quit", "terminate", "kill")
    assert policy.wake_suspended is True
    assert policy.resume_paused is False
    assert policy.save_timeout == 120.0
    assert policy.agent_timeout == 60.0
    assert policy.freeze_before_force is True
    assert policy.freeze_timeout == 10.0


def test_default_stages_are_stage_members() -> None:
    stages = ShutdownPolicy().stages
    assert type(stages) is tuple
    assert [type(s) for s in stages] == [Stage] * 5
    assert stages == (Stage.POWERDOWN, Stage.AGENT, Stage.QUIT, Stage.TERMINATE, Stage.KILL)


def test_default_policies_are_equal() -> None:
    assert ShutdownPolicy() == ShutdownPolicy()
    assert ShutdownPolicy() != ShutdownPolicy(quit_timeout=31.0)


# --- immutability and construction ------------------------------------------


@pytest.mark.parametrize("name", [f.name for f in attrs.fields(ShutdownPolicy)])
def test_frozen(name: str) -> None:
    policy = ShutdownPolicy()
    before = getattr(policy, name)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        setattr(policy, name, before)
    assert getattr(policy, name) == before


def test_keyword_only() -> None:
    with pytest.raises(TypeError):
        ShutdownPolicy(60.0)  # type: ignore[call-arg]


def test_evolve_changes_one_field_and_leaves_the_original() -> None:
    policy = ShutdownPolicy()
    patient = attrs.evolve(policy, powerdown_timeout=300.0)
    assert patient.powerdown_timeout == 300.0
    assert policy.powerdown_timeout == 60.0
    assert attrs.evolve(patient, powerdown_timeout=60.0) == policy


@pytest.mark.parametrize(
    "changes",
    [
        pytest.param({"quit_timeout": -1.0}, id="negative-timeout"),
        pytest.param({"kill_timeout": math.nan}, id="nan-timeout"),
        pytest.param({"stages": ("kill", "quit")}, id="out-of-order"),
        pytest.param({"stages": ()}, id="no-stages"),
        pytest.param({"wake_suspended": "yes"}, id="non-bool-flag"),
    ],
)
def test_evolve_validates_again(changes: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        attrs.evolve(ShutdownPolicy(), **changes)


# --- timeouts ---------------------------------------------------------------


@pytest.mark.parametrize("value", BAD_SECONDS)
@pytest.mark.parametrize("name", TIMEOUT_FIELDS)
def test_bad_seconds_rejected(name: str, value: object) -> None:
    with pytest.raises(ValueError, match=name):
        make_policy(**{name: value})


@pytest.mark.parametrize("name", [n for n in TIMEOUT_FIELDS if n != "repress_interval"])
def test_none_timeout_rejected(name: str) -> None:
    with pytest.raises(ValueError, match=name):
        make_policy(**{name: None})


def test_repress_interval_none_means_press_once() -> None:
    assert ShutdownPolicy(repress_interval=None).repress_interval is None


@pytest.mark.parametrize("name", TIMEOUT_FIELDS)
@pytest.mark.parametrize("value", [1, 0.001, 2.5, 86400.0])
def test_positive_seconds_accepted(name: str, value: float) -> None:
    assert getattr(make_policy(**{name: value}), name) == value


@pytest.mark.parametrize("name", ["wake_suspended", "resume_paused"])
@pytest.mark.parametrize("value", [0, 1, "true", None])
def test_flags_must_be_bool(name: str, value: object) -> None:
    with pytest.raises(ValueError, match=name):
        make_policy(**{name: value})


# --- stages -----------------------------------------------------------------


def test_stages_single_string() -> None:
    policy = ShutdownPolicy(stages="powerdown")
    assert policy.stages == (Stage.POWERDOWN,)
    assert type(policy.stages[0]) is Stage


def test_stages_single_member() -> None:
    assert ShutdownPolicy(stages=Stage.KILL).stages == (Stage.KILL,)


def test_stages_list_becomes_tuple_of_members() -> None:
    policy = ShutdownPolicy(stages=["quit", "kill"])
    assert type(policy.stages) is tuple
    assert policy.stages == (Stage.QUIT, Stage.KILL)
    assert [type(s) for s in policy.stages] == [Stage, Stage]


@pytest.mark.parametrize(
    ("stages", "message"),
    [
        pytest.param(("powerdown", "reboot"), "unknown stage 'reboot'", id="unknown"),
        pytest.param("POWERDOWN", "unknown stage", id="wrong-case"),
        pytest.param(("sigterm",), "unknown stage", id="signal-name"),
        pytest.param((), "at least one", id="empty-tuple"),
        pytest.param([], "at least one", id="empty-list"),
        pytest.param(None, "sequence of stage names", id="none"),
        pytest.param(("quit", "quit"), "must not repeat", id="repeated"),
        pytest.param(("powerdown", "kill", "kill"), "must not repeat", id="repeated-last"),
        pytest.param(("quit", "powerdown"), "order", id="quit-before-powerdown"),
        pytest.param(("kill", "terminate"), "order", id="kill-before-terminate"),
        pytest.param(("powerdown", "kill", "quit"), "order", id="quit-after-kill"),
        pytest.param("already-off", "not a rung", id="already-off-alone"),
        pytest.param(("already-off", "powerdown"), "not a rung", id="already-off-first"),
        pytest.param((Stage.POWERDOWN, Stage.ALREADY_OFF), "not a rung", id="already-off-member"),
    ],
)
def test_bad_stages_rejected(stages: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ShutdownPolicy(stages=stages)


def test_allows() -> None:
    policy = ShutdownPolicy(stages=("powerdown", "kill"))
    assert policy.allows(Stage.POWERDOWN) is True
    assert policy.allows(Stage.KILL) is True
    assert policy.allows(Stage.QUIT) is False
    assert policy.allows(Stage.TERMINATE) is False
    assert policy.allows(Stage.ALREADY_OFF) is False


@pytest.mark.parametrize(
    ("stages", "expected"),
    [
        (("powerdown",), False),
        (("powerdown", "quit"), False),
        (("quit",), False),
        (("terminate",), True),
        (("kill",), True),
        (("powerdown", "terminate"), True),
        (("powerdown", "quit", "terminate", "kill"), True),
    ],
)
def test_may_signal(stages: tuple[str, ...], expected: bool) -> None:
    assert ShutdownPolicy(stages=stages).may_signal is expected


# --- bound ------------------------------------------------------------------


def test_default_bound() -> None:
    # connect 5 + 3 commands 15; powerdown 60 + 4 commands 20; agent 60 + 9 commands 45;
    # before force: the screenshot (and at the end) 2 commands 10, the freeze 10 + a command 5;
    # quit command 5 + 30; terminate 10; kill 10; the button's reboot action set and put
    # back 2 commands 10; the diagnosis 10.
    assert ShutdownPolicy().bound == 295.0
    assert ShutdownPolicy(diagnose=False).bound == 285.0


# Distinct values so that a term counted twice or left out changes the sum.
DISTINCT = {
    "connect_timeout": 2.0,
    "command_timeout": 3.0,
    "powerdown_timeout": 7.0,
    "quit_timeout": 11.0,
    "terminate_timeout": 13.0,
    "kill_timeout": 17.0,
    "save_timeout": 19.0,
    "agent_timeout": 19.0,
    "freeze_timeout": 23.0,
    "diagnose_timeout": 29.0,
}


@pytest.mark.parametrize(
    ("stages", "expected"),
    [
        # Always: connect 2 + 3 commands 9 = 11.
        # powerdown: 7 + 4 commands 12 = 19 (the press at the deadline, confirming the power-off,
        # the reboot action set and put back); quit: command 3 + 11 = 14.
        # agent: 19 + 9 commands 27 = 46; with a forced rung, the screenshot's 2 commands 6
        # and the freeze: 23 + a command 3 = 26. save: 7 commands 21 + 19 + quit_timeout 11 = 51.
        # With a graceful rung, the diagnosis: 29. powerdown: 7 + 4 commands 12 = 19.
        (("powerdown", "quit", "terminate", "kill"), 11 + 19 + 29 + 6 + 26 + 14 + 13 + 17),
        (("powerdown", "agent", "quit"), 11 + 19 + 46 + 29 + 6 + 26 + 14),
        (("agent", "powerdown"), 11 + 46 + 19 + 29),
        (("powerdown",), 11 + 19 + 29),
        (("quit",), 11 + 6 + 26 + 14),
        (("terminate", "kill"), 11 + 6 + 26 + 13 + 17),
        (("powerdown", "kill"), 11 + 19 + 29 + 6 + 26 + 17),
        (("powerdown", "save", "quit"), 11 + 19 + 29 + 51 + 6 + 26 + 14),
        (("save",), 11 + 51 + 6 + 26),
    ],
)
def test_bound_sums_the_allowed_waits(stages: tuple[str, ...], expected: float) -> None:
    assert make_policy(stages=stages, **DISTINCT).bound == expected


def test_bound_ignores_repress_interval() -> None:
    assert ShutdownPolicy(repress_interval=None).bound == ShutdownPolicy(repress_interval=1).bound


# --- properties -------------------------------------------------------------

seconds = st.floats(min_value=0.0, exclude_min=True, allow_nan=False, allow_infinity=False)
ordered_rungs = st.lists(st.sampled_from(LADDER), unique=True, min_size=1).map(
    lambda rungs: tuple(sorted(rungs, key=LADDER.index))
)


@given(
    timeouts=st.fixed_dictionaries({name: seconds for name in TIMEOUT_FIELDS}),
    stages=ordered_rungs,
)
def test_any_positive_timeouts_build_a_policy_bounded_by_its_waits(
    timeouts: dict[str, float], stages: tuple[Stage, ...]
) -> None:
    policy = make_policy(stages=stages, **timeouts)
    assert policy.stages == stages
    bound = policy.bound
    assert bound >= policy.connect_timeout
    assert bound >= policy.command_timeout
    rung_timeout = {
        Stage.POWERDOWN: policy.powerdown_timeout,
        Stage.SAVE: policy.save_timeout,
        Stage.QUIT: policy.quit_timeout,
        Stage.TERMINATE: policy.terminate_timeout,
        Stage.KILL: policy.kill_timeout,
    }
    for stage in stages:
        assert bound >= rung_timeout[stage]


@given(timeouts=st.fixed_dictionaries({name: seconds for name in TIMEOUT_FIELDS}))
def test_full_ladder_bound_covers_every_timeout(timeouts: dict[str, float]) -> None:
    policy = make_policy(stages=LADDER, **timeouts)
    for name in TIMEOUT_FIELDS:
        if name != "repress_interval":
            assert policy.bound >= getattr(policy, name)


@given(rungs=st.lists(st.sampled_from(LADDER), unique=True, min_size=2), data=st.data())
def test_any_unordered_permutation_is_rejected(rungs: list[Stage], data: st.DataObject) -> None:
    permutation = data.draw(st.permutations(rungs))
    assume(permutation != sorted(permutation, key=LADDER.index))
    with pytest.raises(ValueError, match="order"):
        ShutdownPolicy(stages=permutation)
    with pytest.raises(ValueError, match="order"):
        ShutdownPolicy(stages=[s.value for s in permutation])


def test_save_is_allowed_between_powerdown_and_quit_and_not_by_default() -> None:
    assert Stage.SAVE not in ShutdownPolicy().stages
    policy = ShutdownPolicy(stages=("powerdown", "save", "quit", "terminate", "kill"))
    assert policy.stages == LADDER
    with pytest.raises(ValueError, match="then save, quit, terminate, kill"):
        ShutdownPolicy(stages=("quit", "save"))
    with pytest.raises(ValueError, match="order"):
        ShutdownPolicy(stages=("save", "powerdown"))
