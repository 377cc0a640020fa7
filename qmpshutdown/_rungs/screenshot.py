"""The screenshot before force: evidence of what a guest that will not stop showed.

The screenshot is an :class:`~.base.Action`: QMP ``screendump`` (PNG) right
before the first forced rung — before any filesystem freeze, so it shows the
guest as it was — and once more when the ladder ends with QEMU still running.
Nothing is captured on a graceful stop. It is one recorded step
(:attr:`Stage.SCREENSHOT`), never longer than ``command_timeout``, and it never
stops the ladder: a missing display or an unwritable directory is a
``skipped`` or ``failed`` step, not an exception.

QEMU writes the file itself: the directory is a path on QEMU's host, writable
by QEMU's user. The name is reserved here first with ``O_EXCL`` (an existing
file is never overwritten) and removed again when no screenshot came.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import re

from .._errors import CommandError, MonitorClosedError
from .._policy import Stage
from .._qemu import Qemu
from .._result import Outcome
from .._steps import Ended, OpenStep
from .base import Budgeted

logger = logging.getLogger("qmpshutdown")

# QEMU's words when it has no console to dump (-nodefaults and no display device).
_NO_CONSOLE = re.compile(r"no (qemu)?console", re.IGNORECASE)
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_counter = itertools.count(1)


def screenshot_name(target: str, pid: int | None, when: str) -> str:
    """A short file name for a screenshot of *target*: safe for any name, unique per VM and attempt.

    The VM's name and the moment, e.g. ``ignores-1a2b3c4d-before-force-153012-1.png``:
    a unix socket path gives its basename without the extension
    (``/tmp/x/ignores.qmp`` gives ``ignores``), ``host:port`` is kept; either is
    reduced to safe characters and its first 16. A short hash of the whole
    target keeps VMs apart whose names reduce alike (two ``qmp.sock`` in
    different directories), the time (UTC, ``HHMMSS``) and a per-process
    counter tell attempts apart; :func:`reserve` never reuses a taken name.
    At most 51 characters while the counter has one digit. *pid* is not part
    of the name.

    :param when: ``before-force`` or ``end``.
    """
    head, _, port = target.rpartition(":")
    if "/" in target or not (head and port.isdigit()):
        target_name = os.path.splitext(os.path.basename(target.rstrip("/")))[0]
    else:
        target_name = target
    safe = _UNSAFE.sub("_", target_name).strip("._-")[:16].rstrip("._-") or "qemu"
    import datetime  # only when a screenshot is taken (the fast path never imports them)
    import hashlib

    digest = hashlib.sha256(target.encode(errors="surrogateescape")).hexdigest()[:8]
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%H%M%S")
    return f"{safe}-{digest}-{when}-{stamp}-{next(_counter)}.png"


def reserve(directory: str, name: str) -> str:
    """Create *name* in *directory* with ``O_EXCL`` (another name if taken); return its path.

    :raises OSError: the directory is missing or not writable.
    """
    stem = name.removesuffix(".png")
    for attempt in range(100):
        path = os.path.join(directory, name if not attempt else f"{stem}-{attempt}.png")
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644))
        except FileExistsError:
            continue
        return path
    raise OSError(errno.EEXIST, "no free file name", os.path.join(directory, name))


def _discard(path: str) -> None:
    try:
        os.unlink(path)
    except OSError as err:
        logger.debug("cannot remove %s: %s", path, err)


def _written(path: str) -> bool:
    """Whether QEMU wrote something into *path*; remove it if not."""
    try:
        if os.stat(path).st_size > 0:
            return True
    except OSError:
        return False
    _discard(path)
    return False


async def take_screenshot(qemu: Qemu, when: str) -> Ended:
    """``screendump`` the guest's screen into the job's ``evidence_dir``; say how it went."""
    directory = qemu.job.evidence_path
    assert directory is not None
    pid = None if qemu.process is None else qemu.process.pid
    try:
        path = reserve(directory, screenshot_name(qemu.recorder.name, pid, when))
    except OSError as err:
        return Ended(Outcome.FAILED, f"cannot create a file in {directory}: {err}")
    try:
        await qemu.command("screendump", {"filename": path, "format": "png"})
    except CommandError as err:
        _discard(path)
        if _NO_CONSOLE.search(str(err)):
            return Ended(Outcome.SKIPPED, f"no display device ({err})")
        return Ended(Outcome.FAILED, f"screendump failed: {err}")
    except (MonitorClosedError, TimeoutError) as err:
        _discard(path)
        why = str(err) or f"no reply in {qemu.policy.command_timeout:g} s"
        return Ended(Outcome.FAILED, f"screendump failed: {why}")
    except BaseException:
        _discard(path)  # cancelled (QEMU went): no half-written evidence
        raise
    if not _written(path):
        return Ended(Outcome.FAILED, "screendump answered but wrote nothing")
    return Ended(Outcome.DONE, f"saved {path}", path=path)


class Screenshot(Budgeted):
    """The guest's screen (QMP ``screendump``, PNG) when the ladder has to force.

    Runs when the job names an evidence directory (``evidence_dir``)
    and a monitor is there; a hung QEMU without a monitor gets no step at all.
    """

    stage = Stage.SCREENSHOT

    def applies(self, qemu: Qemu) -> bool:
        return (
            qemu.job.evidence_dir is not None
            and qemu.monitor is not None
            and not qemu.monitor.is_closed()
        )

    async def run(self, qemu: Qemu, step: OpenStep) -> Ended:
        return await take_screenshot(qemu, "before-force")

    async def finish(self, qemu: Qemu) -> None:
        """One more screenshot when the ladder ended and QEMU still runs (a recorded step)."""
        if qemu.gone or qemu.watch.exit_begun or not self.applies(qemu):
            return  # gone, or on its way (no command into its exit)
        if qemu.process is not None and qemu.process.has_exited():
            return
        # Bounded by the command's own timeout; recorded like any other step.
        with qemu.recorder.step(self.stage, qemu.ended_by_cancel) as step:
            step.end(await take_screenshot(qemu, "end"))
