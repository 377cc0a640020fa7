"""The chaos soak: fixture guests of random behaviours, random short policies, random faults.

Each trial, drawn from one seed (``random.Random(seed)``), boots two or three
guests, stops them concurrently (one :func:`qmpshutdown.shutdown` each, or
one :func:`qmpshutdown.shutdown_many`), and meanwhile injects faults at
random moments: SIGSTOP (and maybe SIGCONT) of QEMU, SIGKILL of QEMU, its
socket unlinked or replaced by an impostor, a second client holding the
monitor, the caller cancelled, a guest panic, the guest agent killed or
frozen (SIGKILL / SIGSTOP of qemu-ga inside the guest, through the agent's
own ``guest-exec``). Every trial checks the invariants of :func:`check`; a
failing trial raises :class:`Violation` with its seed and fault schedule, and
that seed replays it (``python tests/support/chaos.py --seed N``).

``tests/guests/test_chaos.py`` runs a short soak in CI; ``python tests/support/chaos.py
--ladders 500 --write`` runs the full one and writes its figures to
``tests/support/chaos-soak.json``, which ``tests/support/robustness.py`` renders into
docs/robustness.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import attrs

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # run as a script: tests/, where `support` is
    sys.path.insert(0, str(HERE.parent))

import qmpshutdown  # noqa: E402
from qmpshutdown import Outcome, ShutdownPolicy, ShutdownResult, Stage  # noqa: E402
from qmpshutdown._policy import RUNGS  # noqa: E402
from support.guests import Guest, GuestFactory, RawAgent, qmp_connect, qmp_disconnect  # noqa: E402

#: Where the full soak's figures go (rendered into docs/robustness.md).
RESULTS = HERE / "chaos-soak.json"
PEERS = HERE / "peers.py"
#: How far past ``policy.bound`` a call may return (the event loop, a loaded machine).
MARGIN = 3.0
#: Behaviours a trial's guests are drawn from, with the ``arg`` each may take.
BEHAVIOURS: dict[str, Sequence[int | None]] = {
    "cooperative": (None,),
    "slow": (1, 2, 4),
    "needs-presses": (2, 3),
    "ignores": (None,),
    "stalls": (None,),
    "updating": (2, 5),
    "reboots": (None,),
    "asleep": (0, 1),
    "panics": (0, 1, 2),
}
FAULTS = (
    "sigstop",
    "sigkill",
    "unlink-socket",
    "impostor-socket",
    "hold-monitor",
    "cancel",
    "agent-kill",
    "agent-freeze",
)
GUEST_OFF_REASONS = frozenset({"guest-shutdown", "guest-reset"})


class Violation(AssertionError):
    """An invariant did not hold; the message carries the seed and the schedule."""


@attrs.define
class Target:
    """One guest of a trial: how it behaves, how it is stopped, what is done to it."""

    mode: str
    arg: int | None
    agent: bool
    extra_args: list[str]
    policy: ShutdownPolicy
    faults: list[tuple[float, str, dict[str, Any]]]  # (seconds after the stop begins, kind, how)
    guest: Guest | None = None
    outcome: Any = None  # a ShutdownResult, an Error, or "cancelled"
    elapsed: float | None = None
    delivered: list[str] = attrs.Factory(list)
    returncode: int | None = None

    def describe(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "arg": self.arg,
            "agent": self.agent,
            "extra_args": self.extra_args,
            "policy": {
                "stages": [s.value for s in self.policy.stages],
                "powerdown_timeout": self.policy.powerdown_timeout,
                "repress_interval": self.policy.repress_interval,
                "patience": self.policy.patience,
                "bound": round(self.policy.bound, 2),
            },
            "faults": [[round(at, 2), kind, how] for at, kind, how in self.faults],
            "delivered": self.delivered,
            "outcome": _outcome_text(self.outcome),
            "elapsed": None if self.elapsed is None else round(self.elapsed, 2),
            "returncode": self.returncode,
        }


def _outcome_text(outcome: Any) -> str | None:
    if outcome is None:
        return None
    if isinstance(outcome, ShutdownResult):
        steps = ", ".join(f"{s.stage.value}:{s.outcome.value}" for s in outcome.steps)
        stage = outcome.stage.value if outcome.stage else None
        return f"stage={stage} cause={outcome.cause} [{steps}]"
    if isinstance(outcome, BaseException):
        return f"{type(outcome).__name__}: {outcome}"
    return str(outcome)


# ---- drawing a trial ---------------------------------------------------------------


def draw_policy(rng: random.Random, agent: bool) -> ShutdownPolicy:
    forced = rng.choice(
        [
            ("quit", "terminate", "kill"),
            ("quit", "terminate", "kill"),
            ("terminate", "kill"),
            ("kill",),
            ("quit",),
            (),  # no force at all: the record must say QEMU still runs
        ]
    )
    graceful: tuple[str, ...] = ("powerdown", "agent") if agent else ("powerdown",)
    if agent and rng.random() < 0.3:
        graceful = ("agent", "powerdown")
    patience = "adaptive" if rng.random() < 0.25 else "fixed"
    powerdown_timeout = round(rng.uniform(0.5, 4.0), 2)
    return ShutdownPolicy(
        powerdown_timeout=powerdown_timeout,
        repress_interval=rng.choice([None, 0.5, 1.0, 2.0]),
        quit_timeout=round(rng.uniform(0.5, 3.0), 2),
        terminate_timeout=round(rng.uniform(0.5, 3.0), 2),
        kill_timeout=3.0,
        connect_timeout=round(rng.uniform(1.0, 3.0), 2),
        command_timeout=round(rng.uniform(1.0, 3.0), 2),
        agent_timeout=round(rng.uniform(0.5, 3.0), 2),
        freeze_timeout=2.0,
        wake_suspended=rng.random() < 0.7,
        resume_paused=rng.random() < 0.5,
        patience=patience,
        max_powerdown_timeout=round(powerdown_timeout + rng.uniform(0.5, 3.0), 2),
        idle_cutoff=round(rng.uniform(1.0, 2.5), 2),
        sample_interval=0.5,
        stages=graceful + forced,
    )


def draw_target(rng: random.Random) -> Target:
    mode = rng.choice(sorted(BEHAVIOURS))
    arg = rng.choice(BEHAVIOURS[mode])
    agent = rng.random() < 0.35
    extra: list[str] = []
    if mode == "panics":
        extra = ["-device", "pvpanic", "-action", f"panic={rng.choice(['shutdown', 'pause'])}"]
    if mode == "reboots" and rng.random() < 0.5:
        extra = ["-no-reboot"]
    if rng.random() < 0.15:
        extra.append("-no-shutdown")
    faults: list[tuple[float, str, dict[str, Any]]] = []
    kinds = [k for k in FAULTS if agent or not k.startswith("agent-")]
    for kind in rng.sample(kinds, k=rng.choice([0, 1, 1, 2])):
        at = round(rng.uniform(0.0, 3.0), 2)
        how: dict[str, Any] = {}
        if kind == "sigstop":
            how["cont_after"] = rng.choice([None, round(rng.uniform(0.2, 3.0), 2)])
        if kind == "hold-monitor":
            at = 0.0  # the holder must be first, to take the greeting
            how["release_after"] = rng.choice([None, round(rng.uniform(0.3, 3.0), 2)])
        faults.append((at, kind, how))
    return Target(
        mode,
        arg,
        agent,
        extra,
        draw_policy(rng, agent),
        sorted(faults, key=lambda fault: fault[:2]),
    )


@attrs.define
class Trial:
    seed: int
    targets: list[Target]
    many: bool  # one shutdown_many() call instead of one shutdown() each

    @classmethod
    def draw(cls, seed: int) -> Trial:
        rng = random.Random(seed)
        targets = [draw_target(rng) for _ in range(rng.choice([2, 2, 3]))]
        cancels = any(kind == "cancel" for t in targets for _, kind, _ in t.faults)
        return cls(seed, targets, many=not cancels and rng.random() < 0.3)

    def schedule(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "shutdown_many": self.many,
            "targets": [t.describe() for t in self.targets],
        }


# ---- decoys: processes around the trial that must never be signalled ----------------


@attrs.define
class Decoy:
    popen: subprocess.Popen[bytes]
    log: Path

    @classmethod
    def start(cls, behaviour: str, address: Path) -> Decoy:
        log = address.with_suffix(".log")
        popen = subprocess.Popen(
            [sys.executable, str(PEERS), behaviour, str(address), "--log", str(log)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        return cls(popen, log)

    async def ready(self, address: Path, timeout: float = 10.0) -> None:
        with anyio.fail_after(timeout):
            while not address.exists():
                await anyio.sleep(0.02)

    def signals(self) -> list[str]:
        if not self.log.exists():
            return []
        return [line for line in self.log.read_text().splitlines() if line.startswith("signal")]

    def stopped(self) -> bool:
        try:
            with open(f"/proc/{self.popen.pid}/stat") as stat:
                return stat.read().rsplit(")", 1)[1].split()[0] in ("T", "t")
        except FileNotFoundError:
            return False

    def end(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.popen.kill()
        self.popen.wait(timeout=10)


# ---- running a trial -----------------------------------------------------------------


async def inject(target: Target, workdir: Path, decoys: list[Decoy], start: anyio.Event) -> None:
    """Carry out *target*'s faults at their moments (seconds after the stop began)."""
    guest = target.guest
    assert guest is not None and guest.qmp_path is not None
    await start.wait()
    began = anyio.current_time()
    async with anyio.create_task_group() as tg:
        for at, kind, how in target.faults:
            if kind in ("hold-monitor", "cancel"):
                continue  # done by run_one
            tg.start_soon(_one_fault, target, guest, workdir, decoys, began + at, kind, how)


async def _one_fault(
    target: Target,
    guest: Guest,
    workdir: Path,
    decoys: list[Decoy],
    when: float,
    kind: str,
    how: dict[str, Any],
) -> None:
    await anyio.sleep(max(0.0, when - anyio.current_time()))
    if not guest.alive():
        return
    assert guest.qmp_path is not None
    if kind == "sigstop":
        os.kill(guest.pid, signal.SIGSTOP)
        target.delivered.append("sigstop")
        if how.get("cont_after") is not None:
            await anyio.sleep(how["cont_after"])
            if guest.alive():
                os.kill(guest.pid, signal.SIGCONT)
                target.delivered.append("sigcont")
    elif kind == "sigkill":
        os.kill(guest.pid, signal.SIGKILL)
        target.delivered.append("sigkill")
    elif kind == "unlink-socket":
        with contextlib.suppress(FileNotFoundError):
            guest.qmp_path.unlink()
            target.delivered.append("unlink-socket")
    elif kind == "impostor-socket":
        with contextlib.suppress(FileNotFoundError):
            guest.qmp_path.unlink()
        decoy = Decoy.start("impostor", guest.qmp_path)
        decoys.append(decoy)
        with contextlib.suppress(TimeoutError):
            await decoy.ready(guest.qmp_path)
            target.delivered.append("impostor-socket")
    elif kind in ("agent-kill", "agent-freeze"):
        sig = "KILL" if kind == "agent-kill" else "STOP"
        assert guest.agent_path is not None
        # the agent kills (or stops) itself through guest-exec; the reply may never come
        with contextlib.suppress(OSError, EOFError, TimeoutError, asyncio.TimeoutError):
            agent = await RawAgent.connect(guest.agent_path, timeout=2.0)
            try:
                script = f"sleep 0.2; kill -{sig} $PPID"  # the parent: qemu-ga itself
                reply = await agent.call(
                    "guest-exec", timeout=2.0, path="/bin/sh", arg=["-c", script]
                )
                if "return" in reply:
                    target.delivered.append(kind)
            finally:
                await agent.close()


async def run_one(target: Target, started: anyio.Event, workdir: Path) -> None:
    """Stop one target with its policy, honouring its hold-monitor and cancel faults."""
    guest = target.guest
    assert guest is not None
    faults = {kind: (at, how) for at, kind, how in target.faults}
    holder = None
    if "hold-monitor" in faults:
        with contextlib.suppress(Exception):
            holder = await qmp_connect(guest.qmp_path)
            target.delivered.append("hold-monitor")
    try:
        async with anyio.create_task_group() as tg:
            if holder is not None and faults["hold-monitor"][1]["release_after"] is not None:
                tg.start_soon(_release, holder, faults["hold-monitor"][1]["release_after"])
            cancel_at = faults["cancel"][0] if "cancel" in faults else None
            began = time.monotonic()
            started.set()
            with anyio.CancelScope() as scope:
                if cancel_at is not None:
                    scope.deadline = anyio.current_time() + cancel_at
                try:
                    target.outcome = await qmpshutdown.shutdown(
                        guest.qmp_path, target.policy, agent=guest.agent_path
                    )
                except qmpshutdown.Error as err:
                    target.outcome = err
            target.elapsed = time.monotonic() - began
            if scope.cancelled_caught:
                target.outcome = "cancelled"
                target.delivered.append("cancel")
            tg.cancel_scope.cancel()
    finally:
        if holder is not None:
            await qmp_disconnect(holder)


async def _release(holder: Any, after: float) -> None:
    await anyio.sleep(after)
    await qmp_disconnect(holder)


async def run_many(trial: Trial, started: anyio.Event) -> None:
    """Stop every target with one shutdown_many() (no cancel faults in such a trial)."""
    jobs = []
    for target in trial.targets:
        assert target.guest is not None and target.guest.qmp_path is not None
        agent = None if target.guest.agent_path is None else str(target.guest.agent_path)
        jobs.append(qmpshutdown.Job(str(target.guest.qmp_path), policy=target.policy, agent=agent))
    holders = []
    for target in trial.targets:
        if any(kind == "hold-monitor" for _, kind, _ in target.faults):
            with contextlib.suppress(Exception):
                holders.append(await qmp_connect(target.guest.qmp_path))  # type: ignore[union-attr]
                target.delivered.append("hold-monitor")
    try:
        began = time.monotonic()
        started.set()
        outcomes = await qmpshutdown.shutdown_many(jobs)
        elapsed = time.monotonic() - began
        for target, outcome in zip(trial.targets, outcomes, strict=True):
            target.outcome, target.elapsed = outcome, elapsed
    finally:
        for holder in holders:
            await qmp_disconnect(holder)


async def run_trial(trial: Trial, root: Path) -> None:
    """Boot, stop under faults, check, clean up; raise :class:`Violation` on a broken invariant."""
    loop = asyncio.get_running_loop()
    loop_errors: list[str] = []
    old_handler = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, ctx: loop_errors.append(str(ctx.get("message"))))
    gc.collect()
    fds_before = _fds()
    tasks_before = len(asyncio.all_tasks())
    factory = GuestFactory(root)
    decoys: list[Decoy] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            bystander = root / "bystander.sock"
            decoys.append(Decoy.start("silent", bystander))
            specs = [
                {"mode": t.mode, "arg": t.arg, "agent": t.agent, "extra_args": t.extra_args}
                for t in trial.targets
            ]
            for target, guest in zip(trial.targets, await factory.boot_many(*specs), strict=True):
                target.guest = guest
            started = anyio.Event()
            async with anyio.create_task_group() as tg:
                for target in trial.targets:
                    tg.start_soon(inject, target, root, decoys, started)
                if trial.many:
                    await run_many(trial, started)
                else:
                    async with anyio.create_task_group() as stops:
                        for target in trial.targets:
                            stops.start_soon(run_one, target, started, root)
                tg.cancel_scope.cancel()
            await anyio.sleep(0.2)  # a signal sent last reaches its process
            check(trial, decoys)
            # A QEMU the library left (allowed by check) is ours to end.
            factory.cleanup()
            for target in trial.targets:
                assert target.guest is not None
                target.returncode = target.guest.popen.returncode
            for decoy in decoys:
                decoy.end()
            decoys.clear()
            await anyio.lowlevel.checkpoint()
            gc.collect()
        leaks = []
        fds_after = _fds()
        if len(fds_after) > len(fds_before):
            leaks.append(f"descriptors left open: {sorted(fds_after - fds_before)}")
        if len(asyncio.all_tasks()) != tasks_before:
            leaks.append(f"tasks left: {asyncio.all_tasks()}")
        leaks += [f"asyncio: {message}" for message in loop_errors]
        leaks += [f"warning: {w.message}" for w in caught if w.category is ResourceWarning]
        if leaks:
            raise Violation(_report(trial, leaks))
    finally:
        loop.set_exception_handler(old_handler)
        factory.cleanup()
        for decoy in decoys:
            decoy.end()


def _fds() -> set[int]:
    """This process's open descriptors (the listing's own among them, before and after)."""
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


def _report(trial: Trial, problems: Sequence[str]) -> str:
    return (
        f"chaos trial seed={trial.seed} broke {len(problems)} invariant(s):\n  "
        + "\n  ".join(problems)
        + f"\nreplay: python tests/support/chaos.py --seed {trial.seed}"
        + f"\nschedule: {json.dumps(trial.schedule(), indent=1)}"
    )


# ---- the invariants --------------------------------------------------------------------


def check(trial: Trial, decoys: Sequence[Decoy]) -> None:
    problems: list[str] = []
    for n, target in enumerate(trial.targets):
        problems += [f"target {n} ({target.mode}): {p}" for p in check_target(target)]
    for decoy in decoys:
        if decoy.popen.poll() is not None:
            problems.append(f"decoy {decoy.popen.pid} died ({decoy.popen.returncode})")
        if decoy.signals():
            problems.append(f"decoy {decoy.popen.pid} got {decoy.signals()}")
        if decoy.stopped():
            problems.append(f"decoy {decoy.popen.pid} is stopped")
    if problems:
        raise Violation(_report(trial, problems))


def check_target(target: Target) -> list[str]:
    problems: list[str] = []
    guest, outcome, policy = target.guest, target.outcome, target.policy
    assert guest is not None
    if outcome is None:
        return ["the call neither returned nor raised"]
    if target.elapsed is not None and target.elapsed > policy.bound + MARGIN:
        problems.append(f"took {target.elapsed:.2f} s, bound {policy.bound:.2f} s")
    if isinstance(outcome, BaseException) and not isinstance(outcome, qmpshutdown.Error):
        problems.append(f"untyped error {outcome!r}")
    result = outcome.result if isinstance(outcome, qmpshutdown.ShutdownFailed) else outcome
    if isinstance(result, ShutdownResult):
        problems += check_record(result)
    signals = bool({Stage.TERMINATE, Stage.KILL} & set(policy.stages))
    forced = any(stage not in (Stage.POWERDOWN, Stage.AGENT) for stage in policy.stages)
    # -no-shutdown and no force allowed: the guest is off and QEMU stays, as its record says
    left_off = isinstance(result, ShutdownResult) and not forced and _stopped_after_off(result)
    alive = guest.alive()
    if alive and not left_off:
        allowed = (
            outcome == "cancelled"  # a cancelled call leaves QEMU as it was
            or isinstance(outcome, qmpshutdown.ConnectError)  # never reached: nothing to act on
            # no signal allowed: the record says it still runs
            or (isinstance(outcome, qmpshutdown.ShutdownFailed) and not signals)
        )
        if not allowed:
            problems.append(f"QEMU {guest.pid} still runs after {_outcome_text(outcome)}")
        if isinstance(outcome, ShutdownResult):
            problems.append("a record says QEMU ended, yet it runs")
    killed_by_us = "sigkill" in target.delivered
    if not alive and guest.popen.returncode == -signal.SIGKILL and not killed_by_us:
        killed = isinstance(result, ShutdownResult) and any(
            s.stage is Stage.KILL and s.outcome is not Outcome.SKIPPED for s in result.steps
        )
        if not killed:
            problems.append("SIGKILLed, yet neither the record nor a fault did it")
    return problems


def _stopped_after_off(result: ShutdownResult) -> bool:
    names = [event.event for event in result.events]
    return "SHUTDOWN" in names and "STOP" in names[names.index("SHUTDOWN") :]


def check_record(result: ShutdownResult) -> list[str]:
    problems: list[str] = []
    previous_end = 0.0
    for step in result.steps:
        if step.ended < step.started:
            problems.append(f"step {step.stage.value} ends before it starts")
        if step.started < previous_end - 1e-6:
            problems.append(f"step {step.stage.value} overlaps the one before")
        previous_end = step.ended
    if result.stage is not None and result.stage is not Stage.ALREADY_OFF:
        # The first rung that ended done; when none did, QEMU went while no rung ran
        # (killed during an action, such as the diagnosis after the button was ignored):
        # the last rung that ran, whose step says how it ended (the library's rule).
        rungs = [s for s in result.steps if s.stage in RUNGS]
        done = [s.stage for s in rungs if s.outcome is Outcome.DONE]
        expected = done[0] if done else rungs[-1].stage if rungs else None
        if result.stage is not expected:
            said = "none" if expected is None else expected.value
            problems.append(f"stage {result.stage.value}, not the rung that ended it ({said})")
    if result.graceful and result.reason not in GUEST_OFF_REASONS and result.runstate != "shutdown":
        problems.append(f"graceful without a guest reason ({result.reason})")
    return problems


# ---- the soak: many trials, figures ---------------------------------------------------


@contextlib.contextmanager
def scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="qmpshutdown-chaos-") as name:
        yield Path(name)


async def soak(seeds: Sequence[int], ladders: int | None = None) -> dict[str, Any]:
    """Run trials for *seeds* (or until *ladders* ladders ran); return the figures."""
    figures: Counter[str] = Counter()
    faults: Counter[str] = Counter()
    behaviours: Counter[str] = Counter()
    endings: Counter[str] = Counter()
    violations: list[str] = []
    started = time.monotonic()
    seed_iter = iter(seeds)
    for seed in seed_iter:
        trial = Trial.draw(seed)
        with scratch() as root:
            try:
                await run_trial(trial, root)
            except Violation as err:
                violations.append(str(err))
                print(err, flush=True)
        figures["trials"] += 1
        for target in trial.targets:
            figures["ladders"] += 1
            faults.update(target.delivered)
            behaviours[behaviour(target)] += 1
            endings[_ending(target.outcome)] += 1
        said = [f"{t.mode} {_outcome_text(t.outcome)} {t.delivered}" for t in trial.targets]
        print(f"[chaos] seed {seed}: " + "; ".join(said), flush=True)
        if ladders is not None and figures["ladders"] >= ladders:
            break
    return {
        "trials": figures["trials"],
        "ladders": figures["ladders"],
        "faults": dict(sorted(faults.items())),
        "behaviours": dict(sorted(behaviours.items())),
        "endings": dict(sorted(endings.items())),
        "violations": len(violations),
        "seconds": round(time.monotonic() - started),
        "first_seed": seeds[0],
        "details": violations,
    }


def behaviour(target: Target) -> str:
    """The guest's behaviour as the figures count it (a panic with its action)."""
    if target.mode == "panics":
        action = next(a for a in target.extra_args if a.startswith("panic="))
        return "panics, then " + action.removeprefix("panic=")
    return target.mode


def _ending(outcome: Any) -> str:
    if isinstance(outcome, ShutdownResult):
        return f"stage {outcome.stage.value if outcome.stage else None}"
    if isinstance(outcome, BaseException):
        return type(outcome).__name__
    return str(outcome)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=1, help="the first trial's seed (default 1)")
    parser.add_argument("--trials", type=int, default=1, help="how many trials (default 1)")
    parser.add_argument("--ladders", type=int, help="run trials until this many ladders ran")
    parser.add_argument("--write", action="store_true", help=f"write the figures to {RESULTS}")
    args = parser.parse_args(argv)
    count = 10**9 if args.ladders else args.trials
    seeds = range(args.seed, args.seed + count)
    report = asyncio.run(soak(seeds, args.ladders))
    report["date"] = time.strftime("%Y-%m-%d")
    report["command"] = "python tests/support/chaos.py " + " ".join(argv or sys.argv[1:])
    report["qemu"] = _qemu_version()
    print(json.dumps({k: v for k, v in report.items() if k != "details"}, indent=1))
    if args.write:
        RESULTS.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {RESULTS}")
    return 1 if report["violations"] else 0


def _qemu_version() -> str:
    from support.guests import QEMU_BINARY

    out = subprocess.run([QEMU_BINARY, "--version"], capture_output=True, text=True, check=False)
    return out.stdout.splitlines()[0] if out.stdout else "?"


if __name__ == "__main__":
    sys.exit(main())
