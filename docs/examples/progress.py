"""Print a ladder's progress as it happens: the example of the README's on_progress section.

Boots the fixture guest that ignores the power button, stops it with a short
policy, and prints every update but the QMP events. Run from the repository:
``.venv/bin/python docs/examples/progress.py``.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

import qmpshutdown
from support.guests import guest_argv


def show(update: qmpshutdown.Progress) -> None:
    if update.kind is not qmpshutdown.ProgressKind.EVENT:
        print(f"{update.target}  +{update.elapsed:.2f}s  {update.kind.value:5}  {update.message}")


async def main() -> None:
    policy = qmpshutdown.ShutdownPolicy(powerdown_timeout=2.0, repress_interval=1.0)
    with tempfile.TemporaryDirectory() as scratch:
        argv = guest_argv("ignores", workdir=Path(scratch), qmp=False)
        async with qmpshutdown.launch(argv, policy, name="vm2", on_progress=show) as vm:
            serial = Path(scratch) / "serial.log"
            while "QMPSHUTDOWN-GUEST-READY" not in serial.read_text(errors="replace"):  # noqa: ASYNC110
                await anyio.sleep(0.05)
            result = await vm.shutdown()
    print(result.summary())


if __name__ == "__main__":
    anyio.run(main, backend="asyncio")
