"""The public namespace: ``__all__`` is complete and nothing else leaks out of it."""

from __future__ import annotations

import inspect
import sys

import pytest

import qmpshutdown


def test_all_is_a_tuple() -> None:
    assert type(qmpshutdown.__all__) is tuple


def test_all_has_no_duplicates() -> None:
    duplicates = sorted({n for n in qmpshutdown.__all__ if qmpshutdown.__all__.count(n) > 1})
    assert duplicates == []


def test_all_exports_no_private_name() -> None:
    assert [n for n in qmpshutdown.__all__ if n.startswith("_")] == []


@pytest.mark.parametrize("name", qmpshutdown.__all__)
def test_exported_name_exists(name: str) -> None:
    assert hasattr(qmpshutdown, name)


#: Exported classes and functions; aliases such as ``Target`` (a ``Union``) have no
#: defining module of their own.
DEFINITIONS = [
    name
    for name in qmpshutdown.__all__
    if inspect.isclass(getattr(qmpshutdown, name, None))
    or inspect.isfunction(getattr(qmpshutdown, name, None))
]


@pytest.mark.parametrize("name", DEFINITIONS)
def test_exported_definition_comes_from_a_private_module(name: str) -> None:
    obj = getattr(qmpshutdown, name)
    module_name = obj.__module__
    assert module_name.startswith("qmpshutdown._")
    # The module it claims must really define it under that name.
    assert getattr(sys.modules[module_name], name) is obj


def _leaked_names() -> set[str]:
    allowed = set(qmpshutdown.__all__) | {"__version__"}
    # Private names (dunders, and the _modules that importing the package
    # binds as attributes) are not public API, so dir() may show them.
    return {n for n in dir(qmpshutdown) if n not in allowed and not n.startswith("_")}


def test_dir_shows_only_all_and_private_names() -> None:
    assert _leaked_names() == set()


def test_logging_module_does_not_leak() -> None:
    assert "logging" not in _leaked_names()


def test_version_is_a_string() -> None:
    assert isinstance(qmpshutdown.__version__, str)
    assert qmpshutdown.__version__ != ""
