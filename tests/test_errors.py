"""The error tree: one root, documented in qmpshutdown._errors' docstring."""

from __future__ import annotations

import inspect
import re

import pytest

import qmpshutdown
from qmpshutdown import (
    ConnectError,
    Error,
    LaunchError,
    PidMismatchError,
    ShutdownFailed,
    ShutdownResult,
    _errors,
)

#: Every exception class the errors module defines.
DEFINED = sorted(
    (
        obj
        for obj in vars(_errors).values()
        if inspect.isclass(obj)
        and issubclass(obj, BaseException)
        and obj.__module__ == _errors.__name__
    ),
    key=lambda cls: cls.__name__,
)

#: Every exception class the package exports.
EXPORTED = sorted(
    (
        obj
        for name in qmpshutdown.__all__
        if inspect.isclass(obj := getattr(qmpshutdown, name)) and issubclass(obj, BaseException)
    ),
    key=lambda cls: cls.__name__,
)


def test_the_expected_classes_exist() -> None:
    assert [cls.__name__ for cls in DEFINED] == [
        "CommandError",
        "ConnectError",
        "DescriptorsExhausted",
        "Error",
        "InternalError",
        "LaunchError",
        "MonitorClosedError",
        "PidMismatchError",
        "QemuExited",
        "ShutdownFailed",
    ]
    assert EXPORTED == DEFINED


def test_error_is_an_exception() -> None:
    assert issubclass(Error, Exception)


@pytest.mark.parametrize("cls", EXPORTED + DEFINED, ids=lambda cls: cls.__name__)
def test_every_error_derives_from_error(cls: type[BaseException]) -> None:
    assert issubclass(cls, Error)


@pytest.mark.parametrize(
    "cls", [ConnectError, PidMismatchError, ShutdownFailed, LaunchError], ids=lambda c: c.__name__
)
def test_subclasses_are_direct_children_of_error(cls: type[Error]) -> None:
    assert cls.__bases__ == (Error,)


def _result() -> ShutdownResult:
    return ShutdownResult(
        stage=None,
        graceful=False,
        reason=None,
        presses=1,
        runstate="running",
        cause=qmpshutdown.Cause.IGNORED_POWER_BUTTON,
        pid=None,
        elapsed=60.0,
        events=(),
        steps=(),
    )


def test_shutdown_failed_carries_the_result() -> None:
    result = _result()
    with pytest.raises(Error) as info:
        raise ShutdownFailed("powerdown timed out and no force is allowed", result)
    assert type(info.value) is ShutdownFailed
    assert info.value.result is result
    assert str(info.value) == "powerdown timed out and no force is allowed"


def test_shutdown_failed_requires_a_result() -> None:
    with pytest.raises(TypeError):
        ShutdownFailed("no result")  # type: ignore[call-arg]


def test_launch_error_carries_returncode_and_stderr() -> None:
    err = LaunchError("QEMU exited", returncode=1, stderr="qemu: could not open disk")
    assert err.returncode == 1
    assert err.stderr == "qemu: could not open disk"
    assert str(err) == "QEMU exited"


def test_launch_error_defaults() -> None:
    err = LaunchError("QEMU did not become ready")
    assert err.returncode is None
    assert err.stderr == ""


def test_docstring_has_the_tree() -> None:
    doc = _errors.__doc__
    assert doc is not None
    # The root stands alone on its line; each subclass hangs off it as a branch.
    assert re.search(r"^\s*Error\s*$", doc, re.MULTILINE)
    branches = re.findall(r"[├└]── (\w+)", doc)
    subclasses = sorted(cls.__name__ for cls in DEFINED if cls is not Error)
    assert sorted(branches) == subclasses


@pytest.mark.parametrize("cls", DEFINED, ids=lambda cls: cls.__name__)
def test_docstring_names_every_error(cls: type[BaseException]) -> None:
    assert re.search(rf"\b{cls.__name__}\b", _errors.__doc__ or "")
