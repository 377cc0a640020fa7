"""The patience sampler's cost to the stopping process: CPU per reading, per VM.

Boots one fixture guest (with a disk, so ``query-blockstats`` has a device),
then takes N readings the way the ladder does — ``Sampler.reading`` asking
QEMU through the library's own monitor (one ``query-blockstats``, bounded by
``command_timeout``; the vCPU threads' ``/proc/PID/task/TID/schedstat``) —
and, interleaved in the same run, the same reading by hand straight over the
qemu.qmp client underneath (``client.execute``, no bound, no wrapper). Prints
this process's CPU time per reading for both. At one reading a second per
waiting VM, that is the sampler's CPU share per VM.

Run: ``.venv/bin/python benchmarks/sampler_cost.py [N]`` (default 500).
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
# Every guest booted, none restored from a saved state (tests/support/saved.py): a restored
# guest starts with an empty TCG translation cache, and its first press is slower.
os.environ.setdefault("QMPSHUTDOWN_TEST_RESTORE", "0")

from qmpshutdown import ShutdownPolicy
from qmpshutdown._connect import connect_socket, handshake
from qmpshutdown._patience import Sampler, _block_totals, vcpu_times
from support.guests import GuestFactory

#: Readings per batch; the batches of the two alternate.
BATCH = 50


async def main(count: int) -> None:
    policy = ShutdownPolicy()
    with tempfile.TemporaryDirectory(prefix="qmpshutdown-bench-") as tmp:
        factory = GuestFactory(Path(tmp))
        try:
            guest = await factory.boot("ignores", disk=True)
            sock = await connect_socket(str(guest.qmp_path), policy.connect_timeout)
            monitor = await handshake(sock, policy.connect_timeout)
            try:

                async def ask(name: str) -> object:
                    with anyio.fail_after(policy.command_timeout):
                        return await monitor.execute(name)

                sampler = Sampler(policy, guest.pid)
                await sampler.reading(ask)  # reads the vCPU threads once, as the ladder does
                tids = sampler.tids
                assert tids, "no vCPU threads found"
                library: list[float] = []
                by_hand: list[float] = []
                for _ in range(max(1, count // BATCH)):
                    cpu = time.process_time()
                    for _ in range(BATCH):
                        reading = await sampler.reading(ask)
                        assert reading.io is not None and reading.ran is not None
                    library.append((time.process_time() - cpu) / BATCH)
                    cpu = time.process_time()
                    for _ in range(BATCH):
                        assert vcpu_times(guest.pid, tids) is not None
                        stats = await monitor.client.execute("query-blockstats")
                        assert _block_totals(stats) is not None
                    by_hand.append((time.process_time() - cpu) / BATCH)
            finally:
                await monitor.close()
        finally:
            factory.cleanup()
    lib, raw = statistics.median(library), statistics.median(by_hand)
    print(
        f"sampler: {len(library) * BATCH} readings; library {lib * 1e3:.3f} ms CPU per reading, "
        f"by hand over qemu.qmp {raw * 1e3:.3f} ms ({lib / raw:.2f}x); "
        f"at 1 reading/s: {lib * 100:.3f} % of a core per VM"
    )


if __name__ == "__main__":
    anyio.run(main, int(sys.argv[1]) if len(sys.argv) > 1 else 500, backend="asyncio")
