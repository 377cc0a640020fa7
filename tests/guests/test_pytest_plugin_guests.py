"""The qemu_launcher and qemu_launcher_sync fixtures, run in a pytest of their own (pytester)."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_launch import our_qemus

from support.records import as_pressed_report

pytest_plugins = ["pytester"]


INNER = """
import pytest
from support.guests import guest_argv
from qmpshutdown import ShutdownPolicy

pytestmark = pytest.mark.asyncio

@pytest.fixture
def qemu_shutdown_policy():
    return ShutdownPolicy(powerdown_timeout=1.0, repress_interval=None)

async def test_uses_two_vms_then_fails(qemu_launcher, tmp_path):
    vms = []
    for n in (1, 2):
        argv = guest_argv("ignores", workdir=tmp_path, qmp=False, extra_args=["-name", "MARKER"])
        vms.append(await qemu_launcher.launch(argv, name=f"failing{n}"))
    assert (await vms[0].monitor.execute("query-status"))["status"] == "running"
    assert False, "this test fails on purpose"

async def test_passes(qemu_launcher, tmp_path):
    argv = guest_argv("cooperative", workdir=tmp_path, qmp=False, extra_args=["-name", "MARKER"])
    vm = await qemu_launcher.launch(argv, name="passing")
    assert vm.pid > 0
"""


@pytest.mark.qemu
def test_failing_test_still_leaves_nothing_running(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = "qsd-plugin-inner"
    pytester.makepyfile(test_inner=INNER.replace("MARKER", marker))
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parent.parent))
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-o", "asyncio_mode=strict", "-rA", timeout=120
    )
    result.assert_outcomes(failed=1, passed=1)
    output = result.stdout.str()
    assert "this test fails on purpose" in output
    # how each VM was stopped is in the test's report
    assert "failing1: quit forced" in output
    assert "failing2: quit forced" in output
    assert "passing: " in output
    assert our_qemus(marker) == []


SYNC_INNER = """
import time

import pytest
from support.guests import guest_argv
from qmpshutdown import ShutdownPolicy

@pytest.fixture
def qemu_shutdown_policy():
    # 6 s: a booted cooperative guest has gone past 2 s on a loaded host (CI)
    return ShutdownPolicy(powerdown_timeout=6.0, repress_interval=None)

def test_two_guests_one_ignores_the_button(qemu_launcher_sync, tmp_path):
    vms = []
    for mode in ("cooperative", "ignores"):
        workdir = tmp_path / mode
        workdir.mkdir()
        argv = guest_argv(mode, workdir=workdir, qmp=False, extra_args=["-name", "MARKER"])
        vms.append(qemu_launcher_sync.launch(argv, name=mode))
    assert [vm.qmp("query-status")["status"] for vm in vms] == ["running", "running"]
    # Both guests booted (60 s at most): the cooperative one's button handler listens, and
    # the one that ignores it is idle, not still booting (its record must read the press).
    for mode in ("cooperative", "ignores"):
        serial = tmp_path / mode / "serial.log"
        for _ in range(1200):
            if serial.exists() and "QMPSHUTDOWN-GUEST-READY" in serial.read_text():
                break
            time.sleep(0.05)
        else:
            pytest.fail(f"the {mode} guest never got ready")
"""


ANYIO_INNER = """
import pytest
from support.guests import guest_argv
from qmpshutdown import ShutdownPolicy

@pytest.fixture
def anyio_backend():
    return "asyncio"

@pytest.fixture
def qemu_shutdown_policy():
    return ShutdownPolicy(powerdown_timeout=1.0, repress_interval=None)

@pytest.mark.anyio
async def test_under_anyio(qemu_launcher, tmp_path):
    argv = guest_argv("ignores", workdir=tmp_path, qmp=False, extra_args=["-name", "MARKER"])
    vm = await qemu_launcher.launch(argv, name="anyio")
    assert (await vm.monitor.execute("query-status"))["status"] == "running"
"""


def run_inner(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, source: str):
    pytester.makepyfile(test_inner=source)
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parent.parent))
    return pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-o", "asyncio_mode=strict", "-rA", timeout=120
    )


@pytest.mark.qemu
def test_sync_fixture_stops_every_guest_and_reports_how(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = "qsd-plugin-sync"
    result = run_inner(pytester, monkeypatch, SYNC_INNER.replace("MARKER", marker))
    result.assert_outcomes(passed=1)
    output = as_pressed_report(result.stdout.str(), "cooperative")
    assert "Captured qmpshutdown teardown" in output
    assert "cooperative: powerdown graceful reason=guest-shutdown" in output
    assert "ignores: quit forced reason=host-qmp-quit" in output
    assert "cause=ignored-power-button" in output
    assert our_qemus(marker) == []


@pytest.mark.qemu
def test_async_fixture_under_anyio_pytest_plugin(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = "qsd-plugin-anyio"
    result = run_inner(pytester, monkeypatch, ANYIO_INNER.replace("MARKER", marker))
    result.assert_outcomes(passed=1)
    assert "anyio: quit forced" in result.stdout.str()
    assert our_qemus(marker) == []


EVIDENCE = """
import anyio
import pytest
from support.guests import guest_argv
from qmpshutdown import ShutdownPolicy

pytestmark = pytest.mark.asyncio

@pytest.fixture
def qemu_shutdown_policy():
    return ShutdownPolicy(powerdown_timeout=1.0, repress_interval=None)

async def test_leaves_an_ignoring_vm_then_fails(qemu_launcher, tmp_path):
    argv = guest_argv("ignores", workdir=tmp_path, qmp=False, display=True,
                      extra_args=["-name", "MARKER"])
    vm = await qemu_launcher.launch(argv, name="failing", console_log=True)
    with anyio.fail_after(60):
        while "GUEST-READY" not in vm.console_log.read_text(errors="replace"):
            await anyio.sleep(0.05)
    assert False, "this test fails on purpose"

async def test_leaves_an_ignoring_vm_and_passes(qemu_launcher, tmp_path):
    argv = guest_argv("ignores", workdir=tmp_path, qmp=False, display=True,
                      extra_args=["-name", "MARKER"])
    await qemu_launcher.launch(argv, name="passing")
"""


SYNC_EVIDENCE = """
import time

import pytest
from support.guests import guest_argv
from qmpshutdown import ShutdownPolicy

@pytest.fixture
def qemu_shutdown_policy():
    return ShutdownPolicy(powerdown_timeout=1.0, repress_interval=None)

def test_leaves_an_ignoring_vm_then_fails(qemu_launcher_sync, tmp_path):
    argv = guest_argv("ignores", workdir=tmp_path, qmp=False, display=True,
                      extra_args=["-name", "MARKER"])
    qemu_launcher_sync.launch(argv, name="failing", console_log=True)
    for _ in range(1200):
        serial = tmp_path / "serial.log"
        if serial.exists() and "GUEST-READY" in serial.read_text(errors="replace"):
            break
        time.sleep(0.05)
    assert False, "this test fails on purpose"

def test_leaves_an_ignoring_vm_and_passes(qemu_launcher_sync, tmp_path):
    argv = guest_argv("ignores", workdir=tmp_path, qmp=False, display=True,
                      extra_args=["-name", "MARKER"])
    qemu_launcher_sync.launch(argv, name="passing")
"""


@pytest.mark.qemu
@pytest.mark.parametrize("source", [EVIDENCE, SYNC_EVIDENCE], ids=["async", "sync"])
def test_the_report_names_the_screenshot_kept_for_a_failing_test(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, source: str
) -> None:
    # Both launchers keep a failing test's evidence in its tmp_path and drop a passing one's
    # (before 0.2 the sync one silently dropped evidence_dir and keep_evidence).
    # Each variant its own marker: xdist may run the two side by side.
    marker = f"qsd-plugin-evidence-{'sync' if source is SYNC_EVIDENCE else 'async'}"
    pytester.makepyfile(test_inner=source.replace("MARKER", marker))
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parent.parent))
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-o", "asyncio_mode=strict", "-rA", timeout=120
    )
    result.assert_outcomes(failed=1, passed=1)
    lines = result.stdout.str().splitlines()
    kept = [line.split("screenshot: ", 1)[1] for line in lines if "  screenshot: " in line]
    assert len(kept) == 2, "\n".join(lines)
    failing = next(path for path in kept if "/failing-" in path)
    passing = next(path for path in kept if "/passing-" in path)
    assert failing.endswith(".png") and Path(failing).stat().st_size > 0
    assert "test_leaves_an_ignoring_vm_the0" in failing  # in pytest's tmp dir for the test
    assert passing.endswith(" (removed: the test passed)")
    assert not Path(passing.removesuffix(" (removed: the test passed)")).exists()
    assert any(line == "  console, last lines:" for line in lines)
    assert any(line.strip().startswith("QMPSHUTDOWN-GUEST-READY mode=ignores") for line in lines)
    assert our_qemus(marker) == []
