"""How long a stop takes when QEMU's exit is held after its guest's SHUTDOWN (a stalled exit).

    .venv/bin/python benchmarks/held_exit.py [--runs 3] [--library DIR]

A real fixture guest (``cooperative``) and a ``blockdev-backup`` job reading from an
NBD export that holds reads of its last MiB (tests/support/nbdhold.py), as in the
fault cases of tests/guests/test_faults.py: QEMU's exit waits for that read. The
default policy stops it; the test's server answers the read as the library's
wake-up SIGTERM comes. Prints, per run, when the SHUTDOWN came, when the SIGTERM was
sent and when QEMU was gone (seconds from the call), and the record's stage.
``--library DIR`` runs the ``qmpshutdown`` package of another checkout (before and
after, e.g. ``git worktree add /tmp/before 334e85d``).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

from library_arg import use_library_from_argv  # noqa: E402

use_library_from_argv()

import qmpshutdown  # noqa: E402
from support.guests import GuestFactory  # noqa: E402
from support.nbdhold import HoldingNbd, held_job_args, start_held_job  # noqa: E402


async def one(root: Path, index: int) -> str:
    factory = GuestFactory(root / f"run{index}")
    (root / f"run{index}").mkdir()
    sock = root / f"nbd{index}.sock"
    try:
        async with HoldingNbd(sock) as nbd:
            guest = await factory.boot("cooperative", restore=False,
                                       extra_args=held_job_args(sock))  # fmt: skip
            await start_held_job(guest.qmp_path, nbd)
            seen: dict[str, float] = {}

            def progress(update: qmpshutdown.Progress) -> None:
                if update.message == "event SHUTDOWN":
                    seen.setdefault("SHUTDOWN", update.elapsed)
                if "sent SIGTERM" in update.message:
                    seen.setdefault("SIGTERM", update.elapsed)
                    nbd.release()

            result = await qmpshutdown.shutdown(guest.qmp_path, on_progress=progress)
            return (f"SHUTDOWN {seen.get('SHUTDOWN', float('nan')):.2f} s, SIGTERM "
                    f"{seen.get('SIGTERM', float('nan')):.2f} s, gone {result.elapsed:.2f} s; "
                    f"stage {result.stage.value if result.stage else None}, graceful "
                    f"{result.graceful}, exit status {await guest.wait_exit(5)}")  # fmt: skip
    finally:
        factory.cleanup()


async def main(runs: int) -> None:
    print(f"qmpshutdown from {Path(qmpshutdown.__file__).parent.parent}, default policy")
    with tempfile.TemporaryDirectory(prefix="qsd-held-") as tmp:
        for index in range(runs):
            print(f"run {index + 1}: {await one(Path(tmp), index)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--library", metavar="DIR", help="the qmpshutdown of another checkout")
    asyncio.run(main(parser.parse_args().runs))
