"""The test policies, one shared set: short timeouts for fakes, for peers and for real guests."""

from __future__ import annotations

import attrs

from qmpshutdown import ShutdownPolicy

#: The ladder before the agent rung: tests of the other rungs climb it, so that their exact
#: step sequences hold no ``agent skipped`` step (the agent's own tests use the default).
WITHOUT_AGENT = ("powerdown", "quit", "terminate", "kill")

#: The ladder against fakes of the seams (tests/support/fakes.py): everything in tenths of a second.
FAKE = ShutdownPolicy(
    powerdown_timeout=0.25,
    repress_interval=0.1,
    quit_timeout=0.2,
    terminate_timeout=0.2,
    kill_timeout=0.2,
    command_timeout=0.2,
    stages=WITHOUT_AGENT,
)

#: Random input through an in-process fake monitor (tests/test_fuzz.py): as short as it gets.
FUZZ = ShutdownPolicy(
    powerdown_timeout=0.15,
    repress_interval=0.05,
    quit_timeout=0.1,
    terminate_timeout=0.1,
    kill_timeout=0.1,
    connect_timeout=0.3,
    command_timeout=0.1,
    stages=WITHOUT_AGENT,
)

#: Peers that are not QEMU (tests/support/peers.py): one second for everything, one press.
PEERS = ShutdownPolicy(
    powerdown_timeout=1.0,
    repress_interval=None,
    quit_timeout=1.0,
    terminate_timeout=1.0,
    kill_timeout=1.0,
    connect_timeout=1.0,
    command_timeout=1.0,
    stages=WITHOUT_AGENT,
)

#: Faults on real guests: a short press, quick escalation (test_faults.py, test_many_guests.py).
FAULTS = ShutdownPolicy(
    powerdown_timeout=2.0,
    repress_interval=1.0,
    quit_timeout=3.0,
    terminate_timeout=3.0,
    kill_timeout=3.0,
    connect_timeout=1.0,
    command_timeout=1.0,
    stages=WITHOUT_AGENT,
)

#: Real guests stopped the ordinary way: roomier timeouts for 2 busy cores under TCG.
GUEST = ShutdownPolicy(
    powerdown_timeout=3.0,
    repress_interval=1.0,
    quit_timeout=5.0,
    terminate_timeout=5.0,
    kill_timeout=5.0,
    connect_timeout=3.0,
    command_timeout=3.0,
    stages=WITHOUT_AGENT,
)

#: Real guests a test expects to go on the press (cooperative ones, booted): the press step
#: ends at their power-off, so a long one costs nothing, and 2 loaded TCG cores have kept a
#: booted guest past 2 s (CI). After the guest's SHUTDOWN, QEMU gets quit_timeout to exit
#: before the ladder goes on; a loaded host has taken some 19 s (CI, QEMU 10.0). One press:
#: a booted guest hears it, and a second one while it goes would be a second POWERDOWN.
#: Never for a stop that also times a guest out.
PRESSED = attrs.evolve(GUEST, powerdown_timeout=30.0, repress_interval=None, quit_timeout=30.0)

#: Cooperative and ignoring real guests stopped under one policy (the CLI's several targets,
#: an Ansible play): the press gets 6 s (a booted guest has gone past 2 s on a loaded host,
#: CI), presses at 0 and 3 s, and QEMU's exit after the guest's SHUTDOWN, like quit's, up
#: to 30 s (each wait ends at the exit).
MIXED = attrs.evolve(GUEST, powerdown_timeout=6.0, repress_interval=3.0, quit_timeout=30.0)

#: The CLI's options for each timeout a policy gives (the CLI maps each onto its field).
_CLI_SECONDS = (
    ("--timeout", "powerdown_timeout"),
    ("--quit-timeout", "quit_timeout"),
    ("--term-timeout", "terminate_timeout"),
    ("--kill-timeout", "kill_timeout"),
    ("--connect-timeout", "connect_timeout"),
    ("--command-timeout", "command_timeout"),
)


def cli_options(policy: ShutdownPolicy) -> list[str]:
    """The ``qmpshutdown`` command line's options that give *policy*'s timeouts and presses."""
    options: list[str] = []
    for option, field in _CLI_SECONDS:
        options += [option, f"{getattr(policy, field):g}"]
    repress = policy.repress_interval
    return options + (["--no-repress"] if repress is None else ["--repress", f"{repress:g}"])


#: The CLI's and discovery's tests: GUEST with a 2 s press (a press is acted on in well
#: under a second), PRESSED for a run that stops only cooperative guests, MIXED for both.
CLI_FAST = cli_options(attrs.evolve(GUEST, powerdown_timeout=2.0))
CLI_PRESSED = cli_options(PRESSED)
CLI_MIXED = cli_options(MIXED)
