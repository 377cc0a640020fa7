"""``launch_sync()``: :func:`launch` for harnesses that are not async.

The VM lives in an event loop on a thread of its own, run by anyio's blocking
portal; the caller's thread only submits work to it and waits. The VM's async
context is entered and exited *inside* that loop. A ``KeyboardInterrupt`` (or
any exception) raised in the caller's thread while it waits never abandons
that work: the teardown still runs to its end in the loop, and the interrupt
is raised again once it has.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from anyio.from_thread import BlockingPortal, start_blocking_portal
from qemu.qmp import EventListener

from ._events import EVENTS_KEPT, event_record
from ._launch import VM, launch
from ._policy import DEFAULT_POLICY, ShutdownPolicy
from ._result import EventRecord, ShutdownResult

logger = logging.getLogger(__name__)

T = TypeVar("T")


def refuse_in_event_loop(what: str) -> None:
    """Raise RuntimeError if this thread runs an event loop (blocking it would hang it).

    :raises RuntimeError: called from async code.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise RuntimeError(
        f"{what} blocks, and this thread runs an event loop: "
        "in async code use `async with qmpshutdown.launch(...)` instead"
    )


def wait_through(future: concurrent.futures.Future[T], *, cancel: bool) -> T:
    """Return *future*'s result; an exception raised in this thread while waiting
    (Ctrl-C) does not abandon the task behind it.

    The task is cancelled first if *cancel* (its own cleanup runs shielded),
    then waited for to its end, through further interrupts; then the first
    interrupt is raised again.
    """
    try:
        return future.result()
    except BaseException:
        if future.done():
            raise  # the task's own outcome
        if cancel:
            future.cancel()
        while not future.done():
            # Another Ctrl-C here must not cut the wait short: QEMU would outlive us.
            with contextlib.suppress(BaseException):
                concurrent.futures.wait([future])
        raise


class _EventLog(EventListener):
    """The latest events a caller's client received, as records (bounded, thread-safe).

    ``put`` runs in the portal's loop, :meth:`records` in the caller's thread.
    """

    def __init__(self, limit: int = EVENTS_KEPT) -> None:
        super().__init__()
        self._records: collections.deque[EventRecord] = collections.deque(maxlen=limit)
        self._lock = threading.Lock()

    async def put(self, event: Any) -> None:
        if self.accept(event):
            record = event_record(event)
            with self._lock:
                self._records.append(record)

    def records(self) -> list[EventRecord]:
        with self._lock:
            return list(self._records)


class SyncVM:
    """A QEMU started by :func:`launch_sync`; stopped and reaped when its block ends.

    Every method blocks the calling thread; none may be called from async code.

    :ivar name: the name used in log lines.
    """

    def __init__(self, vm: VM, portal: BlockingPortal | None = None) -> None:
        self._vm = vm
        self.name = vm.name
        self._portal = portal
        self._own_portal: contextlib.AbstractContextManager[BlockingPortal] | None = None
        self._events = _EventLog()
        self._running = False  # entered, and not yet torn down

    # ---- what the caller sees -------------------------------------------------

    @property
    def pid(self) -> int:
        """QEMU's pid."""
        return self._vm.pid

    @property
    def qmp_socket(self) -> Path:
        """The unix socket of the caller's QMP monitor (the one :meth:`qmp` uses)."""
        return self._vm.qmp_socket

    @property
    def result(self) -> ShutdownResult | None:
        """The :class:`ShutdownResult` of the stop, once QEMU was stopped."""
        return self._vm.result

    def __repr__(self) -> str:
        return f"<SyncVM {self._vm!r}>"

    def qmp(self, command: str, **arguments: Any) -> Any:
        """Run one QMP command on the caller's monitor; return its result.

        Waits for QEMU's answer as ``vm.monitor.execute`` does (Ctrl-C ends
        the wait; the block's end still stops QEMU).

        :raises qemu.qmp.ExecuteError: QEMU answered with an error.
        :raises qemu.qmp.ExecInterruptedError: the connection ended first.
        """
        return self._call("qmp", self._vm.monitor.execute, command, arguments or None)

    def events(self) -> list[EventRecord]:
        """Return the QMP events the caller's monitor received so far, oldest first.

        Only the latest 1,000 are kept. They stay readable after the block.
        """
        return self._events.records()

    def shutdown(self, policy: ShutdownPolicy | None = None) -> ShutdownResult:
        """Stop QEMU now, with *policy* (default: the one given to :func:`launch_sync`).

        :raises ShutdownFailed: the policy's rungs are used up and QEMU still
            runs (the block's end will still take it down).
        :return: the record, also kept as :attr:`result`.
        """
        return self._call("shutdown", self._vm.shutdown, policy)

    # ---- the portal ------------------------------------------------------------

    def _call(self, what: str, func: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run *func* in the portal's loop; Ctrl-C cancels it (and waits for that)."""
        refuse_in_event_loop(f"SyncVM.{what}()")
        assert self._portal is not None, "the VM is not running"
        return wait_through(self._portal.start_task_soon(func, *args), cancel=True)

    async def start(self) -> None:
        """Boot QEMU (in the portal's loop) and start recording the caller's events."""
        await self._vm.__aenter__()
        self._running = True
        self._vm.monitor.register_listener(self._events)

    def attach(self, portal: BlockingPortal) -> None:
        """Use *portal* for a VM already started in its loop (the pytest fixture's way)."""
        self._portal = portal
        self._running = True
        portal.call(self._vm.monitor.register_listener, self._events)

    def stop(self) -> None:
        """Run the shielded teardown in the portal's loop; wait for it, even through Ctrl-C."""
        assert self._portal is not None
        if not self._running:
            return
        self._running = False
        wait_through(
            self._portal.start_task_soon(self._vm.__aexit__, None, None, None), cancel=False
        )

    # ---- the block ---------------------------------------------------------------

    def __enter__(self) -> SyncVM:
        refuse_in_event_loop("launch_sync()")
        if self._portal is None:
            self._own_portal = start_blocking_portal(backend="asyncio")
            self._portal = self._own_portal.__enter__()
        try:
            wait_through(self._portal.start_task_soon(self.start), cancel=True)
        except BaseException as err:
            # Interrupted while booting: the boot may have finished all the same
            # (a failed boot took itself down).
            self.stop()
            self._close_portal(type(err), err, err.__traceback__)
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.stop()
        except BaseException as err:  # Ctrl-C during the teardown, which did finish
            self._close_portal(type(err), err, err.__traceback__)
            raise
        self._close_portal(exc_type, exc, tb)

    def _close_portal(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        own, self._own_portal = self._own_portal, None
        if own is not None:
            own.__exit__(exc_type, exc, tb)


def launch_sync(
    argv: Sequence[str],
    policy: ShutdownPolicy = DEFAULT_POLICY,
    name: str | None = None,
    *,
    portal: BlockingPortal | None = None,
    **kwargs: Any,
) -> SyncVM:
    """Boot QEMU for the length of a ``with`` block; always stop and reap it.

    ::

        with qmpshutdown.launch_sync(["qemu-system-x86_64", ...]) as vm:
            vm.qmp("query-status")
        print(vm.result.stage)

    :param argv: see :func:`launch`.
    :param policy: see :func:`launch`.
    :param name: see :func:`launch`.
    :param portal: an anyio blocking portal (asyncio backend) to run the VM
        in; one portal may serve many VMs. Default: one of its own, for the block.
    :param kwargs: the rest of :func:`launch`'s keywords (``startup_timeout``,
        ``on_progress``; the latter is called in the portal's thread).
    :raises RuntimeError: called where an event loop runs (use :func:`launch`).
    :raises LaunchError: (on entering) see :func:`launch`.
    :return: the :class:`SyncVM`, a context manager. Leaving the block —
        normally, by exception or by Ctrl-C — runs :func:`launch`'s shielded
        teardown to its end; no QEMU is left behind.
    """
    refuse_in_event_loop("launch_sync()")
    return SyncVM(launch(argv, policy, name, **kwargs), portal)
