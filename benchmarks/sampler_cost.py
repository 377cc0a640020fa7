"""The patience sampler's cost to the stopping process: CPU per sample, per VM.

Boots one fixture guest, then takes N readings the way the sampler does
(``/proc/PID/task/TID/schedstat`` of each vCPU thread, plus one QMP
``query-blockstats``, parsed) and prints this process's CPU time per reading.
At one reading a second per waiting VM, that is the sampler's CPU share per VM.

Run: ``.venv/bin/python benchmarks/sampler_cost.py [N]``.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import anyio
from qemu.qmp import QMPClient

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from qmpshutdown._patience import _block_totals, _thread_ids, vcpu_times
from support.guests import GuestFactory


async def main(count: int) -> None:
    with tempfile.TemporaryDirectory(prefix="qmpshutdown-bench-") as tmp:
        factory = GuestFactory(Path(tmp))
        try:
            guest = await factory.boot("ignores", disk=True)
            client = QMPClient("bench")
            await client.connect(str(guest.qmp_path))
            try:
                tids = _thread_ids(await client.execute("query-cpus-fast"))
                cpu, wall = time.process_time(), time.perf_counter()
                for _ in range(count):
                    assert vcpu_times(guest.pid, tids) is not None
                    assert _block_totals(await client.execute("query-blockstats")) is not None
                cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            finally:
                await client.disconnect()
        finally:
            factory.cleanup()
    per = cpu / count
    print(
        f"sampler: {count} readings, {per * 1e3:.2f} ms CPU per reading "
        f"({wall / count * 1e3:.2f} ms wall); at 1 reading/s: {per * 100:.3f} % of a core per VM"
    )


if __name__ == "__main__":
    anyio.run(main, int(sys.argv[1]) if len(sys.argv) > 1 else 500, backend="asyncio")
