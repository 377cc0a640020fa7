"""One graceful rung's wait for the guest: :class:`GuestWait`, fixed or adaptive.

The power button's rung waits through it: the deadline moves with the
sampler's readings under adaptive patience (:mod:`._patience`), and the
wait ends early or late as the guest idles or works.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio

from ._policy import Patience, wait_budget
from ._qemu import Guest, Qemu

#: How many ``sample_interval`` s between two questions to the guest's agent while it holds
#: an inhibitor (2 s under the default policy).
LISTEN_EVERY = 2
#: Asks the guest whether it holds an inhibitor: True, False, or None when it cannot tell.
Listener = Callable[[], Awaitable[bool | None]]


class GuestWait:
    """One graceful rung's wait for the guest: its deadline, fixed or adaptive.

    Fixed: *timeout* after the start. Adaptive: the later of that and
    ``idle_cutoff`` after the guest last worked, never past
    ``max_powerdown_timeout``; and early once the guest has done nothing for
    ``idle_cutoff`` since the start (or since it last worked) while the last
    press has had ``min(idle_cutoff, repress_interval)`` to show a reaction.

    Adaptive, with :attr:`listen` set (the guest's agent answers): before the wait
    would end early or on time, the guest is asked whether it holds a block
    inhibitor; while it does, that counts as work (the guest asks for time, up
    to the cap), asked again every :data:`LISTEN_EVERY` ``sample_interval`` s, and once it
    lets go the wait returns at once so that the rung presses again; the moment it let go
    counts as its last work, so that press has ``idle_cutoff`` to be answered.
    """

    def __init__(self, qemu: Qemu, timeout: float) -> None:
        self.qemu = qemu
        self.sampler = qemu.sampler
        self.timeout = timeout
        self.started = self.last_press = anyio.current_time()
        self.over: str | None = None  #: why the wait is over ("timeout", "idle-cutoff", "cap")
        self.listen: Listener | None = None  #: asks the guest whether it holds an inhibitor
        self.held_at: float | None = None  #: when the guest last said it holds one
        #: When the guest last spoke of an inhibitor: it held one, or let go of it (both
        #: count as work: the press that follows a release gets ``idle_cutoff`` from it).
        self.spoke_at: float | None = None

    @classmethod
    def begin(cls, qemu: Qemu, timeout: float) -> GuestWait:
        """Begin one graceful wait of *timeout* seconds (the policy's patience applies)."""
        wait = cls(qemu, timeout)
        qemu.sampler.begin_wait(wait.started)
        return wait

    def pressed(self) -> None:
        """Note a press (or another request): the guest gets a fresh chance to react to it."""
        self.last_press = anyio.current_time()

    def deadline(self) -> tuple[float, str]:
        """When the wait ends as things stand (anyio clock), and why it would."""
        policy, sampler = self.qemu.policy, self.sampler
        base = self.started + self.timeout
        if policy.patience is not Patience.ADAPTIVE or (sampler.blind and self.spoke_at is None):
            return base, "timeout"
        cap = self.started + wait_budget(policy, self.timeout)
        last_busy = None if sampler.blind else sampler.last_busy
        if last_busy is not None and last_busy <= self.started:
            last_busy = None  # work before this wait is no reaction to it
        if self.spoke_at is not None:  # it holds an inhibitor (asks for time), or let go of one
            last_busy = self.spoke_at if last_busy is None else max(last_busy, self.spoke_at)
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
        interval = self.qemu.policy.sample_interval
        listen_every = LISTEN_EVERY * interval
        while True:
            end, why = self.deadline()
            now = anyio.current_time()
            due = now >= end or (self.held_at is not None and now >= self.held_at + listen_every)
            if self.listen is not None and why != "cap" and due:
                if await self._listened(self.listen):
                    return Guest.WAITING  # it let go of its inhibitor: press again at once
                continue
            if now >= end:
                self.over = self.sampler.ended = why
                self.sampler.idle_until(now)
                return Guest.WAITING
            if now >= until:
                return Guest.WAITING
            # The deadline moves with the readings: look again after each one.
            wake = min(until, end, now + interval)
            if self.held_at is not None and self.listen is not None:
                wake = min(wake, self.held_at + listen_every)
            seen = await self.qemu.wait_for_guest(wake)
            if seen is not Guest.WAITING:
                if seen is Guest.OFF:
                    self.sampler.ended = "powered-off"
                return seen

    async def _listened(self, listen: Listener) -> bool:
        """Ask whether the guest holds an inhibitor; True when it just let go of one.

        Held: the wait goes on (:attr:`held_at`). Not held, or no answer: the
        wait ends as it would have; no answer also ends the listening.
        """
        cap = self.started + wait_budget(self.qemu.policy, self.timeout)
        held = None
        with anyio.move_on_after(max(0.0, cap - anyio.current_time())):
            held = await listen()
        if held is None:
            self.listen = self.held_at = None  # it cannot tell (no agent, no guest-exec)
            return False
        if held:
            self.held_at = self.spoke_at = anyio.current_time()
            return False
        released, self.held_at = self.held_at is not None, None
        if released:
            # Its last work: the press that follows gets idle_cutoff from now, not a deadline
            # that the time it held the inhibitor had already passed (seen on 3 test workers,
            # QEMU 10.0: a guest that went 0.8 s after that press was escalated 0.1 s after it).
            self.spoke_at = anyio.current_time()
            self.qemu.recorder.say("the guest let go of its inhibitor: pressing again at once")
        else:
            self.listen = None  # it held none when asked: the wait ends as it would have
        return released

    def why_over(self) -> str:
        """The step's words for an ended wait, with what was seen."""
        policy = self.qemu.policy
        if self.over == "idle-cutoff":
            what = f"guest idle {policy.idle_cutoff:g} s after the press: escalating early"
        elif self.over == "cap":
            what = f"no power-off in {wait_budget(policy, self.timeout):g} s (the cap)"
        else:
            what = f"no power-off in {self.timeout:g} s"
        seen = self.sampler.activity(powered_off=False)
        return what if seen is None else f"{what}; {seen.summary()}"
