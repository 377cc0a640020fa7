"""Regenerate docs/screenshot-ignores.png: the screen of a guest that ignored the power button.

Boots the fixture guest that ignores the button, with a display (``-device
VGA``), stops it with ``evidence_dir=``, copies the screenshot the library
took to ``docs/`` and prints the record that names the cause. Run from the
repository: ``.venv/bin/python docs/examples/screenshot.py``.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

import qmpshutdown
from support.guests import GuestFactory

DOCS = Path(__file__).resolve().parents[1]


async def main() -> None:
    policy = qmpshutdown.ShutdownPolicy(powerdown_timeout=2.0, repress_interval=1.0)
    with tempfile.TemporaryDirectory() as scratch:
        factory = GuestFactory(Path(scratch))
        try:
            guest = await factory.boot("ignores", display=True)
            evidence = Path(scratch) / "evidence"
            evidence.mkdir()
            result = await qmpshutdown.shutdown(guest.qmp_path, policy,
                                                evidence_dir=evidence)  # fmt: skip
        finally:
            factory.cleanup()
        assert result.screenshot is not None, result.step("screenshot")
        shutil.copyfile(result.screenshot, DOCS / "screenshot-ignores.png")
    print(result.summary())
    for step in result.steps:
        detail = step.detail if step.path is None else "saved ignores.png"
        print(f"  {step.stage.value:10} {step.outcome.value:8} {detail}")


if __name__ == "__main__":
    anyio.run(main, backend="asyncio")
