"""Patience that reads the guest: what it does while a graceful rung waits, and how long to wait.

While a graceful rung (the power button; an agent's shutdown) waits, a
sampler reads the guest about once a second without disturbing it: the CPU
time its vCPU threads wanted (QMP ``query-cpus-fast`` names the threads;
``/proc/PID/task/TID/schedstat`` counts their run and run-queue time) and
its block I/O (``query-blockstats``). The readings make the :class:`Activity`
record, and under ``patience="adaptive"`` they move the wait's deadline: on
while the guest works (never past ``max_powerdown_timeout``), and early when
it has been idle for ``idle_cutoff`` after the press.

One :class:`Sampler` per ladder (``Qemu.sampler``); it asks QEMU through a
callable it is given (so it knows nothing of the ladder above it). A graceful
rung runs its wait as (``GuestWait`` in :mod:`._waits`)::

    async with qemu.sampling():
        wait = GuestWait.begin(qemu, policy.powerdown_timeout)
        ...  # press, then
        seen = await wait.for_guest(next_press)
        if wait.over: ...  # why: wait.over ("timeout", "idle-cutoff", "cap")

and takes :func:`~._policy.wait_budget` as its budget.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable, Mapping, Sequence

import anyio
import attrs

from ._policy import ShutdownPolicy
from ._result import Activity

#: The longest the baseline reading waits after the press (see ``Sampler.sample_forever``).
FIRST_READING_AFTER = 0.25
#: Run-queue wait counts as demand up to this many times the run time in the same interval
#: (see :func:`demand`).
WAIT_PER_RUN = 2.0
#: Asks QEMU one QMP command for a reading; None when it cannot answer.
Ask = Callable[[str], Awaitable[object]]

logger = logging.getLogger("qmpshutdown")

# ---- reading the guest ------------------------------------------------------------


def vcpu_times(pid: int, tids: Sequence[int]) -> tuple[float, float] | None:
    """Seconds the vCPU threads *tids* of *pid* ran, and ran or waited to run; None if unreadable.

    ``schedstat`` holds run time and run-queue wait in ns: their sum is what the
    guest *wanted*, which reads 1.0 a second for a busy vCPU however loaded the
    host is (run time alone under-reads when other guests share the cores;
    :func:`demand` keeps an idle thread's wake-up latency out of it).
    Without schedstat, ``stat``'s utime+stime (ticks) stands in for both.
    """
    ran = wanted = 0.0
    for tid in tids:
        base = f"/proc/{pid}/task/{tid}"
        try:
            with open(f"{base}/schedstat", "rb") as file:
                fields = file.read().split()
            run, wait = int(fields[0]) / 1e9, int(fields[1]) / 1e9
        except (OSError, ValueError, IndexError):
            try:
                with open(f"{base}/stat", "rb") as file:
                    after = file.read().rpartition(b")")[2].split()
                # utime and stime, fields 14 and 15 of stat (11 and 12 after the name)
                run, wait = (int(after[11]) + int(after[12])) / _TICKS, 0.0
            except (OSError, ValueError, IndexError):
                return None
        ran += run
        wanted += run + wait
    return ran, wanted


def demand(ran: float, wanted: float) -> float:
    """The CPU time vCPU threads wanted in an interval in which they *ran* and ran or waited.

    A busy thread sharing a core with *n* others runs 1/(n+1) of the time and waits
    the rest: its wait is *n* times its run, and run plus wait reads the whole
    interval. A thread that sleeps and wakes briefly (an idle guest's timers) waits
    for each short run on a loaded host, and that wait is latency, not work: it
    can be ten times the run or more (CI saw 0.31 s wanted against under 0.01 s
    run in one second). So the wait counts only up to :data:`WAIT_PER_RUN` times
    the run: a busy vCPU reads in full up to three runnable threads a core, and at
    least 0.4 s a second (the default ``busy_cpu``) up to seven.
    """
    ran = max(0.0, ran)
    return ran + min(max(0.0, wanted - ran), WAIT_PER_RUN * ran)


try:
    _TICKS = float(os.sysconf("SC_CLK_TCK"))
except (ValueError, OSError, AttributeError):  # pragma: no cover - not Linux
    _TICKS = 100.0


def _block_totals(reply: object) -> tuple[int, int, int] | None:
    """Bytes read, bytes written and operations of ``query-blockstats``, over every device."""
    if not isinstance(reply, list):
        return None
    read = written = ops = 0
    for device in reply:
        stats = device.get("stats") if isinstance(device, Mapping) else None
        if not isinstance(stats, Mapping):
            continue
        read += int(stats.get("rd_bytes", 0))
        written += int(stats.get("wr_bytes", 0))
        ops += int(stats.get("rd_operations", 0)) + int(stats.get("wr_operations", 0))
    return read, written, ops


def _thread_ids(reply: object) -> list[int]:
    if not isinstance(reply, list):
        return []
    tids = {cpu.get("thread-id") for cpu in reply if isinstance(cpu, Mapping)}
    return sorted(tid for tid in tids if isinstance(tid, int) and tid > 0)


@attrs.frozen
class Reading:
    """One sample: the totals so far (anyio clock, seconds, bytes)."""

    at: float
    ran: float | None
    wanted: float | None
    io: tuple[int, int, int] | None


# ---- the record and the deadline ----------------------------------------------------


class Sampler:
    """The guest's activity while graceful rungs wait, and their deadlines (one per ladder).

    :param policy: the thresholds (``busy_cpu``, ``busy_io``, ``sample_interval``)
        and the patience.
    :param pid: QEMU's pid; None leaves the guest unread (no samples, fixed waits).
    """

    def __init__(self, policy: ShutdownPolicy, pid: int | None) -> None:
        self.policy = policy
        self.pid = pid
        self.tids: list[int] | None = None  #: the vCPU threads (read once)
        self.cpu_ok = pid is not None
        self.io_ok = pid is not None
        self.samples = 0
        self.ran = 0.0
        self.read = self.written = 0
        self.busy_seconds = 0.0
        self.longest_idle = 0.0
        self.recent: list[bool] = []  #: busy or not, the last readings' intervals
        self.last_busy: float | None = None  #: end of the last interval the guest worked
        self.quiet_since: float | None = None  #: since when it has done nothing
        self.ended: str | None = None

    @property
    def blind(self) -> bool:
        """True when nothing about the guest can be read (no pid, or both sources failed)."""
        return not (self.cpu_ok or self.io_ok)

    def begin_wait(self, started: float) -> None:
        """A graceful wait begins at *started*: the guest is quiet since then, so far."""
        self.quiet_since = started
        self.ended = None

    @property
    def first_reading_after(self) -> float:
        """How long after the press the baseline reading waits (see :meth:`sample_forever`)."""
        return min(FIRST_READING_AFTER, self.policy.sample_interval / 4)

    async def sample_forever(
        self,
        ask: Ask,
        name: str = "qemu",
        on_sample: Callable[[bool], object] | None = None,
        *,
        pressed: float | None = None,
    ) -> None:
        """Read the guest every ``sample_interval`` from the press until cancelled.

        The first reading, the baseline, waits a short grace
        (:attr:`first_reading_after`): a guest that powers off at once costs no
        reading at all. The others keep the schedule (one interval after the
        press, two, ...), so the first interval is that much shorter.

        :param ask: runs one QMP command and returns its reply (None when it failed).
        :param on_sample: told after each interval whether the guest worked in it.
        :param pressed: when the press was (anyio clock), for a caller that waited the
            grace itself; None: now, and the grace is waited here.
        """
        if self.pid is None:
            return
        interval = self.policy.sample_interval
        if pressed is None:
            pressed = anyio.current_time()
            await anyio.sleep(self.first_reading_after)
        previous = await self.reading(ask)
        due = pressed + interval
        while not self.blind:
            await anyio.sleep_until(due)
            current = await self.reading(ask)
            busy = self.take(previous, current, name)
            if on_sample is not None and busy is not None:
                on_sample(busy)
            previous = current
            due += interval
            if due < previous.at + interval / 2:  # a reading ran late: keep whole intervals
                due = previous.at + interval

    async def reading(self, ask: Ask) -> Reading:
        """Read the totals now (a failing source is dropped for the rest of the ladder)."""
        assert self.pid is not None
        if self.tids is None and self.cpu_ok:
            self.tids = _thread_ids(await ask("query-cpus-fast"))
            self.cpu_ok = bool(self.tids)
        io = None
        if self.io_ok:
            io = _block_totals(await ask("query-blockstats"))
            self.io_ok = io is not None
        times = vcpu_times(self.pid, self.tids) if self.cpu_ok and self.tids else None
        self.cpu_ok = self.cpu_ok and times is not None
        ran, wanted = times if times is not None else (None, None)
        return Reading(anyio.current_time(), ran, wanted, io)

    def take(self, before: Reading, after: Reading, name: str = "qemu") -> bool | None:
        """Count one interval between two readings: busy or idle, CPU, bytes; return busy."""
        seconds = after.at - before.at
        if seconds <= 0:
            return None
        busy = False
        wanted: float | None = None
        if before.ran is not None and after.ran is not None:
            ran = after.ran - before.ran
            self.ran += max(0.0, ran)
            if before.wanted is not None and after.wanted is not None:
                wanted = demand(ran, after.wanted - before.wanted) / seconds
                busy = wanted >= self.policy.busy_cpu
        if before.io is not None and after.io is not None:
            read, written = after.io[0] - before.io[0], after.io[1] - before.io[1]
            self.read += max(0, read)
            self.written += max(0, written)
            busy = busy or (read + written) / seconds >= self.policy.busy_io
        self.samples += 1
        logger.debug(
            "%s: sample: vCPU wanted %.2f s/s, I/O %d B/s: %s",
            name,
            wanted if wanted is not None else -1.0,
            (sum(after.io[:2]) - sum(before.io[:2])) / seconds
            if before.io is not None and after.io is not None
            else -1,
            "busy" if busy else "idle",
        )
        self.recent = [*self.recent[-1:], busy]
        if busy:
            self.busy_seconds += seconds
            self.last_busy = self.quiet_since = after.at
        elif self.quiet_since is not None:
            self.longest_idle = max(self.longest_idle, after.at - self.quiet_since)
        return busy

    def idle_until(self, now: float) -> None:
        """Count the idle stretch up to *now* (a wait's end), not only up to the last reading."""
        if self.quiet_since is not None and not any(self.recent[-1:]):
            self.longest_idle = max(self.longest_idle, now - self.quiet_since)

    def activity(self, *, powered_off: bool) -> Activity | None:
        """The record of every graceful wait so far, or None when nothing was read."""
        if self.samples == 0:
            return None
        ended = "powered-off" if powered_off else self.ended
        return Activity(
            samples=self.samples,
            vcpu_seconds=self.ran,
            bytes_read=self.read,
            bytes_written=self.written,
            longest_idle=self.longest_idle,
            busy_seconds=self.busy_seconds,
            busy_at_end=any(self.recent),
            ended=ended,
        )
