"""The pytest plugin: a ``qemu_launcher`` fixture that never leaves a QEMU behind.

Registered through the ``pytest11`` entry point. Async tests (pytest-asyncio)
boot VMs with ``await qemu_launcher.launch(argv)``, plain ``def`` tests with
``qemu_launcher_sync.launch(argv)``; at the fixture's teardown every VM still
running is stopped with the ladder, reaped, and how each was stopped is added
to the test's report (shown with the test's output).

pytest-asyncio may run an async fixture's setup and teardown in different
tasks, so nothing here keeps a cancel scope or task group open across the
fixture's ``yield``: each VM is entered and exited explicitly.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import anyio
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal

from ._launch import VM, launch
from ._policy import ShutdownPolicy
from ._sync import SyncVM, refuse_in_event_loop, wait_through


class QemuLauncher:
    """Boots VMs for one test and stops every one of them at its end."""

    def __init__(self, policy: ShutdownPolicy) -> None:
        self.policy = policy
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
        vm = launch(argv, policy or self.policy, name or f"vm{len(self.vms) + 1}", **kwargs)
        await vm.__aenter__()
        self.vms.append(vm)
        return vm

    async def aclose(self) -> list[str]:
        """Stop every VM still running (concurrently); return one line per VM."""
        with anyio.CancelScope(shield=True):
            async with anyio.create_task_group() as tg:
                for vm in self.vms:
                    tg.start_soon(vm.__aexit__, None, None, None)
        lines = []
        for vm in self.vms:
            result = vm.result
            how = result.summary() if result is not None else "exited on its own"
            lines.append(f"{vm.name}: {how}")
        return lines


class SyncQemuLauncher:
    """:class:`QemuLauncher` for plain tests: its VMs live in one blocking portal's loop."""

    def __init__(self, policy: ShutdownPolicy, portal: BlockingPortal) -> None:
        self.policy = policy
        self.portal = portal
        self._launcher = QemuLauncher(policy)
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

    def close(self) -> list[str]:
        """Stop every VM still running (concurrently, even through Ctrl-C); one line per VM."""
        return wait_through(self.portal.start_task_soon(self._launcher.aclose), cancel=False)


def _report(request: pytest.FixtureRequest, lines: list[str]) -> None:
    """Add how each VM was stopped to the test's report."""
    if lines:
        request.node.add_report_section("teardown", "qmpshutdown", "\n".join(lines))


@pytest.fixture
def qemu_shutdown_policy() -> ShutdownPolicy:
    """The policy ``qemu_launcher`` stops VMs with; override this fixture to change it."""
    return ShutdownPolicy()


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
        request: pytest.FixtureRequest, qemu_shutdown_policy: ShutdownPolicy
    ) -> AsyncIterator[QemuLauncher]:
        """Boot QEMU VMs in a test; every one is stopped and reaped at teardown.

        ``vm = await qemu_launcher.launch(argv)`` returns a running
        :class:`qmpshutdown.VM`; how each was stopped goes into the test's report.
        """
        launcher = QemuLauncher(qemu_shutdown_policy)
        try:
            yield launcher
        finally:
            _report(request, await launcher.aclose())


@pytest.fixture
def qemu_launcher_sync(
    request: pytest.FixtureRequest, qemu_shutdown_policy: ShutdownPolicy
) -> Iterator[SyncQemuLauncher]:
    """Boot QEMU VMs in a plain ``def`` test; every one is stopped and reaped at teardown.

    ``vm = qemu_launcher_sync.launch(argv)`` returns a running
    :class:`qmpshutdown.SyncVM`; the test's VMs share one blocking portal; how
    each was stopped goes into the test's report.
    """
    with start_blocking_portal(backend="asyncio") as portal:
        launcher = SyncQemuLauncher(qemu_shutdown_policy, portal)
        try:
            yield launcher
        finally:
            _report(request, launcher.close())
