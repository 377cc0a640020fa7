"""The test harness's saved guests (tests/support/saved.py): which guests may be restored, how.

The restoring itself runs on real guests (tests/guests/test_fixtures.py and every
real-guest test that boots a restorable kind).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from support import saved


def _restorable(mode: str = "ignores", **changes: object) -> bool:
    options: dict[str, object] = {
        "qmp": True, "wait_ready": True, "extra_args": (), "kernel_args": (),
    }  # fmt: skip
    options.update(changes)
    return saved.restorable(mode, **options)  # type: ignore[arg-type]


@pytest.mark.skipif(not saved.ENABLED, reason="QMPSHUTDOWN_TEST_RESTORE=0 turns restoring off")
def test_only_what_a_state_stands_for_is_restored() -> None:
    assert all(_restorable(mode) for mode in saved.RESTORABLE_MODES)
    # Their clocks start at READY: a restored one would run on from the first one's.
    assert not any(_restorable(mode) for mode in ("asleep", "panics", "counts"))
    # Their first answer to the button is timed by tests, and a restored one's is slower.
    assert not any(_restorable(mode) for mode in ("cooperative", "slow"))
    assert not _restorable(qmp=False)  # nothing to say when it runs
    assert not _restorable(wait_ready=False)
    assert not _restorable(extra_args=("-S",))
    assert not _restorable(kernel_args=("quiet",))


def test_a_restored_guest_appends_to_its_serial_file_and_loads_the_state() -> None:
    argv = ["qemu-system-x86_64", "-serial", "file:/w/serial.log", "-m", "256"]
    assert saved.restoring_argv(argv, Path("/s/k 1.state")) == [
        "qemu-system-x86_64",
        "-chardev", "file,id=qsdserial,path=/w/serial.log,append=on",
        "-serial", "chardev:qsdserial",
        "-m", "256",
        "-incoming", "exec:cat '/s/k 1.state'",  # through a shell: quoted
    ]  # fmt: skip
    with pytest.raises(ValueError, match="must be a file"):
        saved.restoring_argv(["qemu", "-serial", "stdio"], Path("/s"))


def test_a_kind_is_the_command_line_but_for_the_directory_and_the_files_content(
    tmp_path: Path,
) -> None:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"one")
    qemu = os.path.realpath("/bin/sh")  # any program: its path, size and mtime count

    def kind(workdir: str, *rest: str) -> str:
        argv = [qemu, "-serial", f"file:{workdir}/serial.log", *rest]
        return saved.kind_of(argv, Path(workdir), [kernel])

    assert kind("/w1") == kind("/w2")
    assert kind("/w1") != kind("/a", "-m", "512")
    before = kind("/w1")
    kernel.write_bytes(b"other")
    assert kind("/w1") != before
    # How a disk is made is part of its kind.
    argv = [qemu, "-serial", "file:/w1/serial.log"]
    assert saved.kind_of(argv, Path("/w1"), [kernel], ["16 MiB"]) != kind("/w1")
    assert saved.kind_of(argv, Path("/w1"), [kernel], ["16 MiB"]) != saved.kind_of(
        argv, Path("/w1"), [kernel], ["32 MiB"]
    )


def test_a_saved_disk_lies_beside_its_state() -> None:
    assert saved.disk_of(Path("/s/abc.state")) == Path("/s/abc.disk.qcow2")
