"""The pytest plugin is registered (its fixtures on real guests: test_pytest_plugin_guests.py)."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]


def test_plugin_is_registered(pytestconfig: pytest.Config) -> None:
    assert pytestconfig.pluginmanager.has_plugin("qmpshutdown")
