"""Patience that reads the guest: what it does while a graceful rung waits, and how long to wait.

While a graceful rung (the power button; an agent's shutdown) waits, a
sampler reads the guest about once a second without disturbing it: the CPU
time its vCPU threads wanted (QMP ``query-cpus-fast`` names the threads;
``/proc/PID/task/TID/schedstat`` counts their run and run-queue time) and
its block I/O (``query-blockstats``). The readings make the :class:`Activity`
record, and under ``patience="adaptive"`` they move the wait's deadline: on
while the guest works (never past ``max_powerdown_timeout``), and early when
it has been idle for ``idle_cutoff`` after the press.

One :class:`Patience` per ladder (``Qemu.patience``); a graceful rung runs
its wait as::

    async with qemu.sampling():
        wait = qemu.patience.wait(qemu, policy.powerdown_timeout)
        ...  # press, then
        seen = await wait.for_guest(next_press)
        if wait.over: ...  # why: wait.over ("timeout", "idle-cutoff", "cap")

and takes :func:`wait_budget` as its budget.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import anyio
import attrs

from ._errors import CommandError, MonitorClosedError
from ._policy import ShutdownPolicy

if TYPE_CHECKING:
    from ._qemu import Guest, Qemu

logger = logging.getLogger("qmpshutdown")

#: Why a graceful wait ended (:attr:`Activity.ended`).
WAIT_ENDS = ("powered-off", "idle-cutoff", "cap", "timeout")


@attrs.frozen
class Activity:
    """What the guest did while the graceful rungs waited for it (their sampler's readings).

    :ivar samples: readings taken (about one a second, the first one at the first press).
    :ivar vcpu_seconds: CPU time the vCPU threads ran during the wait, in seconds.
    :ivar bytes_read: bytes the guest read from its block devices during the wait.
    :ivar bytes_written: bytes it wrote.
    :ivar longest_idle: the longest stretch, in seconds, in which it did no work.
    :ivar busy_seconds: seconds of the wait in which it worked (CPU or disk above
        the policy's ``busy_cpu`` / ``busy_io``).
    :ivar busy_at_end: True when it was still working in the last two readings.
    :ivar ended: why the (last) wait ended: ``powered-off``, ``idle-cutoff`` (adaptive:
        idle too long), ``cap`` (adaptive: ``max_powerdown_timeout``), ``timeout``; None
        when it was cut short otherwise (QEMU went without the guest, a panic, a failure).
    """

    samples: int
    vcpu_seconds: float
    bytes_read: int
    bytes_written: int
    longest_idle: float
    busy_seconds: float
    busy_at_end: bool
    ended: str | None

    @property
    def reacted(self) -> bool:
        """True when the guest worked at all during the wait (a reaction to the press)."""
        return self.busy_seconds > 0

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict: the fields, times as ``*_s``.

        Keys: ``samples``, ``vcpu_seconds``, ``bytes_read``, ``bytes_written``,
        ``longest_idle_s``, ``busy_s``, ``busy_at_end``, ``ended``.
        """
        return {
            "samples": self.samples,
            "vcpu_seconds": round(self.vcpu_seconds, 6),
            "bytes_read": self.bytes_read,
            "bytes_written": self.bytes_written,
            "longest_idle_s": round(self.longest_idle, 6),
            "busy_s": round(self.busy_seconds, 6),
            "busy_at_end": self.busy_at_end,
            "ended": self.ended,
        }

    def summary(self) -> str:
        """A few words for a step's detail: how busy, how idle."""
        state = "busy at the end" if self.busy_at_end else f"idle for {self.longest_idle:.0f} s"
        return (
            f"guest {state}: {self.vcpu_seconds:.1f} vCPU s, "
            f"{_size(self.bytes_read)} read, {_size(self.bytes_written)} written, "
            f"busy {self.busy_seconds:.0f} s"
        )


def _size(count: int) -> str:
    return f"{count / 2**20:.1f} MiB" if count >= 2**20 else f"{count // 1024} KiB"


def wait_budget(policy: ShutdownPolicy, timeout: float) -> float:
    """The longest a graceful wait of *timeout* may last under *policy* (adaptive: the cap)."""
    if policy.patience == "adaptive":
        return max(timeout, policy.max_powerdown_timeout)
    return timeout


# ---- reading the guest ------------------------------------------------------------


def vcpu_times(pid: int, tids: Sequence[int]) -> tuple[float, float] | None:
    """Seconds the vCPU threads *tids* of *pid* ran, and ran or waited to run; None if unreadable.

    ``schedstat`` holds run time and run-queue wait in ns: their sum is what the
    guest *wanted*, which reads 1.0 a second for a busy vCPU however loaded the
    host is (run time alone under-reads when other guests share the cores).
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


class Patience:
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

    def wait(self, qemu: Qemu, timeout: float) -> GuestWait:
        """Begin one graceful wait of *timeout* seconds (the rung's patience applies)."""
        wait = GuestWait(self, qemu, timeout)
        self.quiet_since = wait.started
        self.ended = None
        return wait

    async def sample_forever(self, qemu: Qemu) -> None:
        """Read the guest every ``sample_interval`` until cancelled (a sampler of ``Qemu``)."""
        if self.pid is None:
            return
        previous = await self.reading(qemu)
        while not self.blind:
            await anyio.sleep(self.policy.sample_interval)
            current = await self.reading(qemu)
            self.take(previous, current, qemu.recorder.name)
            previous = current

    async def reading(self, qemu: Qemu) -> Reading:
        """Read the totals now (a failing source is dropped for the rest of the ladder)."""
        assert self.pid is not None
        if self.tids is None and self.cpu_ok:
            self.tids = _thread_ids(await self._ask(qemu, "query-cpus-fast"))
            self.cpu_ok = bool(self.tids)
        io = None
        if self.io_ok:
            io = _block_totals(await self._ask(qemu, "query-blockstats"))
            self.io_ok = io is not None
        times = vcpu_times(self.pid, self.tids) if self.cpu_ok and self.tids else None
        self.cpu_ok = self.cpu_ok and times is not None
        ran, wanted = times if times is not None else (None, None)
        return Reading(anyio.current_time(), ran, wanted, io)

    async def _ask(self, qemu: Qemu, command: str) -> object:
        if qemu.monitor is None or qemu.monitor.is_closed():
            return None
        try:
            return await qemu.command(command)
        except (CommandError, MonitorClosedError, TimeoutError) as err:
            logger.debug("%s: %s for sampling failed: %r", qemu.recorder.name, command, err)
            return None

    def take(self, before: Reading, after: Reading, name: str = "qemu") -> None:
        """Count one interval between two readings: busy or idle, CPU, bytes."""
        seconds = after.at - before.at
        if seconds <= 0:
            return
        busy = False
        if before.ran is not None and after.ran is not None:
            self.ran += max(0.0, after.ran - before.ran)
        if before.wanted is not None and after.wanted is not None:
            busy = (after.wanted - before.wanted) / seconds >= self.policy.busy_cpu
        if before.io is not None and after.io is not None:
            read, written = after.io[0] - before.io[0], after.io[1] - before.io[1]
            self.read += max(0, read)
            self.written += max(0, written)
            busy = busy or (read + written) / seconds >= self.policy.busy_io
        self.samples += 1
        logger.debug(
            "%s: sample: vCPU wanted %.2f s/s, I/O %d B/s: %s",
            name,
            (after.wanted - before.wanted) / seconds
            if before.wanted is not None and after.wanted is not None
            else -1.0,
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


class GuestWait:
    """One graceful rung's wait for the guest: its deadline, fixed or adaptive.

    Fixed: *timeout* after the start. Adaptive: the later of that and
    ``idle_cutoff`` after the guest last worked, never past
    ``max_powerdown_timeout``; and early once the guest has done nothing for
    ``idle_cutoff`` since the start (or since it last worked) while the last
    press has had ``min(idle_cutoff, repress_interval)`` to show a reaction.
    """

    def __init__(self, patience: Patience, qemu: Qemu, timeout: float) -> None:
        self.patience = patience
        self.qemu = qemu
        self.timeout = timeout
        self.started = self.last_press = anyio.current_time()
        self.over: str | None = None  #: why the wait is over ("timeout", "idle-cutoff", "cap")

    def pressed(self) -> None:
        """Note a press (or another request): the guest gets a fresh chance to react to it."""
        self.last_press = anyio.current_time()

    def deadline(self) -> tuple[float, str]:
        """When the wait ends as things stand (anyio clock), and why it would."""
        policy, patience = self.qemu.policy, self.patience
        base = self.started + self.timeout
        if policy.patience != "adaptive" or patience.blind:
            return base, "timeout"
        cap = self.started + wait_budget(policy, self.timeout)
        last_busy = patience.last_busy
        if last_busy is not None and last_busy <= self.started:
            last_busy = None  # work before this wait is no reaction to it
        late = base if last_busy is None else max(base, last_busy + policy.idle_cutoff)
        interval = policy.repress_interval
        window = policy.idle_cutoff if interval is None else min(policy.idle_cutoff, interval)
        quiet_since = self.started if last_busy is None else last_busy
        early = max(quiet_since + policy.idle_cutoff, self.last_press + window)
        if early <= min(cap, late):
            return early, "idle-cutoff"
        return (cap, "cap") if cap < late else (late, "timeout")

    async def for_guest(self, until: float) -> Guest:
        """Wait for the guest until *until* or the deadline; :attr:`over` tells which came."""
        from ._qemu import Guest

        interval = self.qemu.policy.sample_interval
        while True:
            end, why = self.deadline()
            now = anyio.current_time()
            if now >= end:
                self.over = self.patience.ended = why
                self.patience.idle_until(now)
                return Guest.WAITING
            if now >= until:
                return Guest.WAITING
            # The deadline moves with the readings: look again after each one.
            seen = await self.qemu.wait_for_guest(min(until, end, now + interval))
            if seen is not Guest.WAITING:
                if seen is Guest.OFF:
                    self.patience.ended = "powered-off"
                return seen

    def why_over(self) -> str:
        """The step's words for an ended wait, with what was seen."""
        policy = self.qemu.policy
        if self.over == "idle-cutoff":
            what = f"guest idle {policy.idle_cutoff:g} s after the press: escalating early"
        elif self.over == "cap":
            what = f"no power-off in {wait_budget(policy, self.timeout):g} s (the cap)"
        else:
            what = f"no power-off in {self.timeout:g} s"
        seen = self.patience.activity(powered_off=False)
        return what if seen is None else f"{what}; {seen.summary()}"
