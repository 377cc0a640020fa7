"""The pytest plugin: a ``qemu_launcher`` fixture that never leaves a QEMU behind.

Registered through the ``pytest11`` entry point. Async tests (pytest-asyncio)
boot VMs with ``await qemu_launcher.launch(argv)``, plain ``def`` tests with
``qemu_launcher_sync.launch(argv)``; at the fixture's teardown every VM still
running is stopped with the ladder, reaped, and how each was stopped is added
to the test's report (shown with the test's output).
A VM that had to be forced leaves a screenshot of its screen (when it has a
display device) in the test's ``tmp_path``: named in the report, kept when
the test failed and removed when it passed; with ``console_log=True`` its
console's last lines are in the report too.

pytest-asyncio may run an async fixture's setup and teardown in different
tasks, so nothing here keeps a cancel scope or task group open across the
fixture's ``yield``: each VM is entered and exited explicitly.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import AsyncIterator, Generator, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import pytest

from ._policy import DEFAULT_POLICY, ShutdownPolicy

if TYPE_CHECKING:
    from anyio.from_thread import BlockingPortal

    from ._launch import VM
    from ._sync import SyncVM

# This module is loaded into every pytest run of an environment with qmpshutdown (its
# pytest11 entry point): what only booting a VM needs is imported when a test does.


class QemuLauncher:
    """Boots VMs for one test and stops every one of them at its end."""

    def __init__(self, policy: ShutdownPolicy, evidence_dir: Path | None = None) -> None:
        self.policy = policy
        self.evidence_dir = evidence_dir  #: where forced VMs' screenshots go (the default)
        self.vms: list[VM] = []

    async def launch(
        self,
        argv: Sequence[str],
        policy: ShutdownPolicy | None = None,
        name: str | None = None,
        **kwargs: Any,
    ) -> VM:
        """Boot QEMU with *argv* (see :func:`qmpshutdown.launch`); return the running VM.

        :raises qmpshutdown.LaunchError: QEMU exited early or did not greet in time.
        """
        if self.evidence_dir is not None:
            kwargs.setdefault("evidence_dir", self.evidence_dir)
        from ._launch import launch

        vm = launch(argv, policy or self.policy, name or f"vm{len(self.vms) + 1}", **kwargs)
        await vm.__aenter__()
        self.vms.append(vm)
        return vm

    async def aclose(self, *, keep_evidence: bool = True) -> list[str]:
        """Stop every VM still running (concurrently); return the report's lines.

        :param keep_evidence: keep the screenshots (a failing test); else remove them.
        """
        with anyio.CancelScope(shield=True):
            async with anyio.create_task_group() as tg:
                for vm in self.vms:
                    tg.start_soon(vm.__aexit__, None, None, None)
        lines = []
        for vm in self.vms:
            result = vm.result
            how = result.summary() if result is not None else "exited on its own"
            lines.append(f"{vm.name}: {how}")
            if result is None:
                continue
            lines += [f"  guest said: {finding}" for finding in result.diagnosis or ()]
            if result.screenshot is not None:
                if keep_evidence:
                    lines.append(f"  screenshot: {result.screenshot}")
                else:
                    with contextlib.suppress(OSError):
                        os.unlink(result.screenshot)
                    lines.append(f"  screenshot: {result.screenshot} (removed: the test passed)")
            if result.console_tail == ():
                lines.append("  console: nothing on it")
            elif result.console_tail is not None:
                lines.append("  console, last lines:")
                lines += [f"    {line}" for line in result.console_tail]
        return lines


class SyncQemuLauncher:
    """:class:`QemuLauncher` for plain tests: its VMs live in one blocking portal's loop."""

    def __init__(
        self, policy: ShutdownPolicy, portal: BlockingPortal, evidence_dir: Path | None = None
    ) -> None:
        self.policy = policy
        self.portal = portal
        self._launcher = QemuLauncher(policy, evidence_dir)
        self.vms: list[SyncVM] = []

    def launch(
        self,
        argv: Sequence[str],
        policy: ShutdownPolicy | None = None,
        name: str | None = None,
        **kwargs: Any,
    ) -> SyncVM:
        """Boot QEMU with *argv* (see :func:`qmpshutdown.launch_sync`); return the running VM.

        :raises RuntimeError: called from async code (use ``qemu_launcher`` there).
        :raises qmpshutdown.LaunchError: QEMU exited early or did not greet in time.
        """
        from ._sync import SyncVM, refuse_in_event_loop, wait_through

        refuse_in_event_loop("qemu_launcher_sync.launch()")
        name = name or f"vm{len(self.vms) + 1}"
        start = self.portal.start_task_soon(
            functools.partial(self._launcher.launch, argv, policy, name, **kwargs)
        )
        # Interrupted: a VM that booted all the same is in the launcher's list, stopped at the end.
        vm = SyncVM(wait_through(start, cancel=True))
        vm.attach(self.portal)
        self.vms.append(vm)
        return vm

    def close(self, *, keep_evidence: bool = True) -> list[str]:
        """Stop every VM still running (concurrently, even through Ctrl-C); one line per VM.

        :param keep_evidence: keep the screenshots (a failing test); else remove them.
        """
        from ._sync import wait_through

        close = functools.partial(self._launcher.aclose, keep_evidence=keep_evidence)
        return wait_through(self.portal.start_task_soon(close), cancel=False)


def _report(request: pytest.FixtureRequest, lines: list[str]) -> None:
    """Add how each VM was stopped to the test's report."""
    if lines:
        request.node.add_report_section("teardown", "qmpshutdown", "\n".join(lines))


_CALL_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Remember whether the test failed, for the teardown's evidence."""
    report = yield
    if report.when in ("setup", "call") and report.failed:
        item.stash[_CALL_FAILED] = True
    return report


@pytest.fixture
def qemu_shutdown_policy() -> ShutdownPolicy:
    """The policy ``qemu_launcher`` stops VMs with; override this fixture to change it."""
    return DEFAULT_POLICY


try:
    import pytest_asyncio
except ImportError:  # pragma: no cover - the fixture then says what is missing

    @pytest.fixture
    def qemu_launcher() -> QemuLauncher:
        """Needs pytest-asyncio (``pip install pytest-asyncio``)."""
        raise pytest.UsageError("the qemu_launcher fixture needs pytest-asyncio installed")

else:

    @pytest_asyncio.fixture
    async def qemu_launcher(  # type: ignore[misc]  # one of two definitions
        request: pytest.FixtureRequest, qemu_shutdown_policy: ShutdownPolicy, tmp_path: Path
    ) -> AsyncIterator[QemuLauncher]:
        """Boot QEMU VMs in a test; every one is stopped and reaped at teardown.

        ``vm = await qemu_launcher.launch(argv)`` returns a running
        :class:`qmpshutdown.VM`; how each was stopped goes into the test's report,
        with the screenshot of a VM that had to be forced (kept in the test's
        ``tmp_path`` when the test failed).
        """
        evidence = tmp_path / "qmpshutdown-evidence"
        evidence.mkdir(exist_ok=True)
        launcher = QemuLauncher(qemu_shutdown_policy, evidence)
        try:
            yield launcher
        finally:
            failed = request.node.stash.get(_CALL_FAILED, False)
            lines = await launcher.aclose(keep_evidence=failed)
            if lines:
                request.node.add_report_section("teardown", "qmpshutdown", "\n".join(lines))


@pytest.fixture
def qemu_launcher_sync(
    request: pytest.FixtureRequest, qemu_shutdown_policy: ShutdownPolicy, tmp_path: Path
) -> Iterator[SyncQemuLauncher]:
    """Boot QEMU VMs in a plain ``def`` test; every one is stopped and reaped at teardown.

    ``vm = qemu_launcher_sync.launch(argv)`` returns a running
    :class:`qmpshutdown.SyncVM`; the test's VMs share one blocking portal; how
    each was stopped goes into the test's report, with the screenshot of a VM
    that had to be forced (kept in the test's ``tmp_path`` when the test failed),
    as ``qemu_launcher`` does.
    """
    evidence = tmp_path / "qmpshutdown-evidence"
    evidence.mkdir(exist_ok=True)
    from anyio.from_thread import start_blocking_portal

    with start_blocking_portal(backend="asyncio") as portal:
        launcher = SyncQemuLauncher(qemu_shutdown_policy, portal, evidence)
        try:
            yield launcher
        finally:
            failed = request.node.stash.get(_CALL_FAILED, False)
            _report(request, launcher.close(keep_evidence=failed))
