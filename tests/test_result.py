"""ShutdownResult, Step and EventRecord: frozen records and their JSON form."""

from __future__ import annotations

import enum
import json
from typing import Any

import attrs
import pytest

from qmpshutdown import Cause, EventRecord, Outcome, ShutdownResult, Stage, Step

RESULT_KEYS = {
    "stage",
    "graceful",
    "reason",
    "presses",
    "runstate",
    "cause",
    "pid",
    "elapsed_s",
    "events",
    "steps",
    "saved_state",
    "screenshot",
    "console_tail",
    "guest_os",
    "guest_users",
    "activity",
    "diagnosis",
}
EVENT_KEYS = {"event", "timestamp", "data"}
STEP_KEYS = {"stage", "outcome", "started_s", "ended_s", "detail", "cause", "path"}


def make_result(**changes: Any) -> ShutdownResult:
    """Return a forced result: the guest ignored two presses and SIGKILL ended QEMU."""
    fields: dict[str, Any] = {
        "stage": Stage.KILL,
        "graceful": False,
        "reason": "host-signal",
        "presses": 2,
        "runstate": "running",
        "cause": Cause.IGNORED_POWER_BUTTON,
        "pid": 4242,
        "elapsed": 12.3456789,
        "events": [
            EventRecord("POWERDOWN", 1700000000.25),
            EventRecord("SHUTDOWN", 1700000012.5, {"guest": False, "reason": "host-signal"}),
        ],
        "steps": [
            Step(Stage.POWERDOWN, Outcome.TIMEOUT, 0.0001234567, 6.0, "2 presses, no SHUTDOWN"),
            Step(Stage.QUIT, Outcome.FAILED, 6.0, 6.5, "no reply"),
            Step(Stage.TERMINATE, Outcome.TIMEOUT, 6.5, 9.5),
            Step(Stage.KILL, Outcome.DONE, 9.5, 12.3456789, "exited on SIGKILL"),
        ],
    }
    fields.update(changes)
    return ShutdownResult(**fields)


# --- enums ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("enum_type", "values"),
    [
        (
            Stage,
            ["already-off", "powerdown", "agent", "quit", "save", "terminate", "kill",
             "screenshot", "freeze", "thaw", "diagnose"],
        ),
        (Outcome, ["done", "timeout", "skipped", "failed"]),
        (
            Cause,
            [
                "ignored-power-button",
                "asleep",
                "paused",
                "panicked",
                "migrating",
                "rebooted",
                "monitor-unresponsive",
                "no-logon",
                "busy",
                "stalled",
                "inhibited",
            ],
        ),
    ],
)
def test_enum_values(enum_type: type[enum.Enum], values: list[str]) -> None:
    assert issubclass(enum_type, str)
    assert issubclass(enum_type, enum.Enum)
    assert [member.value for member in enum_type] == values
    for member in enum_type:
        assert type(member.value) is str
        assert member == member.value
        assert str(member) == member.value
        assert enum_type(member.value) is member


# --- frozen -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("record", "name"),
    [
        pytest.param(EventRecord("SHUTDOWN", 1.0), "event", id="EventRecord.event"),
        pytest.param(EventRecord("SHUTDOWN", 1.0), "data", id="EventRecord.data"),
        pytest.param(Step(Stage.QUIT, Outcome.DONE, 0.0, 1.0), "outcome", id="Step.outcome"),
        pytest.param(make_result(), "stage", id="ShutdownResult.stage"),
        pytest.param(make_result(), "steps", id="ShutdownResult.steps"),
    ],
)
def test_frozen(record: object, name: str) -> None:
    before = getattr(record, name)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        setattr(record, name, before)


def test_an_events_data_is_a_deep_copy_the_callers_changes_do_not_reach() -> None:
    class Box:  # not JSON: copied all the same
        def __init__(self) -> None:
            self.items = [1]

    data = {"guest": True, "nested": {"list": [1, {"x": "y"}]}, "box": Box()}
    record = EventRecord("SHUTDOWN", 1.0, data)
    data["nested"]["list"][1]["x"] = "changed"  # type: ignore[index]
    data["nested"]["list"].append(2)  # type: ignore[union-attr]
    data["box"].items.append(2)  # type: ignore[attr-defined]
    data["guest"] = False
    assert record.data["guest"] is True
    assert record.data["nested"] == {"list": [1, {"x": "y"}]}
    assert record.data["box"].items == [1]
    with pytest.raises(TypeError):
        record.data["guest"] = False  # type: ignore[index]


def test_result_stores_events_and_steps_as_tuples() -> None:
    result = make_result()
    assert type(result.events) is tuple
    assert type(result.steps) is tuple
    assert [e.event for e in result.events] == ["POWERDOWN", "SHUTDOWN"]
    assert [s.stage for s in result.steps] == [
        Stage.POWERDOWN,
        Stage.QUIT,
        Stage.TERMINATE,
        Stage.KILL,
    ]


def test_result_is_keyword_only() -> None:
    with pytest.raises(TypeError):
        ShutdownResult(Stage.KILL, False, None, 0, None, None, None, 1.0, (), ())  # type: ignore[call-arg]


# --- EventRecord ------------------------------------------------------------


def test_event_record_copies_data() -> None:
    source = {"guest": True, "reason": "guest-shutdown"}
    record = EventRecord("SHUTDOWN", 1.0, source)
    source["reason"] = "host-qmp-quit"
    source["extra"] = 1
    assert record.data == {"guest": True, "reason": "guest-shutdown"}


@pytest.mark.parametrize("data", [pytest.param(None, id="None"), pytest.param({}, id="empty")])
def test_event_record_without_data(data: dict[str, Any] | None) -> None:
    assert EventRecord("POWERDOWN", 1.0, data).data == {}
    assert EventRecord("POWERDOWN", 1.0).data == {}


def test_event_record_to_dict() -> None:
    record = EventRecord("SHUTDOWN", 1700000012.5, {"guest": True, "reason": "guest-shutdown"})
    out = record.to_dict()
    assert out == {
        "event": "SHUTDOWN",
        "timestamp": 1700000012.5,
        "data": {"guest": True, "reason": "guest-shutdown"},
    }
    out["data"]["reason"] = "changed"
    assert record.data["reason"] == "guest-shutdown"


def test_event_record_data_cannot_be_changed_in_place() -> None:
    record = EventRecord("SHUTDOWN", 1.0, {"reason": "guest-shutdown"})
    with pytest.raises(TypeError):
        record.data["reason"] = "host-signal"  # type: ignore[index]


# --- Step -------------------------------------------------------------------


def test_step_to_dict() -> None:
    step = Step(Stage.POWERDOWN, Outcome.TIMEOUT, 0.0001234567, 60.123456789, "3 presses")
    out = step.to_dict()
    assert out == {
        "stage": "powerdown",
        "outcome": "timeout",
        "started_s": 0.000123,
        "ended_s": 60.123457,
        "detail": "3 presses",
        "cause": None,
        "path": None,
    }
    assert type(out["stage"]) is str
    assert type(out["outcome"]) is str


def test_step_detail_defaults_to_empty() -> None:
    assert Step(Stage.KILL, Outcome.SKIPPED, 1.0, 1.0).detail == ""


# --- ShutdownResult.to_dict -------------------------------------------------


def test_to_dict_keys() -> None:
    out = make_result().to_dict()
    assert set(out) == RESULT_KEYS
    assert len(out["events"]) == 2
    assert len(out["steps"]) == 4
    for event in out["events"]:
        assert set(event) == EVENT_KEYS
    for step in out["steps"]:
        assert set(step) == STEP_KEYS


def test_to_dict_values() -> None:
    out = make_result().to_dict()
    assert out["stage"] == "kill"
    assert out["graceful"] is False
    assert out["reason"] == "host-signal"
    assert out["presses"] == 2
    assert out["runstate"] == "running"
    assert out["cause"] == "ignored-power-button"
    assert out["pid"] == 4242
    assert out["elapsed_s"] == 12.345679
    assert out["events"][1] == {
        "event": "SHUTDOWN",
        "timestamp": 1700000012.5,
        "data": {"guest": False, "reason": "host-signal"},
    }
    assert [s["stage"] for s in out["steps"]] == ["powerdown", "quit", "terminate", "kill"]
    assert [s["outcome"] for s in out["steps"]] == ["timeout", "failed", "timeout", "done"]


def _walk(value: Any) -> list[Any]:
    """Return every value nested in dicts and lists, *value* included."""
    found = [value]
    if isinstance(value, dict):
        for item in value.values():
            found += _walk(item)
    elif isinstance(value, list):
        for item in value:
            found += _walk(item)
    return found


def test_to_dict_holds_no_enum_members() -> None:
    out = make_result().to_dict()
    members = [v for v in _walk(out) if isinstance(v, enum.Enum)]
    assert members == []
    assert type(out["stage"]) is str
    assert type(out["cause"]) is str


@pytest.mark.parametrize(
    "changes",
    [
        pytest.param({}, id="forced"),
        pytest.param(
            {
                "stage": Stage.POWERDOWN,
                "graceful": True,
                "reason": "guest-shutdown",
                "cause": None,
                "pid": None,
                "steps": [Step(Stage.POWERDOWN, Outcome.DONE, 0.0, 3.0)],
            },
            id="graceful",
        ),
        pytest.param({"stage": None, "reason": None, "runstate": None}, id="failed"),
        pytest.param({"events": [], "steps": []}, id="empty"),
    ],
)
def test_to_dict_json_round_trip(changes: dict[str, Any]) -> None:
    out = make_result(**changes).to_dict()
    assert json.loads(json.dumps(out)) == out


def test_stage_none_serializes_as_null() -> None:
    result = make_result(stage=None, cause=Cause.MONITOR_UNRESPONSIVE)
    assert result.to_dict()["stage"] is None
    assert '"stage": null' in json.dumps(result.to_dict())


def test_cause_none_serializes_as_null() -> None:
    assert make_result(cause=None).to_dict()["cause"] is None


# --- summary ----------------------------------------------------------------


def test_summary_mentions_stage_reason_presses_and_cause() -> None:
    summary = make_result().summary()
    assert "kill" in summary
    assert "host-signal" in summary
    assert "presses=2" in summary
    assert "ignored-power-button" in summary
    assert "\n" not in summary


def test_summary_of_a_graceful_result() -> None:
    summary = make_result(
        stage=Stage.POWERDOWN, graceful=True, reason="guest-shutdown", presses=1, cause=None
    ).summary()
    assert summary.startswith("powerdown")
    assert "graceful" in summary
    assert "guest-shutdown" in summary
    assert "presses=1" in summary
    assert "ignored-power-button" not in summary


def test_summary_when_nothing_ended_the_vm() -> None:
    summary = make_result(stage=None, cause=Cause.ASLEEP).summary()
    assert "still running" in summary
    assert "asleep" in summary
    assert "forced" not in summary


# --- step() and forced ------------------------------------------------------


def test_step_returns_the_last_step_of_a_stage() -> None:
    first = Step(Stage.POWERDOWN, Outcome.SKIPPED, 0.0, 0.0, "paused")
    last = Step(Stage.POWERDOWN, Outcome.TIMEOUT, 0.5, 60.5)
    quit_step = Step(Stage.QUIT, Outcome.DONE, 60.5, 61.0)
    result = make_result(stage=Stage.QUIT, steps=[first, last, quit_step])
    assert result.step(Stage.POWERDOWN) is last
    assert result.step(Stage.QUIT) is quit_step


def test_step_accepts_a_stage_name() -> None:
    result = make_result()
    assert result.step("terminate") is result.steps[2]


@pytest.mark.parametrize("stage", [Stage.QUIT, Stage.KILL, Stage.ALREADY_OFF])
def test_step_of_a_stage_not_tried_is_none(stage: Stage) -> None:
    result = make_result(steps=[Step(Stage.POWERDOWN, Outcome.DONE, 0.0, 2.0)])
    assert result.step(stage) is None


@pytest.mark.parametrize(
    ("stage", "graceful", "forced"),
    [
        (Stage.ALREADY_OFF, True, False),
        (Stage.POWERDOWN, True, False),
        (Stage.QUIT, False, True),
        (Stage.TERMINATE, False, True),
        (Stage.KILL, False, True),
        (None, False, False),
    ],
)
def test_forced(stage: Stage | None, graceful: bool, forced: bool) -> None:
    assert make_result(stage=stage, graceful=graceful).forced is forced
