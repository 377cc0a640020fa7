"""The pytest plugin: a ``qemu_launcher`` fixture that never leaves a QEMU behind.

Registered through the ``pytest11`` entry point. Async tests (pytest-asyncio)
boot VMs with ``await qemu_launcher.launch(argv)``; at the fixture's teardown
every VM still running is stopped with the ladder, reaped, and how each was
stopped is added to the test's report (shown with the test's output).

pytest-asyncio may run an async fixture's setup and teardown in different
tasks, so nothing here keeps a cancel scope or task group open across the
fixture's ``yield``: each VM is entered and exited explicitly.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

import anyio
import pytest

from ._launch import VM, launch
from ._policy import ShutdownPolicy


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
            lines = await launcher.aclose()
            if lines:
                request.node.add_report_section("teardown", "qmpshutdown", "\n".join(lines))
