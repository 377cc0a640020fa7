"""Shared fixtures: real QEMU test guests (see tests/support/guests.py), and stand-in QEMUs.

Tests that boot guests use the ``guests`` fixture (they are marked ``qemu``
automatically). Without QEMU or the guest images they are skipped, except
under ``CI=true``, where that is a failure: CI must never pass by skipping.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.guests import (
    QEMU_BINARY,
    GuestFactory,
    ImagesUnavailable,
    accel_args,
    images_dir,
    kill_leftovers,
    qemu_available,
    systemd_images_dir,
)

if os.environ.get("QMPSHUTDOWN_QEMU"):
    # Pytest runs started from a test (tests/guests/test_pytest_plugin_guests.py) have another cwd.
    os.environ["QMPSHUTDOWN_QEMU"] = QEMU_BINARY


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def _unavailable(reason: str) -> None:
    if _in_ci():
        pytest.fail(f"{reason} (CI=true: tests that need QEMU must run, not skip)", pytrace=False)
    pytest.skip(reason)


_checked: Path | None = None


def require_qemu() -> Path:
    """Skip (or fail under CI=true) unless QEMU and the guest images are here."""
    global _checked
    if _checked is None:
        if not qemu_available():
            _unavailable(
                f"{QEMU_BINARY} not found: install the Debian package qemu-system-x86 "
                "(bash .ci/setup does), or set QMPSHUTDOWN_QEMU to a QEMU"
            )
        try:
            _checked = images_dir()
        except ImagesUnavailable as err:
            _unavailable(f"cannot build the QEMU test images: {err}")
            raise  # unreachable: _unavailable raised
        accel_args()  # probe KVM now, not inside a test's event loop
    return _checked


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # So that `-m "not qemu"` leaves out every test that boots a guest.
    for item in items:
        names = getattr(item, "fixturenames", ())
        if ("guests" in names or "systemd_guests" in names) and not item.get_closest_marker("qemu"):
            item.add_marker(pytest.mark.qemu)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("qemu"):
        require_qemu()


@pytest.fixture
def guests(tmp_path: Path) -> Iterator[GuestFactory]:
    """A factory of QEMU test guests under tmp_path; every guest is killed at teardown."""
    require_qemu()
    factory = GuestFactory(tmp_path)
    try:
        yield factory
    finally:
        factory.cleanup()


@pytest.fixture
def systemd_guests(tmp_path: Path) -> Iterator[GuestFactory]:
    """Like ``guests``, once the systemd guest is built (``boot_systemd(scenario)``)."""
    require_qemu()
    try:
        systemd_images_dir()
    except ImagesUnavailable as err:
        _unavailable(f"cannot build the systemd test guest: {err}")
    factory = GuestFactory(tmp_path)
    try:
        yield factory
    finally:
        factory.cleanup()


# ----------------------------------------------------------------------------- fake QEMUs

FAKEQEMU = Path(__file__).resolve().parent / "support" / "fakeqemu.py"


@pytest.fixture(scope="module")
def fake_binary(tmp_path_factory) -> Path:
    """A copy of the interpreter named like QEMU, so the library pins it like one."""
    target = tmp_path_factory.mktemp("bin") / "qemu-system-fake"
    shutil.copy2(os.path.realpath(sys.executable), target)
    return target


@pytest.fixture
def fakes(fake_binary, tmp_path) -> Iterator[object]:
    """Start stand-in QEMUs (tests/support/fakeqemu.py): ``fakes(n)`` returns their socket paths.

    Real processes, pinned like QEMU; each powers off 5 ms after the press
    (*delay_ms*); a *version* older than 6.0 answers ``set-action`` with
    CommandNotFound. ``fakes.started`` holds their Popen objects, in order;
    every one still running at teardown is killed, and all are reaped.
    """
    started: list[subprocess.Popen[bytes]] = []

    def spawn(n: int, delay_ms: float = 5.0, version: str = "7.2") -> list[Path]:
        env = dict(os.environ, PYTHONHOME=sys.base_prefix)
        paths = [tmp_path / f"fake{len(started) + i}.sock" for i in range(n)]
        for path in paths:
            started.append(subprocess.Popen(
                [str(fake_binary), "-S", str(FAKEQEMU), str(path), str(delay_ms), version],
                env=env, stdin=subprocess.DEVNULL,
            ))  # fmt: skip
        end = time.monotonic() + 30
        while not all(path.exists() for path in paths):
            assert time.monotonic() < end, "fake QEMUs did not listen in 30 s"
            time.sleep(0.01)
        return paths

    spawn.started = started  # type: ignore[attr-defined]
    try:
        yield spawn
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # Safety net: the fixtures' cleanup should already have reaped every guest.
    leftovers = kill_leftovers()
    if leftovers:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        message = f"ERROR: QEMU processes still running at session end were killed: {leftovers}"
        if reporter is not None:
            reporter.write_line(message, red=True, bold=True)
        else:
            print(message)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
